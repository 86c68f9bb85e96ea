"""TRL on kdkernels' kernels (docs/INTEGRATIONS.md).

- :func:`generalized_jsd_loss`: TRL's ``GKDTrainer.generalized_jsd_loss``, same signature, same
  value and gradient, computed by :func:`kdkernels.distillation_loss` (divergence="jsd", no T^2;
  the unreduced per-class terms of ``reduction="none"`` in torch, by TRL's formula).
- :func:`gkd_trainer_class`: TRL's ``GKDTrainer`` with ``compute_loss`` overridden to pass the
  models' hidden states and lm_head weights to :func:`kdkernels.fused_linear_distillation_loss`
  (same objective as TRL's ``compute_loss``, without the full logits of either model).

    from kdkernels.integrations.trl import gkd_trainer_class
    Trainer = gkd_trainer_class()          # a subclass of trl.experimental.gkd.GKDTrainer
    trainer = Trainer(model=student, teacher_model=teacher, args=GKDConfig(...), ...)

TRL is imported by :func:`gkd_trainer_class` only; :func:`generalized_jsd_loss` needs only torch.
"""
import functools

import torch
import torch.nn.functional as F

from .._core import check_options, distillation_loss
from ._common import row_mask_target
from .hf import distill_models_loss

# TRL's reductions; any other value of `reduction` gives its unreduced per-class terms
REDUCTIONS = ("batchmean", "sum", "mean")


def _jsd_options(beta, temperature):
    # TRL divides both logits by the temperature and applies no T^2; beta 0 and 1 are its two KLs
    return dict(divergence="jsd", jsd_beta=float(beta), temperature=temperature, kd_weight=1.0,
                ce_weight=0.0, t2_scale=False)


def generalized_jsd_loss(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0,
                         reduction="batchmean", num_items_in_batch=None):
    """TRL's generalized Jensen-Shannon divergence (``GKDTrainer.generalized_jsd_loss``)::

        beta * KL(q || m) + (1 - beta) * KL(p || m),  m = beta q + (1 - beta) p

    with ``p = softmax(student_logits / temperature)``, ``q`` the teacher's alike; beta = 0 is
    ``KL(q || p)``, beta = 1 ``KL(p || q)``. Rows whose ``labels`` are -100 are dropped (the labels'
    other values are not used). Reductions as TRL's: ``"batchmean"`` divides the sum by the
    number of kept rows (with labels) or by ``student_logits.shape[0]`` (without), ``"mean"`` by
    that many rows times the vocabulary (TRL's mean over [rows, V] elements), ``"sum"``; with
    ``num_items_in_batch`` the sum divided by it, whatever ``reduction`` says. Any other
    ``reduction`` (``"none"``) without ``num_items_in_batch``: TRL's unreduced per-class terms,
    of the logits' shape, or [kept rows, V] with ``labels``; the kernels never form those, so
    they are computed in torch as TRL computes them (in the logits' dtype).

    Differences from TRL, by design: the reduced loss is float32 for bf16/fp16 logits (TRL's has
    their dtype); no gradient flows to ``teacher_logits``; a batch whose rows are all dropped
    gives 0 for ``"mean"`` (TRL: NaN).
    """
    options = _jsd_options(beta, temperature)
    if num_items_in_batch is None and reduction not in REDUCTIONS:
        check_options(**options)  # the errors the kernels' path gives
        return _jsd_terms(student_logits, teacher_logits.detach(), labels, beta, temperature)
    target = None if labels is None else row_mask_target(labels)
    if num_items_in_batch is not None:
        total = distillation_loss(student_logits, teacher_logits, target, reduction="sum",
                                  **options)
        return total / _on_device_of(total, num_items_in_batch)
    if reduction == "sum":
        return distillation_loss(student_logits, teacher_logits, target, reduction="sum",
                                 **options)
    if reduction == "batchmean" and labels is None:  # TRL divides by the batch dimension
        total = distillation_loss(student_logits, teacher_logits, None, reduction="sum",
                                  **options)
        return total / max(student_logits.shape[0], 1)
    # the mean over kept rows (all rows without labels); TRL's "mean" also over the classes
    mean = distillation_loss(student_logits, teacher_logits, target, reduction="mean", **options)
    return mean if reduction == "batchmean" else mean / student_logits.shape[-1]


def _jsd_terms(student_logits, teacher_logits, labels, beta, temperature):
    """TRL's per-class terms, by its formula (F.kl_div on log-probabilities, the mixture by
    logsumexp), so that they equal its own."""
    log_p = F.log_softmax(student_logits / temperature, dim=-1)
    log_q = F.log_softmax(teacher_logits / temperature, dim=-1)
    if beta == 0:
        terms = F.kl_div(log_p, log_q, reduction="none", log_target=True)
    elif beta == 1:
        terms = F.kl_div(log_q, log_p, reduction="none", log_target=True)
    else:
        b = torch.tensor(beta, dtype=log_p.dtype, device=log_p.device)
        log_m = torch.logsumexp(torch.stack([log_p + torch.log1p(-b), log_q + torch.log(b)]),
                                dim=0)
        terms = b * F.kl_div(log_m, log_q, reduction="none", log_target=True) + (1 - b) * \
            F.kl_div(log_m, log_p, reduction="none", log_target=True)
    return terms if labels is None else terms[labels != -100]


def _on_device_of(like, count):
    return count.to(like.device) if isinstance(count, torch.Tensor) else count


def gkd_compute_loss(student, teacher, inputs, beta, num_items_in_batch=None, **fused_options):
    """The loss TRL's ``GKDTrainer.compute_loss`` computes (the generalized JSD at temperature 1
    of the shifted logits, rows whose shifted label is -100 dropped, divided by their number or
    by ``num_items_in_batch``) through the fused lm_head: ``inputs`` holds ``input_ids``,
    ``attention_mask`` and ``labels`` (unshifted, TRL's collator). ``fused_options`` go to
    :func:`kdkernels.fused_linear_distillation_loss` (``chunk_size``, ``memory_budget``,
    ``backend``)."""
    labels = row_mask_target(inputs["labels"])
    options = _jsd_options(beta, 1.0)
    if num_items_in_batch is None:
        return distill_models_loss(student, teacher, inputs["input_ids"],
                                   inputs["attention_mask"], labels, reduction="mean",
                                   **options, **fused_options)
    total = distill_models_loss(student, teacher, inputs["input_ids"], inputs["attention_mask"],
                                labels, reduction="sum", **options, **fused_options)
    return total / _on_device_of(total, num_items_in_batch)


@functools.lru_cache(maxsize=None)
def gkd_trainer_class():
    """``KDKernelsGKDTrainer``: TRL's ``GKDTrainer`` (``trl.experimental.gkd``) whose
    ``compute_loss`` is :func:`gkd_compute_loss`. Everything else (on-policy generation with
    ``lmbda``, ``seq_kd``, the collator, logging) is TRL's. ``return_outputs=True`` returns no
    student outputs (there are no logits to return). The trainer's ``fused_options`` attribute
    (a dict, or None) goes to the fused loss."""
    from trl.experimental.gkd import GKDTrainer
    from trl.models.utils import _ForwardRedirection

    class KDKernelsGKDTrainer(GKDTrainer):
        fused_options = None

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            self.teacher_model.eval()
            unwrap = self.accelerator.unwrap_model  # the models' own classes (base_model, heads)
            student = unwrap(model)
            # through the wrapper's forward (DDP / FSDP), as TRL's DistillationTrainer does
            loss = _ForwardRedirection()(model, student, gkd_compute_loss, student,
                                         unwrap(self.teacher_model), inputs, self.beta,
                                         num_items_in_batch, **(self.fused_options or {}))
            return (loss, {}) if return_outputs else loss

    return KDKernelsGKDTrainer
