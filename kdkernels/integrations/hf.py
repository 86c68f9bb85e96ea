"""The fused lm_head distillation loss of two Hugging Face causal language models, without their
full [tokens, V] logits (docs/INTEGRATIONS.md).

    from kdkernels.integrations.hf import distill_models_loss
    loss = distill_models_loss(student, teacher, input_ids, attention_mask, labels,
                               temperature=1.0, kd_weight=1.0, ce_weight=0.0, t2_scale=False)

The models run without their lm_heads (``model.base_model``: the backbone's last hidden states,
after its final norm), and :func:`kdkernels.fused_linear_distillation_loss` takes the hidden
states and the lm_head weights (``model.get_output_embeddings()``, which is the input embedding
when the two are tied: its gradient then collects both uses). Needs only torch at import; the
models are whatever ``transformers`` built.
"""
import torch

from .._fused_linear import fused_linear_distillation_loss

# Config attributes by which a model changes its logits after the lm_head (the names TRL's
# DistillationTrainer reads): the fused path takes plain `hidden @ W.T (+ b)` logits.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier",
                    "lm_head_multiplier", "logits_scaling")


def lm_hidden_states(model, input_ids, attention_mask=None):
    """The last hidden states [B, L, H] of a causal LM (its backbone's output, before the lm_head),
    without computing logits."""
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
        input_ids, attention_mask: [B, L], as for the models' forward.
        labels: [B, L] in Hugging Face's convention (not shifted; -100 ignored): position i's
            logits are scored against ``labels[:, i + 1]``, as ``model(..., labels=labels)``
            does. Default: ``input_ids`` with padding (``attention_mask == 0``) ignored.
        padded_teacher: the teacher's vocabulary is the student's plus padding rows in its
            lm_head (passed to the library, which drops those columns).
        **loss_options: any keyword of :func:`kdkernels.fused_linear_distillation_loss`
            (``temperature``, ``kd_weight``, ``ce_weight``, ``divergence``, ``reduction``, ...;
            the library's defaults otherwise).

    Returns what :func:`kdkernels.fused_linear_distillation_loss` returns; with
    ``reduction="none"``, [B, L] with 0 at the last position and at ignored ones.
    """
    if labels is None:
        labels = input_ids if attention_mask is None else input_ids.masked_fill(
            attention_mask == 0, -100)
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
    for who, model in (("student", student), ("teacher", teacher)):
        _refuse_logit_transforms(who, model)
    ignore_index = loss_options.get("ignore_index", -100)
    # shifted by padding the labels, not by slicing the hidden states (no copy of them): the
    # last position predicts nothing
    target = torch.nn.functional.pad(labels[..., 1:], (0, 1), value=ignore_index)
    head = student.get_output_embeddings()
    teacher_head = teacher.get_output_embeddings()
    if padded_teacher:  # the keyword of the library's padded-vocabulary support
        loss_options["padded_teacher"] = True
    return fused_linear_distillation_loss(
        student_hidden, head.weight, teacher_hidden, target, student_bias=head.bias,
        teacher_weight=teacher_head.weight.detach(),
        teacher_bias=None if teacher_head.bias is None else teacher_head.bias.detach(),
        **loss_options)


def _refuse_logit_transforms(who, model):
    config = model.config.get_text_config()
    for name in LOGIT_TRANSFORMS:
        value = getattr(config, name, None)
        if value is None or (name != "final_logit_softcapping" and value == 1):
            continue  # absent, or a scale of 1
        raise ValueError(
            f"the {who}'s config sets {name}={value!r}: its logits are not hidden @ "
            f"lm_head.T, and fused_linear_distillation_loss has no {name} option. Set "
            f"config.{name} = None only if the model was trained without it; otherwise "
            "distil from full logits (kdkernels.distillation_loss on model(...).logits)")
