"""Drop-ins for the libraries language models are trained with (docs/INTEGRATIONS.md).

One module per library, imported on demand, each importing its library only when used:

- ``kdkernels.integrations.trl``: TRL's ``generalized_jsd_loss`` on kdkernels' kernels, and a GKD
  trainer whose loss goes through the fused lm_head (``pip install 'kdkernels[trl]'``);
- ``kdkernels.integrations.hf``: the fused lm_head distillation loss of two Hugging Face causal
  language models, without their full logits (``kdkernels[hf]``);
- ``kdkernels.integrations.torchtune``: torchtune's KD losses, same constructors, calls and
  values (``kdkernels[torchtune]`` for torchtune itself; the classes need only torch).

``import kdkernels`` imports none of them.
"""
