"""The fused lm_head distillation loss of two Hugging Face causal language models, without their
full [tokens, V] logits (docs/INTEGRATIONS.md).

    from kdkernels.integrations.hf import distill_models_loss
    loss = distill_models_loss(student, teacher, input_ids, attention_mask, labels,
                               temperature=1.0, kd_weight=1.0, ce_weight=0.0, t2_scale=False)

The models run without their lm_heads (``model.base_model``: the backbone's last hidden states,
after its final norm), and :func:`kdkernels.fused_linear_distillation_loss` takes the hidden
states and the lm_head weights (``model.get_output_embeddings()``, which is the input embedding
when the two are tied: its gradient then collects both uses). A model's final logit soft-cap
(``config.final_logit_softcapping``, Gemma 2 and 3) is read from its config and applied to its
logits, chunk by chunk. A PEFT model (``get_base_model()``) is unwrapped to the transformers model
beneath, whose layers carry the adapters. Needs only torch at import; the models are whatever
``transformers`` built.
"""
import torch

from .._fused_linear import fused_linear_distillation_loss

# Config attributes by which a model scales its logits after the lm_head (the names TRL's
# DistillationTrainer reads): the fused path takes `hidden @ W.T (+ b)` logits, soft-capped by
# `final_logit_softcapping`, and nothing else.
LOGIT_TRANSFORMS = ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")
SOFTCAPS = ("logit_softcap", "teacher_logit_softcap")  # read from the models' configs here


def unwrapped(model):
    """The transformers model of a PEFT model (``get_base_model()``: the model whose layers the
    adapters were injected into), else ``model``. Prompt-learning adapters are refused: their
    virtual tokens are added by the PEFT model's own forward, which the backbone call skips."""
    if getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False):
        raise ValueError(f"{type(model).__name__} has a prompt-learning adapter (prompt or "
                         "prefix tuning): its virtual tokens are added by its own forward, which "
                         "the fused path does not call; distil from model(...).logits instead")
    get_base_model = getattr(model, "get_base_model", None)
    return model if get_base_model is None else get_base_model()


def lm_hidden_states(model, input_ids, attention_mask=None):
    """The last hidden states [B, L, H] of a causal LM (its backbone's output, before the lm_head),
    without computing logits."""
    model = unwrapped(model)
    backbone = model.base_model
    if backbone is model:
        raise ValueError(f"{type(model).__name__} has no separate backbone (model.base_model is "
                         "the model itself): pass its hidden states to lm_head_distillation_loss")
    return backbone(input_ids=input_ids, attention_mask=attention_mask,
                    use_cache=False).last_hidden_state


def distill_models_loss(student, teacher, input_ids, attention_mask=None, labels=None, *,
                        padded_teacher=False, **loss_options):
    """The distillation loss of ``student`` against ``teacher`` (two causal LMs on the same
    tokens) through the fused lm_head: no full logits of either model exist.

    Args:
        student, teacher: ``PreTrainedModel``s for causal LM with the same tokenizer. The teacher
            runs under ``torch.no_grad()`` (put it in eval mode yourself); the student's
            backbone and lm_head (tied or not) receive gradients.
            PEFT models are unwrapped (:func:`unwrapped`); their lm_heads must carry no adapter.
        input_ids, attention_mask: [B, L], as for the models' forward.
        labels: [B, L] in Hugging Face's convention (not shifted; ``ignore_index``, by default
            -100, ignored): position i's logits are scored against ``labels[:, i + 1]``, as
            ``model(..., labels=labels)`` does. Default: ``input_ids`` with padding
            (``attention_mask == 0``) set to ``ignore_index``.
        padded_teacher: the teacher's vocabulary is the student's plus padding rows in its
            lm_head (passed to the library, which drops those columns).
        **loss_options: any keyword of :func:`kdkernels.fused_linear_distillation_loss`
            (``temperature``, ``kd_weight``, ``ce_weight``, ``divergence``, ``reduction``,
            ``ignore_index``, ...; the library's defaults otherwise) but the soft-caps, which
            are each model's ``config.final_logit_softcapping``.

    Returns what :func:`kdkernels.fused_linear_distillation_loss` returns; with
    ``reduction="none"``, [B, L] with 0 at the last position and at ignored ones.
    """
    if labels is None:
        labels = input_ids if attention_mask is None else input_ids.masked_fill(
            attention_mask == 0, loss_options.get("ignore_index", -100))
    hidden = lm_hidden_states(student, input_ids, attention_mask)
    with torch.no_grad():
        teacher_hidden = lm_hidden_states(teacher, input_ids, attention_mask)
    return lm_head_distillation_loss(student, teacher, hidden, teacher_hidden, labels,
                                     padded_teacher=padded_teacher, **loss_options)


def lm_head_distillation_loss(student, teacher, student_hidden, teacher_hidden, labels, *,
                              padded_teacher=False, **loss_options):
    """:func:`distill_models_loss` from hidden states already computed (e.g. the last entry of
    ``hidden_states`` of outputs with ``output_hidden_states=True``, for models whose last
    entry is the final-normed one, as Llama's, Qwen's and Gemma's are), [B, L, H] each, and
    unshifted ``labels`` [B, L]."""
    student, teacher = unwrapped(student), unwrapped(teacher)
    for name in SOFTCAPS:
        if name in loss_options:
            raise ValueError(f"{name} is not taken here: each model's soft-cap is its "
                             "config.final_logit_softcapping")
    for who, model in (("student", student), ("teacher", teacher)):
        _refuse_logit_transforms(who, model)
    ignore_index = loss_options.get("ignore_index", -100)
    # shifted by padding the labels, not by slicing the hidden states (no copy of them): the
    # last position predicts nothing
    target = torch.nn.functional.pad(labels[..., 1:], (0, 1), value=ignore_index)
    head, teacher_head = _lm_head("student", student), _lm_head("teacher", teacher)
    return fused_linear_distillation_loss(
        student_hidden, head.weight, teacher_hidden, target, student_bias=head.bias,
        teacher_weight=teacher_head.weight.detach(),
        teacher_bias=None if teacher_head.bias is None else teacher_head.bias.detach(),
        padded_teacher=padded_teacher, logit_softcap=_softcap(student),
        teacher_logit_softcap=_softcap(teacher), **loss_options)


def _lm_head(who, model):
    head = model.get_output_embeddings()
    # the fused path reads the weight and bias only: a wrapped head (PEFT's LoRA on the lm_head,
    # or its modules_to_save copy) computes something else
    if not isinstance(head, torch.nn.Linear):
        raise ValueError(f"the {who}'s output embeddings are a {type(head).__name__}, not a "
                         "torch.nn.Linear: the fused loss reads only lm_head.weight and .bias, so "
                         "an adapter on the lm_head (PEFT's LoRA or modules_to_save) would be "
                         "left out; keep the lm_head out of the adapter's modules")
    return head


def _softcap(model):
    return getattr(model.config.get_text_config(), "final_logit_softcapping", None)


def _refuse_logit_transforms(who, model):
    config = model.config.get_text_config()
    for name in LOGIT_TRANSFORMS:
        value = getattr(config, name, None)
        if value is None or value == 1:
            continue  # absent, or a scale of 1
        raise ValueError(
            f"the {who}'s config sets {name}={value!r}: its logits are not hidden @ "
            f"lm_head.T, and fused_linear_distillation_loss has no {name} option. Set "
            f"config.{name} = None only if the model was trained without it; otherwise "
            "distil from full logits (kdkernels.distillation_loss on model(...).logits)")
