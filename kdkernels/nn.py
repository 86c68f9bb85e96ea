"""Distillation losses as ``torch.nn`` modules: thin holders of hyper-parameters that call
:mod:`kdkernels.functional`, in the manner of ``torch.nn.modules.loss``."""
import torch

from . import functional as F
from ._core import check_reduction
from ._options import DynamicTemperature

__all__ = ["DistillationLoss", "KDLoss", "TfKDRegLoss", "PreparingLessonsLoss", "TeacherBiasLoss",
           "TopScoreDifferenceLoss"]


class _Loss(torch.nn.Module):
    def __init__(self, ignore_index=-100, reduction="mean", backend="auto"):
        super().__init__()
        check_reduction(reduction)
        self.ignore_index, self.reduction, self.backend = ignore_index, reduction, backend

    def _common(self):
        return dict(ignore_index=self.ignore_index, reduction=self.reduction, backend=self.backend)

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in vars(self).items()
                         if not k.startswith("_") and k != "training")


class DistillationLoss(_Loss):
    """The general primitive as a module: every keyword of
    :func:`kdkernels.functional.distillation_loss` except the tensors. ``forward(student_logits,
    teacher_logits=None, target=None, temperature=None)``; a ``temperature`` given to forward
    (e.g. a per-row tensor) overrides the module's."""

    def __init__(self, temperature=4.0, kd_weight=0.9, ce_weight=0.1, wrong_kd_weight=None,
                 correction=None, smooth_eps=0.1, virtual_teacher=None, t2_scale=True,
                 ignore_index=-100, reduction="mean", backend="auto"):
        super().__init__(ignore_index, reduction, backend)
        self.temperature, self.kd_weight, self.ce_weight = temperature, kd_weight, ce_weight
        self.wrong_kd_weight, self.correction, self.smooth_eps = wrong_kd_weight, correction, smooth_eps
        self.virtual_teacher, self.t2_scale = virtual_teacher, t2_scale

    def forward(self, student_logits, teacher_logits=None, target=None, temperature=None,
                return_stats=False):
        return F.distillation_loss(
            student_logits, teacher_logits, target,
            temperature=self.temperature if temperature is None else temperature,
            kd_weight=self.kd_weight, ce_weight=self.ce_weight,
            wrong_kd_weight=self.wrong_kd_weight, correction=self.correction,
            smooth_eps=self.smooth_eps, virtual_teacher=self.virtual_teacher,
            t2_scale=self.t2_scale, return_stats=return_stats, **self._common())


class KDLoss(_Loss):
    """Hinton KD: ``kd_weight * T^2 * KL(q_T || p_T) + ce_weight * CE``. See
    :func:`kdkernels.functional.kd_loss`. ``forward(student_logits, teacher_logits, target=None)``."""

    def __init__(self, temperature=4.0, kd_weight=0.9, ce_weight=0.1, t2_scale=True,
                 ignore_index=-100, reduction="mean", backend="auto"):
        super().__init__(ignore_index, reduction, backend)
        self.temperature, self.kd_weight, self.ce_weight, self.t2_scale = (
            temperature, kd_weight, ce_weight, t2_scale)

    def forward(self, student_logits, teacher_logits, target=None, return_stats=False):
        return F.kd_loss(student_logits, teacher_logits, target, temperature=self.temperature,
                         kd_weight=self.kd_weight, ce_weight=self.ce_weight,
                         t2_scale=self.t2_scale, return_stats=return_stats, **self._common())


class TfKDRegLoss(_Loss):
    """Teacher-free KD with the virtual teacher built from labels. See
    :func:`kdkernels.functional.tfkd_reg_loss`. ``forward(student_logits, target)``."""

    def __init__(self, a=0.99, temperature=20.0, kd_weight=0.9, ce_weight=0.1, ignore_index=-100,
                 reduction="mean", backend="auto"):
        super().__init__(ignore_index, reduction, backend)
        self.a, self.temperature, self.kd_weight, self.ce_weight = a, temperature, kd_weight, ce_weight

    def forward(self, student_logits, target, return_stats=False):
        return F.tfkd_reg_loss(student_logits, target, a=self.a, temperature=self.temperature,
                               kd_weight=self.kd_weight, ce_weight=self.ce_weight,
                               return_stats=return_stats, **self._common())


class PreparingLessonsLoss(_Loss):
    """Preparing Lessons: logits adjustment (``correction="swap"`` or ``"smooth"``) and a fixed
    or dynamic temperature. ``temperature`` is a float, or ``"cosine"`` / ``"max_prob"`` / a
    :class:`kdkernels.DynamicTemperature` for Dynamic Temperature Distillation. See
    :func:`kdkernels.functional.preparing_lessons_loss`."""

    def __init__(self, correction="swap", temperature=4.0, smooth_eps=0.1, kd_weight=0.9,
                 ce_weight=0.1, ignore_index=-100, reduction="mean", backend="auto"):
        super().__init__(ignore_index, reduction, backend)
        if isinstance(temperature, str):
            temperature = DynamicTemperature(weighting=temperature)
        self.correction, self.temperature, self.smooth_eps = correction, temperature, smooth_eps
        self.kd_weight, self.ce_weight = kd_weight, ce_weight

    def forward(self, student_logits, teacher_logits, target, return_stats=False):
        return F.preparing_lessons_loss(
            student_logits, teacher_logits, target, correction=self.correction,
            temperature=self.temperature, smooth_eps=self.smooth_eps, kd_weight=self.kd_weight,
            ce_weight=self.ce_weight, return_stats=return_stats, **self._common())


class TeacherBiasLoss(_Loss):
    """Distilling from the teacher's bias, with its dynamic learning schedule. Give ``gamma``
    (fixed), or ``total_epochs`` and call :meth:`set_epoch` each epoch (gamma = epoch /
    total_epochs, starting at 0). See :func:`kdkernels.functional.teacher_bias_loss`."""

    def __init__(self, gamma=None, total_epochs=None, temperature=4.0, rectify=True,
                 ignore_index=-100, reduction="mean", backend="auto"):
        super().__init__(ignore_index, reduction, backend)
        if (gamma is None) == (total_epochs is None):
            raise ValueError("give exactly one of gamma and total_epochs")
        self.total_epochs, self.temperature, self.rectify = total_epochs, temperature, rectify
        self.epoch = 0
        self.gamma = gamma if gamma is not None else F.teacher_bias_gamma(0, total_epochs)

    def set_epoch(self, epoch):
        if self.total_epochs is None:
            raise RuntimeError("set_epoch needs total_epochs; this loss was built with a fixed gamma")
        self.gamma = F.teacher_bias_gamma(epoch, self.total_epochs)
        self.epoch = epoch

    def forward(self, student_logits, teacher_logits, target, return_stats=False):
        return F.teacher_bias_loss(student_logits, teacher_logits, target, gamma=self.gamma,
                                   temperature=self.temperature, rectify=self.rectify,
                                   return_stats=return_stats, **self._common())


class TopScoreDifferenceLoss(_Loss):
    """Top Score Difference, for training a tolerant teacher. See
    :func:`kdkernels.functional.top_score_difference_loss`. ``forward(logits, target)``."""

    def __init__(self, eta=0.6, k=5, ignore_index=-100, reduction="mean"):
        super().__init__(ignore_index, reduction, "torch")
        self.eta, self.k = eta, k

    def forward(self, logits, target):
        return F.top_score_difference_loss(logits, target, eta=self.eta, k=self.k,
                                           ignore_index=self.ignore_index,
                                           reduction=self.reduction)
