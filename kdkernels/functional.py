"""Distillation losses as functions, in the style of ``torch.nn.functional``.

Every loss except :func:`top_score_difference_loss` (a loss for training the teacher) is a thin
mapping of a paper's method onto the one fused primitive, :func:`distillation_loss`;
:func:`fused_linear_distillation_loss` is the same primitive fed from hidden states and an
lm_head in chunks, without the full logits. The methods and their defaults are specified in
docs/METHODS.md.
"""
import torch

from ._core import (
    DistillStats,
    check_options,
    check_reduction,
    distillation_loss,
    fit_teacher,
    reduce_rows,
)
from ._dtd import dtd_weights, temperature_from_weights
from ._fused_linear import fused_linear_distillation_loss
from ._options import DynamicTemperature, SparseTeacher
from ._vocab_parallel import (
    vocab_parallel_distillation_loss,
    vocab_parallel_fused_linear_distillation_loss,
)

__all__ = ["distillation_loss", "fused_linear_distillation_loss",
           "vocab_parallel_distillation_loss", "vocab_parallel_fused_linear_distillation_loss",
           "kd_loss", "tfkd_reg_loss",
           "dtd_temperature", "preparing_lessons_loss", "teacher_bias_loss", "teacher_bias_gamma",
           "top_score_difference_loss", "DynamicTemperature", "SparseTeacher", "DistillStats"]


def kd_loss(student_logits, teacher_logits, target=None, *, temperature=4.0, kd_weight=0.9,
            ce_weight=0.1, t2_scale=True, ignore_index=-100, reduction="mean",
            return_stats=False, backend="auto", padded_teacher=False):
    """Hinton et al.'s knowledge distillation::

        l_i = kd_weight * T^2 * KL(softmax(t_i / T) || softmax(s_i / T)) + ce_weight * CE(s_i, y_i)

    ``temperature`` is a float or a per-row tensor. Without ``target``, pass ``ce_weight=0``.
    See :func:`distillation_loss` for the shared arguments (``padded_teacher`` among them)."""
    return distillation_loss(student_logits, teacher_logits, target,
                             **kd_options(temperature, kd_weight, ce_weight, t2_scale),
                             ignore_index=ignore_index, reduction=reduction,
                             return_stats=return_stats, backend=backend,
                             padded_teacher=padded_teacher)


# Each method is a mapping of its hyper-parameters onto the primitive's options: one function
# per method, shared by the functional form and the module (which checks them at construction).

def kd_options(temperature=4.0, kd_weight=0.9, ce_weight=0.1, t2_scale=True):
    return dict(temperature=temperature, kd_weight=kd_weight, ce_weight=ce_weight,
                t2_scale=t2_scale)


def tfkd_reg_options(a=0.99, temperature=20.0, kd_weight=0.9, ce_weight=0.1):
    return dict(temperature=temperature, kd_weight=kd_weight, ce_weight=ce_weight,
                virtual_teacher=a)


def preparing_lessons_options(correction="swap", temperature=4.0, smooth_eps=0.1,
                              kd_weight=0.9, ce_weight=0.1):
    if correction not in ("swap", "smooth", None):
        raise ValueError(f"correction must be 'swap', 'smooth' or None for Preparing Lessons, "
                         f"got {correction!r}")
    return dict(temperature=temperature, kd_weight=kd_weight, ce_weight=ce_weight,
                correction=correction, smooth_eps=smooth_eps)


def teacher_bias_options(gamma, temperature=4.0, rectify=True):
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 <= gamma <= 1:
        raise ValueError(f"gamma must be a number in [0, 1], got {gamma!r}")
    return dict(temperature=temperature, kd_weight=1 - gamma, wrong_kd_weight=gamma,
                ce_weight=1 - gamma, correction="rectify" if rectify else None)


def tfkd_reg_loss(student_logits, target, *, a=0.99, temperature=20.0, kd_weight=0.9,
                  ce_weight=0.1, ignore_index=-100, reduction="mean", return_stats=False,
                  backend="auto"):
    """Teacher-free KD with a virtual teacher (Yuan et al., CVPR 2020), paper form::

        pd_j = a if j == y else (1 - a) / (C - 1)
        l_i = kd_weight * T^2 * KL(softmax(log(pd) / T) || softmax(s_i / T)) + ce_weight * CE

    The teacher is built from the labels inside the kernel; no teacher tensor exists. The paper
    takes ``a >= 0.9`` and a high temperature (defaults 0.99 and 20)."""
    return distillation_loss(student_logits, None, target,
                             **tfkd_reg_options(a, temperature, kd_weight, ce_weight),
                             ignore_index=ignore_index, reduction=reduction,
                             return_stats=return_stats, backend=backend)


def dtd_temperature(student_logits, teacher_logits, *, tau0=4.0, beta=1.0, weighting="cosine",
                    center=False, tau_min=1.0, target=None, ignore_index=-100,
                    padded_teacher=False):
    """The Dynamic Temperature Distillation temperature of each row ([...] from [..., C] logits).

    ``tau_i = tau0 - beta * w_i`` (``center=True``: ``tau0 + beta * (mean(w) - w_i)``, the mean
    over rows whose ``target`` is not ``ignore_index``), clamped at ``tau_min``; ``w`` as in
    :class:`DynamicTemperature`. Detached: no gradient flows through it. The fused losses compute
    the same temperatures in their kernels when given ``temperature=DynamicTemperature(...)``.
    ``padded_teacher`` as for :func:`distillation_loss`."""
    spec = DynamicTemperature(tau0=tau0, beta=beta, weighting=weighting, center=center,
                              tau_min=tau_min)
    check_options(padded_teacher=padded_teacher)
    teacher_logits = fit_teacher(teacher_logits, student_logits.shape[-1], padded_teacher)
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher_logits shape {tuple(teacher_logits.shape)} does not match "
                         f"student_logits shape {tuple(student_logits.shape)}")
    C = student_logits.shape[-1]
    s, t = student_logits.reshape(-1, C), teacher_logits.reshape(-1, C)
    valid = None if target is None else target.reshape(-1) != ignore_index
    w = dtd_weights(s, t, spec.weighting)
    tau = temperature_from_weights(w, spec.tau0, spec.beta, spec.center, spec.tau_min, valid)
    return tau.reshape(student_logits.shape[:-1])


def preparing_lessons_loss(student_logits, teacher_logits, target, *, correction="swap",
                           temperature=4.0, smooth_eps=0.1, kd_weight=0.9, ce_weight=0.1,
                           ignore_index=-100, reduction="mean", return_stats=False,
                           backend="auto", padded_teacher=False):
    """Preparing Lessons (Wen, Lai, Qian, 2021)::

        l_i = kd_weight * tau_i^2 * KL(A(q_tau_i) || p_tau_i) + ce_weight * CE(s_i, y_i)

    ``correction`` is the logits adjustment A: ``"swap"`` (Probability Shift), ``"smooth"``
    (label smoothing of wrong rows with ``smooth_eps``) or None. ``temperature`` is fixed (a
    float or per-row tensor) or dynamic (a :class:`DynamicTemperature`, or ``"cosine"`` /
    ``"max_prob"`` with the defaults tau0=4, beta=1, tau_min=1)."""
    return distillation_loss(student_logits, teacher_logits, target,
                             **preparing_lessons_options(correction, temperature, smooth_eps,
                                                         kd_weight, ce_weight),
                             ignore_index=ignore_index, reduction=reduction,
                             return_stats=return_stats, backend=backend,
                             padded_teacher=padded_teacher)


def teacher_bias_gamma(epoch, total_epochs):
    """The dynamic learning schedule gamma = epoch / total_epochs, in [0, 1]."""
    if isinstance(total_epochs, bool) or not isinstance(total_epochs, int) or total_epochs < 1:
        raise ValueError(f"total_epochs must be an int >= 1, got {total_epochs!r}")
    if not 0 <= epoch <= total_epochs:
        raise ValueError(f"epoch must be in [0, total_epochs={total_epochs}], got {epoch!r}")
    return epoch / total_epochs


def teacher_bias_loss(student_logits, teacher_logits, target, *, gamma=None, epoch=None,
                      total_epochs=None, temperature=4.0, rectify=True, ignore_index=-100,
                      reduction="mean", return_stats=False, backend="auto",
                      padded_teacher=False):
    """Distilling from the teacher's bias ("Can students beyond the teacher?", 2024)::

        l_i = (1 - gamma) * CE(s_i, y_i) + w_i * T^2 * KL(q'_T || p_T)
        w_i = 1 - gamma on rows the teacher gets right, gamma on rows it gets wrong

    ``q'`` is the rectified teacher on wrong rows (``rectify=False`` keeps q). Give ``gamma`` in
    [0, 1], or ``epoch`` and ``total_epochs`` for ``gamma = epoch / total_epochs``. Both KL parts
    are averaged over the same valid rows."""
    if gamma is None:
        if epoch is None or total_epochs is None:
            raise ValueError("give gamma, or epoch and total_epochs")
        gamma = teacher_bias_gamma(epoch, total_epochs)
    elif epoch is not None or total_epochs is not None:
        raise ValueError("give gamma, or epoch and total_epochs, not both")
    return distillation_loss(student_logits, teacher_logits, target,
                             **teacher_bias_options(gamma, temperature, rectify),
                             ignore_index=ignore_index, reduction=reduction,
                             return_stats=return_stats, backend=backend,
                             padded_teacher=padded_teacher)


def top_score_difference_loss(logits, target, *, eta=0.6, k=5, ignore_index=-100,
                              reduction="mean"):
    """Top Score Difference (Yang et al., AAAI 2019), a loss for training a tolerant teacher::

        f = softmax(logits),  l_i = eta * CE(logits_i, y_i) + (1 - eta) * (f_(1) - mean(f_(2..K)))

    with f_(1) >= f_(2) >= ... the sorted probabilities and K counting the top class (K is capped
    at C). Gradients flow through the top-K values. Plain torch: it is no distillation loss."""
    if not isinstance(logits, torch.Tensor) or not logits.dtype.is_floating_point:
        raise TypeError("logits must be a floating-point tensor")
    check_top_score_difference(eta, k, reduction)
    if target.shape != logits.shape[:-1]:
        raise ValueError(f"target must have shape {tuple(logits.shape[:-1])}, got "
                         f"{tuple(target.shape)}")
    C = logits.shape[-1]
    x = logits.reshape(-1, C)
    y = target.reshape(-1)
    ce = torch.nn.functional.cross_entropy(x, y, ignore_index=ignore_index, reduction="none")
    top = torch.softmax(x.float() if x.dtype in (torch.float16, torch.bfloat16) else x, -1)
    top = top.topk(min(k, C), -1).values
    gap = top[:, 0] - top[:, 1:].sum(-1) / max(min(k, C) - 1, 1)
    valid = y != ignore_index
    rows = torch.where(valid, eta * ce + (1 - eta) * gap, 0.0)
    if reduction == "none":
        return rows.reshape(target.shape)
    return reduce_rows(rows, reduction, valid.sum().clamp(min=1))


def check_top_score_difference(eta, k, reduction):
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0 <= eta <= 1:
        raise ValueError(f"eta must be in [0, 1], got {eta!r}")
    check_reduction(reduction)
