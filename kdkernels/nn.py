"""Distillation losses as ``torch.nn`` modules: thin holders of hyper-parameters that call
:mod:`kdkernels.functional`, in the manner of ``torch.nn.modules.loss``. Each module checks its
hyper-parameters when it is built, with the messages of the functional form."""
import torch

from . import functional as F
from ._core import check_options
from ._fused_linear import check_chunking, check_softcap
from ._options import DynamicTemperature

__all__ = ["DistillationLoss", "FusedLinearDistillationLoss", "KDLoss", "TfKDRegLoss",
           "PreparingLessonsLoss", "TeacherBiasLoss", "TopScoreDifferenceLoss"]


class _Loss(torch.nn.Module):
    """Holds the primitive's options (``self.options``, checked here) and the shared keywords."""

    def __init__(self, options, ignore_index=-100, reduction="mean", backend="auto",
                 padded_teacher=False):
        super().__init__()
        self.padded_teacher = padded_teacher
        self._set_options(options, ignore_index, reduction, backend)
        self.ignore_index, self.reduction, self.backend = ignore_index, reduction, backend

    def _set_options(self, options, ignore_index, reduction, backend):
        options = dict(options, padded_teacher=self.padded_teacher)
        check_options(**options, ignore_index=ignore_index, reduction=reduction, backend=backend)
        self._options = options

    def primitive_options(self):
        """The keywords of :func:`kdkernels.functional.distillation_loss` this module calls it
        with (its hyper-parameters as the method maps them, ignore_index, reduction): e.g. for
        :func:`kdkernels.vocab_parallel_distillation_loss`."""
        return dict(self._options, ignore_index=self.ignore_index, reduction=self.reduction)

    def _loss(self, student_logits, teacher_logits, target, return_stats, **overrides):
        return F.distillation_loss(student_logits, teacher_logits, target,
                                   **dict(self._options, **overrides),
                                   ignore_index=self.ignore_index, reduction=self.reduction,
                                   return_stats=return_stats, backend=self.backend)

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in vars(self).items()
                         if not k.startswith("_") and k != "training")


class DistillationLoss(_Loss):
    """The general primitive as a module: every keyword of
    :func:`kdkernels.functional.distillation_loss` except the tensors. ``forward(student_logits,
    teacher_logits=None, target=None, temperature=None)``; ``teacher_logits`` may be a
    :class:`kdkernels.SparseTeacher`; a ``temperature`` given to forward (e.g. a per-row tensor)
    overrides the module's. ``padded_teacher=True``: a teacher wider than the student by
    vocabulary padding (docs/METHODS.md, "Mismatched vocabularies")."""

    def __init__(self, temperature=4.0, kd_weight=0.9, ce_weight=0.1, wrong_kd_weight=None,
                 correction=None, smooth_eps=0.1, virtual_teacher=None, t2_scale=True,
                 divergence="kl", jsd_beta=0.5, skew_alpha=0.1, ignore_index=-100,
                 reduction="mean", backend="auto", padded_teacher=False):
        super().__init__(dict(temperature=temperature, kd_weight=kd_weight, ce_weight=ce_weight,
                              wrong_kd_weight=wrong_kd_weight, correction=correction,
                              smooth_eps=smooth_eps, virtual_teacher=virtual_teacher,
                              t2_scale=t2_scale, divergence=divergence, jsd_beta=jsd_beta,
                              skew_alpha=skew_alpha), ignore_index, reduction, backend,
                         padded_teacher)
        self.temperature, self.kd_weight, self.ce_weight = temperature, kd_weight, ce_weight
        self.wrong_kd_weight, self.correction = wrong_kd_weight, correction
        self.smooth_eps = smooth_eps
        self.virtual_teacher, self.t2_scale = virtual_teacher, t2_scale
        self.divergence, self.jsd_beta, self.skew_alpha = divergence, jsd_beta, skew_alpha

    def forward(self, student_logits, teacher_logits=None, target=None, temperature=None,
                return_stats=False):
        overrides = {} if temperature is None else {"temperature": temperature}
        return self._loss(student_logits, teacher_logits, target, return_stats, **overrides)


class FusedLinearDistillationLoss(DistillationLoss):
    """The primitive fed from hidden states and an lm_head, in chunks of rows, without the full
    logits: :func:`kdkernels.functional.fused_linear_distillation_loss`. The keywords of
    :class:`DistillationLoss`, plus ``chunk_size`` (rows) or ``memory_budget`` (bytes), and
    ``logit_softcap`` / ``teacher_logit_softcap`` (each model's final logit soft-cap, e.g.
    Gemma 2's ``final_logit_softcapping``). ``forward(student_hidden, student_weight,
    teacher=None, target=None, *, student_bias=None, teacher_weight=None, teacher_bias=None,
    temperature=None, return_stats=False)``, the teacher as hidden states (with
    ``teacher_weight``), logits, or a :class:`kdkernels.SparseTeacher`."""

    def __init__(self, *args, chunk_size=None, memory_budget=None, logit_softcap=None,
                 teacher_logit_softcap=None, **kwargs):
        super().__init__(*args, **kwargs)
        check_chunking(chunk_size, memory_budget)
        check_softcap("logit_softcap", logit_softcap)
        check_softcap("teacher_logit_softcap", teacher_logit_softcap)
        self.chunk_size, self.memory_budget = chunk_size, memory_budget
        self.logit_softcap, self.teacher_logit_softcap = logit_softcap, teacher_logit_softcap

    def forward(self, student_hidden, student_weight, teacher=None, target=None, *,
                student_bias=None, teacher_weight=None, teacher_bias=None, temperature=None,
                return_stats=False):
        options = dict(self._options)
        if temperature is not None:
            options["temperature"] = temperature
        return F.fused_linear_distillation_loss(
            student_hidden, student_weight, teacher, target, student_bias=student_bias,
            teacher_weight=teacher_weight, teacher_bias=teacher_bias, **options,
            ignore_index=self.ignore_index, reduction=self.reduction, return_stats=return_stats,
            backend=self.backend, chunk_size=self.chunk_size, memory_budget=self.memory_budget,
            logit_softcap=self.logit_softcap, teacher_logit_softcap=self.teacher_logit_softcap)


class KDLoss(_Loss):
    """Hinton KD: ``kd_weight * T^2 * KL(q_T || p_T) + ce_weight * CE``. See
    :func:`kdkernels.functional.kd_loss`.
    ``forward(student_logits, teacher_logits, target=None)``."""

    def __init__(self, temperature=4.0, kd_weight=0.9, ce_weight=0.1, t2_scale=True,
                 ignore_index=-100, reduction="mean", backend="auto", padded_teacher=False):
        super().__init__(F.kd_options(temperature, kd_weight, ce_weight, t2_scale),
                         ignore_index, reduction, backend, padded_teacher)
        self.temperature, self.kd_weight, self.ce_weight, self.t2_scale = (
            temperature, kd_weight, ce_weight, t2_scale)

    def forward(self, student_logits, teacher_logits, target=None, return_stats=False):
        return self._loss(student_logits, teacher_logits, target, return_stats)


class TfKDRegLoss(_Loss):
    """Teacher-free KD with the virtual teacher built from labels. See
    :func:`kdkernels.functional.tfkd_reg_loss`. ``forward(student_logits, target)``."""

    def __init__(self, a=0.99, temperature=20.0, kd_weight=0.9, ce_weight=0.1, ignore_index=-100,
                 reduction="mean", backend="auto"):
        super().__init__(F.tfkd_reg_options(a, temperature, kd_weight, ce_weight),
                         ignore_index, reduction, backend)
        self.a, self.temperature = a, temperature
        self.kd_weight, self.ce_weight = kd_weight, ce_weight

    def forward(self, student_logits, target, return_stats=False):
        return self._loss(student_logits, None, target, return_stats)


class PreparingLessonsLoss(_Loss):
    """Preparing Lessons: logits adjustment (``correction="swap"`` or ``"smooth"``) and a fixed
    or dynamic temperature. ``temperature`` is a float, or ``"cosine"`` / ``"max_prob"`` / a
    :class:`kdkernels.DynamicTemperature` for Dynamic Temperature Distillation. See
    :func:`kdkernels.functional.preparing_lessons_loss`."""

    def __init__(self, correction="swap", temperature=4.0, smooth_eps=0.1, kd_weight=0.9,
                 ce_weight=0.1, ignore_index=-100, reduction="mean", backend="auto",
                 padded_teacher=False):
        if isinstance(temperature, str) and temperature in ("cosine", "max_prob"):
            temperature = DynamicTemperature(weighting=temperature)
        super().__init__(F.preparing_lessons_options(correction, temperature, smooth_eps,
                                                     kd_weight, ce_weight),
                         ignore_index, reduction, backend, padded_teacher)
        self.correction, self.temperature, self.smooth_eps = correction, temperature, smooth_eps
        self.kd_weight, self.ce_weight = kd_weight, ce_weight

    def forward(self, student_logits, teacher_logits, target, return_stats=False):
        return self._loss(student_logits, teacher_logits, target, return_stats)


class TeacherBiasLoss(_Loss):
    """Distilling from the teacher's bias, with its dynamic learning schedule. Give ``gamma``
    (fixed), or ``total_epochs`` and call :meth:`set_epoch` each epoch (gamma = epoch /
    total_epochs, starting at 0). See :func:`kdkernels.functional.teacher_bias_loss`."""

    def __init__(self, gamma=None, total_epochs=None, temperature=4.0, rectify=True,
                 ignore_index=-100, reduction="mean", backend="auto", padded_teacher=False):
        if (gamma is None) == (total_epochs is None):
            raise ValueError("give exactly one of gamma and total_epochs")
        if gamma is None:
            gamma = F.teacher_bias_gamma(0, total_epochs)
        super().__init__(F.teacher_bias_options(gamma, temperature, rectify),
                         ignore_index, reduction, backend, padded_teacher)
        self.total_epochs, self.temperature, self.rectify = total_epochs, temperature, rectify
        self.epoch, self.gamma = 0, gamma

    def set_epoch(self, epoch):
        if self.total_epochs is None:
            raise RuntimeError("set_epoch needs total_epochs; this loss was built with a fixed "
                               "gamma")
        self.gamma = F.teacher_bias_gamma(epoch, self.total_epochs)
        self.epoch = epoch
        self._set_options(F.teacher_bias_options(self.gamma, self.temperature, self.rectify),
                          self.ignore_index, self.reduction, self.backend)

    def forward(self, student_logits, teacher_logits, target, return_stats=False):
        return self._loss(student_logits, teacher_logits, target, return_stats)


class TopScoreDifferenceLoss(torch.nn.Module):
    """Top Score Difference, for training a tolerant teacher. See
    :func:`kdkernels.functional.top_score_difference_loss`. ``forward(logits, target)``."""

    def __init__(self, eta=0.6, k=5, ignore_index=-100, reduction="mean"):
        super().__init__()
        F.check_top_score_difference(eta, k, reduction)
        self.eta, self.k, self.ignore_index, self.reduction = eta, k, ignore_index, reduction

    def forward(self, logits, target):
        return F.top_score_difference_loss(logits, target, eta=self.eta, k=self.k,
                                           ignore_index=self.ignore_index,
                                           reduction=self.reduction)

    def extra_repr(self):
        return f"eta={self.eta}, k={self.k}, ignore_index={self.ignore_index}, " \
               f"reduction={self.reduction!r}"
