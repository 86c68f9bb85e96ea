"""The one general primitive: validate once, pick a backend, run it under one autograd Function."""
import math
from dataclasses import replace
from typing import NamedTuple, Optional

import torch

from . import ops as _ops
from ._dtd import dtd_weights, temperature_from_weights
from ._options import (
    CORRECTIONS,
    DIVERGENCE_KL,
    DIVERGENCE_REVERSE_KL,
    DIVERGENCES,
    FLAG_STILL_WRONG,
    FLAG_TEACHER_CORRECT,
    REDUCTION_CODES,
    REDUCTION_NONE,
    REDUCTIONS,
    TEMP_COSINE,
    TEMP_MAX_PROB,
    TEMP_ROWS,
    TEMP_SCALAR,
    WEIGHTINGS,
    DynamicTemperature,
    FusedOptions,
    SparseTeacher,
)
from .ops._rows import unit_stride

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class DistillStats(NamedTuple):
    """Per-row statistics for logging, shaped like the labels (all detached).

    teacher_correct: bool, the teacher's argmax is the label (a tie counts as correct); False on
        ignored rows; None without labels.
    temperature: the temperature used for each row (fixed, given, or dynamic).
    still_wrong: bool, a row the teacher got wrong whose corrected target still puts more mass on
        another class than on the label (only "rectify" can leave such rows); None without labels.
    """
    teacher_correct: Optional[torch.Tensor]
    temperature: torch.Tensor
    still_wrong: Optional[torch.Tensor]


class _FusedDistill(torch.autograd.Function):
    """Forward runs the backend, which writes the loss (per row, or summed or averaged over the
    rows that count by the kernel itself) and its gradient in one pass; the backward only scales
    that gradient by the upstream one, in place unless the graph is retained. A backend with a
    ``gradient`` function (Triton) instead leaves O(1) values per row in the forward and writes
    the gradient, already scaled by the upstream gradient, in the backward."""

    @staticmethod
    def forward(ctx, student, teacher, teacher_indices, target, temp_rows, backend, options):
        ctx.set_materialize_grads(False)  # no zeros made for the stats' (absent) gradients
        ctx.backend, ctx.options = backend, options
        ctx.deferred = hasattr(backend, "gradient")
        if ctx.deferred:  # the backward's kernel writes the gradient (Triton)
            loss, state, temperature, flags = backend.forward_deferred(
                student, teacher, target, temp_rows, options, teacher_indices)
            ctx.save_for_backward(student, teacher, teacher_indices, *state)
        else:
            loss, grad, temperature, flags = backend.forward(
                student, teacher, target, temp_rows, options, teacher_indices)
            ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(temperature, flags)
        return loss, temperature, flags

    @staticmethod
    def backward(ctx, grad_loss, _grad_temperature, _grad_flags):
        if grad_loss is None:
            return (None,) * 7
        if ctx.deferred:
            student, teacher, teacher_indices, *state = ctx.saved_tensors
            grad = ctx.backend.gradient(student, teacher, state, grad_loss, ctx.options,
                                        teacher_indices)
            return grad, None, None, None, None, None, None
        (grad,) = ctx.saved_tensors
        per_row = grad_loss.dim() == 1  # "none"
        return (*scale_saved((grad,), grad_loss, per_row), None, None, None, None, None, None)


def scale_saved(grads, grad_loss, per_row=False, count=None):
    """The backward shared by every path whose forward wrote the gradients (the primitive, the
    fused linear and vocab-parallel forms): each times the upstream gradient, per row
    (``grad_loss`` [N] against [N, ...]) where ``per_row``, divided by ``count`` for a "mean"
    the kernel did not take. In place on the saved tensor's last use (no second N x C buffer);
    while the graph lives on (retain_graph, gradcheck, a compiled graph) a new tensor, since
    autograd may accumulate into what is returned."""
    scale = grad_loss.reshape(-1, 1) if per_row else grad_loss
    if count is not None:
        scale = scale / count
    keep = (torch.compiler.is_compiling()
            or torch._C._autograd._get_current_graph_task_keep_graph())
    if scale.dim() == 0 and _host_scalars(scale) and scale.item() == 1.0:
        return tuple(g.clone() if keep and g is not None else g for g in grads)
    return tuple(None if g is None else (g * scale.to(g.dtype) if keep
                                         else g.mul_(scale.to(g.dtype))) for g in grads)


def check_reduction(reduction):
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def reduce_rows(loss_rows, reduction, count=None):
    """Per-row losses (0 on ignored rows) to the requested reduction; "mean" divides by `count`,
    the number of rows that count (a tensor, so no host sync)."""
    if reduction == "none":
        return loss_rows
    if reduction == "sum":
        return loss_rows.sum()
    return loss_rows.sum() / count


def _check_number(name, value, low=None, low_inclusive=True, high=None):
    # comparisons, not math.isfinite: they also work on the SymFloats of torch.compile(dynamic=True)
    number = isinstance(value, (int, float, torch.SymInt, torch.SymFloat))
    if isinstance(value, bool) or not number or not -math.inf < value < math.inf:
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if low is not None and (value < low or (value == low and not low_inclusive)):
        raise ValueError(f"{name} must be {'>=' if low_inclusive else '>'} {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")


def _host_scalars(tensor):
    """Reading a value of this tensor costs no device sync and no graph break."""
    return tensor.device.type == "cpu" and not torch.compiler.is_compiling()


def check_options(*, temperature=4.0, kd_weight=0.9, ce_weight=0.1, wrong_kd_weight=None,
                  correction=None, smooth_eps=0.1, virtual_teacher=None, t2_scale=True,
                  divergence="kl", jsd_beta=0.5, skew_alpha=0.1, ignore_index=-100,
                  reduction="mean", backend="auto", padded_teacher=False):
    """Checks the primitive's hyper-parameters (everything but the tensors), with the messages
    the functions and the modules (at construction) share."""
    check_reduction(reduction)
    if correction not in CORRECTIONS:
        raise ValueError(f"correction must be one of {tuple(CORRECTIONS)}, got {correction!r}")
    for name, value in (("kd_weight", kd_weight), ("ce_weight", ce_weight)):
        _check_number(name, value)
    if wrong_kd_weight is not None:
        _check_number("wrong_kd_weight", wrong_kd_weight)
    _check_number("smooth_eps", smooth_eps, low=0, high=1)
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {tuple(DIVERGENCES)}, got {divergence!r}")
    _check_number("jsd_beta", jsd_beta, low=0, high=1)
    _check_number("skew_alpha", skew_alpha, low=0, high=1)
    if virtual_teacher is not None:
        _check_number("virtual_teacher", virtual_teacher, low=0, low_inclusive=False, high=1)
    for name, flag in (("t2_scale", t2_scale), ("padded_teacher", padded_teacher)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {flag!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if backend != "auto" and backend not in _ops.NAMES:
        raise ValueError(f"backend must be 'auto' or one of {_ops.NAMES}, got {backend!r}")
    if isinstance(temperature, str):
        if temperature not in WEIGHTINGS:
            raise ValueError(f"temperature as a string must be one of {WEIGHTINGS} (a dynamic "
                             f"temperature), got {temperature!r}")
    elif not isinstance(temperature, (DynamicTemperature, torch.Tensor)):
        _check_number("temperature", temperature, low=0, low_inclusive=False)


def _check_labels(target, lead, C, ignore_index, device):
    if not isinstance(target, torch.Tensor) or target.dtype.is_floating_point \
            or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(f"target must be an integer tensor of labels, got "
                        f"{getattr(target, 'dtype', type(target))}")
    if target.shape != lead:
        raise ValueError(f"target must have shape {tuple(lead)} (student_logits without its "
                         f"class dimension), got {tuple(target.shape)}")
    if target.device != device:
        raise ValueError(f"target is on {target.device} but student_logits on {device}")
    if _host_scalars(target) and target.numel():
        low, high = (x.tolist() for x in torch.aminmax(target))  # one op in the common case
        if low < 0 or high >= C:
            bad = (target != ignore_index) & ((target < 0) | (target >= C))
            if bool(bad.any()):
                raise ValueError(f"target holds labels outside [0, {C}) that are not "
                                 f"ignore_index={ignore_index}: e.g. {int(target[bad][0])}")


def _check_teacher(teacher, student):
    lead = student.shape[:-1]
    if isinstance(teacher, torch.Tensor) and not teacher.dtype.is_floating_point \
            and teacher.shape == lead:
        raise TypeError(f"teacher_logits is an integer tensor of shape {tuple(lead)}: labels? "
                        "Pass the teacher's logits second and the labels third")
    if not isinstance(teacher, torch.Tensor) or teacher.dtype not in _FLOATS:
        raise TypeError("teacher_logits must be a floating-point tensor, got "
                        f"{getattr(teacher, 'dtype', type(teacher))}")
    if teacher.shape != student.shape:
        raise ValueError(f"teacher_logits shape {tuple(teacher.shape)} does not match "
                         f"student_logits shape {tuple(student.shape)}")
    if teacher.device != student.device:
        raise ValueError(f"teacher_logits is on {teacher.device} but student_logits "
                         f"on {student.device}")


# Embedding padding rounds a vocabulary up to a multiple of 8 at least (64 and 128 are usual,
# Megatron's 128 x tensor-parallel size too); a wider teacher of another width has real tokens.
PADDING_MULTIPLE = 8


def check_padded_width(name, width, C, padded_teacher, student="student_logits"):
    """Whether a teacher `width` classes wide may stand for the student's C classes
    (docs/METHODS.md, "Mismatched vocabularies"): equal widths, or, with padded_teacher=True, a
    wider teacher whose width is a multiple of PADDING_MULTIPLE. Raises a ValueError naming both
    widths otherwise."""
    if width == C:
        return
    if width < C:
        raise ValueError(f"{name} has {width} classes, fewer than the {C} of {student}: a "
                         "teacher narrower than the student is not supported (padded_teacher "
                         "drops the padding columns of a wider teacher only)")
    if not padded_teacher:
        raise ValueError(f"{name} has {width} classes but {student} has {C}: if the teacher's "
                         f"columns from {C} on are vocabulary padding, pass padded_teacher=True "
                         "(they are dropped)")
    if width % PADDING_MULTIPLE:
        raise ValueError(f"padded_teacher=True, but {name} has {width} classes ({student}: {C}), "
                         f"not a multiple of {PADDING_MULTIPLE} as padded vocabularies are: its "
                         "extra classes look like real tokens, not padding")


def fit_teacher(teacher, C, padded_teacher, name="teacher_logits", student="student_logits"):
    """The teacher over the student's C classes: with padded_teacher=True, a wider dense teacher
    as a view of its first C columns (no copy), a SparseTeacher with its slots at classes >= C
    made unused. Any other teacher is returned as it is, for the usual checks."""
    if isinstance(teacher, SparseTeacher):
        return _fit_sparse_teacher(teacher, C, padded_teacher, student)
    if not isinstance(teacher, torch.Tensor) or not teacher.dtype.is_floating_point \
            or teacher.dim() < 1 or teacher.shape[-1] == C:
        return teacher  # not logits (refused by the checks), or nothing to cut
    check_padded_width(name, teacher.shape[-1], C, padded_teacher, student)
    return teacher[..., :C]


def _fit_sparse_teacher(teacher, C, padded_teacher, student):
    """fit_teacher for a SparseTeacher. Its indices alone cannot tell padding from real classes
    past C, so padding needs the teacher's width: vocab_size, held to the dense teacher's rule."""
    width = teacher.vocab_size
    if width is None:
        if padded_teacher:
            raise ValueError(f"padded_teacher=True with a SparseTeacher needs its vocab_size, the "
                             f"teacher's vocabulary width: without it a class >= {C} ({student}'s "
                             "width) cannot be told from padding. Pass SparseTeacher(indices, "
                             "values, tail, vocab_size=...)")
        return teacher
    if isinstance(width, bool) or not isinstance(width, (int, torch.SymInt)) or width < 1:
        raise TypeError(f"SparseTeacher.vocab_size must be an int >= 1 (the teacher's vocabulary "
                        f"width) or None, got {width!r}")
    check_padded_width("SparseTeacher.vocab_size", width, C, padded_teacher, student)
    indices = teacher.indices
    if not isinstance(indices, torch.Tensor) or indices.dtype.is_floating_point \
            or indices.dtype == torch.bool:
        return teacher  # refused by _check_sparse_teacher
    # value checks on CPU only: on CUDA they would cost a sync (an index >= C is then unused)
    if _host_scalars(indices) and indices.numel() and bool((indices >= width).any()):
        raise ValueError(f"SparseTeacher.indices holds classes >= its vocab_size {width}: e.g. "
                         f"{int(indices[indices >= width][0])}")
    if width == C:
        return teacher
    return replace(teacher, indices=indices.masked_fill(indices >= C, -1), vocab_size=C)


def _check_sparse_teacher(teacher, student):
    lead, C = student.shape[:-1], student.shape[-1]
    indices, values = teacher.indices, teacher.values
    if not isinstance(indices, torch.Tensor) or indices.dtype.is_floating_point \
            or indices.dtype == torch.bool:
        raise TypeError(f"SparseTeacher.indices must be an integer tensor, got "
                        f"{getattr(indices, 'dtype', type(indices))}")
    if not isinstance(values, torch.Tensor) or values.dtype not in _FLOATS:
        raise TypeError(f"SparseTeacher.values must be a floating-point tensor, got "
                        f"{getattr(values, 'dtype', type(values))}")
    if indices.dim() != len(lead) + 1 or indices.shape[:-1] != lead or indices.shape[-1] < 1:
        raise ValueError(f"SparseTeacher.indices must have shape {tuple(lead)} + (k,), k >= 1 "
                         f"(the student's rows), got {tuple(indices.shape)}")
    if values.shape != indices.shape:
        raise ValueError(f"SparseTeacher.values shape {tuple(values.shape)} does not match "
                         f"its indices {tuple(indices.shape)}")
    for name, x in (("indices", indices), ("values", values)):
        if x.device != student.device:
            raise ValueError(f"SparseTeacher.{name} is on {x.device} but student_logits on "
                             f"{student.device}")
    if not _host_scalars(indices) or not indices.numel():
        return  # on CUDA these checks would cost a sync: out-of-range indices count as unused
    if bool((indices >= C).any()):
        raise ValueError(f"SparseTeacher.indices holds classes >= {C}, the student's width: "
                         f"e.g. {int(indices[indices >= C][0])}; if they are the teacher's "
                         "vocabulary padding, pass padded_teacher=True and the teacher's width "
                         "as SparseTeacher(..., vocab_size=) (such slots are unused)")
    ordered = indices.reshape(-1, indices.shape[-1]).sort(-1).values
    if bool(((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)).any()):
        raise ValueError("SparseTeacher.indices repeats a class within a row")
    if teacher.tail:
        used = indices >= 0
        mass = torch.where(used, values.double().exp(), 0.0).sum(-1)
        slack = max(1e-4, 2 * torch.finfo(values.dtype).eps)  # values rounded to their dtype
        if bool((torch.where(used, values, 0.0) > slack).any()) or bool((mass > 1 + slack).any()):
            raise ValueError("SparseTeacher(tail=True) takes log-probabilities: values <= 0 whose "
                             f"exponentials sum to at most 1 per row (largest sum "
                             f"{float(mass.max()):.6g})")


def _check_temperature_rows(temperature, lead, device):
    if not temperature.dtype.is_floating_point:
        raise TypeError(f"temperature tensor must be floating point, got {temperature.dtype}")
    if temperature.shape != lead:
        raise ValueError(f"temperature tensor must have one value per row, shape "
                         f"{tuple(lead)}, got {tuple(temperature.shape)}")
    if temperature.device != device:
        raise ValueError(f"temperature is on {temperature.device} but student_logits on {device}")
    if _host_scalars(temperature) and not bool((temperature > 0).all()):
        raise ValueError("temperature values must all be > 0")


def distillation_loss(student_logits, teacher_logits=None, target=None, *, temperature=4.0,
                      kd_weight=0.9, ce_weight=0.1, wrong_kd_weight=None, correction=None,
                      smooth_eps=0.1, virtual_teacher=None, t2_scale=True, divergence="kl",
                      jsd_beta=0.5, skew_alpha=0.1, ignore_index=-100, reduction="mean",
                      return_stats=False, backend="auto", padded_teacher=False):
    r"""The general distillation primitive every method of kdkernels is built on.

    Per row i (the last dimension holds the C classes; leading dimensions are rows)::

        l_i = w_i * T_i^2 * D(A(q_i), p_i) + ce_weight * CE(s_i, y_i)
        p_i = softmax(s_i / T_i),  q_i = softmax(t_i / T_i)

    with ``w_i = kd_weight`` where the teacher is right (or without labels) and ``wrong_kd_weight``
    where it is wrong (its argmax is not the label), ``A`` the teacher correction and ``D`` the
    divergence, ``KL(q || p)`` by default.

    Args:
        student_logits: [..., C] float16 / bfloat16 / float32 / float64; receives the gradient.
        teacher_logits: [..., C] logits, any of those dtypes (may differ from the student's);
            ``-inf`` marks a masked class. No gradient flows to the teacher. Or a
            :class:`SparseTeacher` (top-k indices and values, no dense teacher). Omit it only
            with ``virtual_teacher``.
        target: [...] integer labels in [0, C) or ``ignore_index``. Needed by ``ce_weight != 0``,
            a correction, ``wrong_kd_weight`` and ``virtual_teacher``.
        temperature: a float > 0, a [...] tensor of per-row temperatures > 0, a
            :class:`DynamicTemperature`, or ``"cosine"`` / ``"max_prob"`` for a default one.
            No gradient flows through it.
        kd_weight, ce_weight: weights of the KD and cross-entropy (at T=1) terms.
        wrong_kd_weight: KD weight on rows the teacher gets wrong (default: ``kd_weight``).
        correction: None, ``"swap"`` (exchange the teacher's values at the label and its argmax),
            ``"smooth"`` (the target of a wrong row becomes ``(1-eps) onehot(y) + eps/C``) or
            ``"rectify"`` (the teacher's-bias rectification of q_T). Applied to wrong rows only.
        smooth_eps: eps of ``"smooth"``, in [0, 1].
        virtual_teacher: ``a`` in (0, 1]: Tf-KD reg's teacher built from the labels
            (``pd_y = a``, ``(1-a)/(C-1)`` elsewhere), softened at T; no teacher tensor is read.
        t2_scale: multiply the KD term by T^2 (default True).
        divergence: ``"kl"`` (forward, ``KL(q || p)``), ``"reverse_kl"`` (``KL(p || q)``),
            ``"jsd"`` (TRL's generalized JSD with ``jsd_beta``: ``beta KL(q || m) + (1 - beta)
            KL(p || m)``, ``m = beta q + (1 - beta) p``; beta 0 and 1 give the two KLs),
            ``"skew_kl"`` (DistiLLM, ``KL(q || a q + (1 - a) p)``, a = ``skew_alpha``),
            ``"skew_reverse_kl"`` (``KL(p || a p + (1 - a) q)``) or ``"tv"`` (total variation).
        jsd_beta, skew_alpha: in [0, 1].
        ignore_index: label of rows that count for nothing (loss 0, gradient 0).
        reduction: ``"mean"`` (over rows whose label is not ignored; every row without labels),
            ``"sum"``, or ``"none"`` (shape [...], 0 on ignored rows).
        return_stats: also return a :class:`DistillStats`.
        backend: ``"auto"`` (Triton on CUDA, C++ on CPU when built, else pure torch), ``"triton"``,
            ``"cpp"`` or ``"torch"``. See :func:`kdkernels.backends`.
        padded_teacher: the teacher's vocabulary is the student's plus padding: a teacher wider
            than the student ([..., V_t], V_t a multiple of 8) is read over its first C columns
            (a view), and a :class:`SparseTeacher` (which must then give its ``vocab_size``,
            V_t) has its slots at classes >= C unused. Without it, a width mismatch is an
            error. docs/METHODS.md, "Mismatched vocabularies".

    Returns the loss (float32, or float64 for float64 inputs), and the stats if asked.

    Values inside tensors (label range, temperatures > 0) are checked for CPU tensors; on CUDA the
    check would cost a device sync, and a bad value instead makes its row's loss NaN.
    """
    hyper = dict(kd_weight=kd_weight, ce_weight=ce_weight, wrong_kd_weight=wrong_kd_weight,
                 correction=correction, smooth_eps=smooth_eps, virtual_teacher=virtual_teacher,
                 t2_scale=t2_scale, divergence=divergence, jsd_beta=jsd_beta,
                 skew_alpha=skew_alpha, ignore_index=ignore_index)
    key = _checked(temperature, reduction, backend, dict(hyper, padded_teacher=padded_teacher))
    s = student_logits
    check_floating("student_logits", s)
    if s.dim() < 1 or s.shape[-1] < 1:
        raise ValueError(f"student_logits must have shape [..., C] with C >= 1, got "
                         f"{tuple(s.shape)}")
    teacher_logits = fit_teacher(teacher_logits, s.shape[-1], padded_teacher)
    temperature = check_tensors(s, teacher_logits, target, temperature, **hyper)
    plan = _plan(s, teacher_logits, target, temperature, reduction, backend, hyper, key)
    loss, temperature_used, flags = _run(plan, reduction)
    return finish(loss, temperature_used, flags, s.shape[:-1], reduction, return_stats,
                  target is not None)


def finish(loss, temperature, flags, lead, reduction, return_stats, labelled):
    """What the losses return: the loss shaped like the rows for "none", and the stats."""
    if reduction == "none" and loss.shape != lead:
        loss = loss.reshape(lead)
    if not return_stats:
        return loss
    return loss, stats_from(flags, temperature, lead, labelled)


def empty_result(leaves, reduction, acc, device):
    """(loss, temperatures, flags) of a batch without rows: a zero loss that still carries
    (zero) gradients to every leaf."""
    loss = sum(x.sum() * 0 for x in leaves if x is not None).to(acc)
    return (loss.expand(0) if reduction == "none" else loss,
            torch.zeros(0, dtype=acc, device=device), torch.zeros(0, dtype=torch.int8,
                                                                 device=device))


def check_floating(name, x):
    if not isinstance(x, torch.Tensor) or x.dtype not in _FLOATS:
        raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16, float32 or "
                        f"float64), got {getattr(x, 'dtype', type(x))}")


def check_tensors(logits, teacher, target, temperature, *, correction, ce_weight,
                  wrong_kd_weight, virtual_teacher, divergence, ignore_index, **_):
    """Checks the teacher, labels and temperature against ``logits``, a tensor with the student
    logits' shape and device (the fused linear path passes a stand-in without storage); returns
    the temperature with a string made a :class:`DynamicTemperature`."""
    lead, C = logits.shape[:-1], logits.shape[-1]
    if virtual_teacher is not None:
        if teacher is not None:
            raise ValueError("give either teacher_logits or virtual_teacher, not both")
    elif teacher is None:
        raise ValueError("teacher_logits is required (or virtual_teacher for Tf-KD reg)")
    elif isinstance(teacher, SparseTeacher):
        _check_sparse_teacher(teacher, logits)
        if correction == "smooth" and divergence != "kl":
            raise ValueError("correction='smooth' with a SparseTeacher works with divergence='kl'"
                             f" only (its target is dense), got divergence={divergence!r}")
    else:
        _check_teacher(teacher, logits)
    if target is not None:
        _check_labels(target, lead, C, ignore_index, logits.device)
    needs_labels = [name for name, needed in (
        ("ce_weight != 0", ce_weight != 0), (f"correction={correction!r}", correction is not None),
        ("wrong_kd_weight", wrong_kd_weight is not None),
        ("virtual_teacher", virtual_teacher is not None)) if needed]
    if target is None and needs_labels:
        raise ValueError(f"target labels are required by {', '.join(needs_labels)}")
    if isinstance(temperature, str):
        temperature = DynamicTemperature(weighting=temperature)
    if isinstance(temperature, DynamicTemperature) and teacher is None:
        raise ValueError("a dynamic temperature needs teacher_logits")
    if isinstance(temperature, torch.Tensor):
        _check_temperature_rows(temperature, lead, logits.device)
    return temperature


def stats_from(flags, temperature, lead, labelled):
    flags = flags.reshape(lead)
    return DistillStats(
        teacher_correct=(flags & FLAG_TEACHER_CORRECT).bool() if labelled else None,
        temperature=temperature.reshape(lead),
        still_wrong=(flags & FLAG_STILL_WRONG).bool() if labelled else None)


class _Plan(NamedTuple):
    """What one call runs: [N, C] row views of the inputs, the backend and its options."""
    student: torch.Tensor
    teacher: Optional[torch.Tensor]  # [N, C] logits, or [N, k] values of a sparse teacher
    teacher_indices: Optional[torch.Tensor]  # [N, k] for a sparse teacher
    target: Optional[torch.Tensor]
    temp_rows: Optional[torch.Tensor]
    backend: object
    options: FusedOptions


def rows_of(x, C):
    """x as [N, C] rows: itself or a view; a copy only when the class dimension itself is
    strided."""
    return unit_stride(x if x.dim() == 2 else x.reshape(-1, C))


def teacher_rows(teacher, C):
    """(values, indices) as rows: [N, C] logits and None, or a sparse teacher's [N, k] values and
    indices (small: a contiguous copy costs nothing), or (None, None)."""
    if isinstance(teacher, SparseTeacher):
        k = teacher.indices.shape[-1]
        return (teacher.values.detach().reshape(-1, k).contiguous(),
                teacher.indices.reshape(-1, k).long().contiguous())
    if teacher is None:
        return None, None
    return rows_of(teacher.detach() if teacher.requires_grad else teacher, C), None


def temperature_plan(temperature, acc, ignore_index, target_rows=None, dtd_rows=None):
    """(temp_mode, temp_value, temp_rows, dyn). A centred DTD temperature needs the batch mean
    of its weights: ``dtd_rows()`` gives (student rows, teacher rows, teacher indices)."""
    temp_mode, temp_value, temp_rows, dyn = TEMP_SCALAR, 4.0, None, None
    if isinstance(temperature, DynamicTemperature):
        dyn = temperature
        temp_mode = TEMP_COSINE if dyn.weighting == "cosine" else TEMP_MAX_PROB
        if dyn.center:  # the batch mean needs a pre-pass over all rows
            valid = target_rows != ignore_index if target_rows is not None else None
            s_rows, t_rows, t_idx = dtd_rows()
            w = dtd_weights(s_rows, t_rows, dyn.weighting, t_idx)
            temp_mode = TEMP_ROWS
            temp_rows = temperature_from_weights(w, dyn.tau0, dyn.beta, True, dyn.tau_min, valid)
    elif isinstance(temperature, torch.Tensor):
        temp_mode, temp_rows = TEMP_ROWS, temperature.detach().reshape(-1)
    else:
        temp_value = float(temperature)
    if temp_rows is not None:  # backends read per-row temperatures in the accumulation dtype
        temp_rows = temp_rows.to(acc)
    return temp_mode, temp_value, temp_rows, dyn


def count_rows(N, target_rows, ignore_index, acc, device):
    """The rows "mean" divides by (a tensor: no host sync), at least 1."""
    if target_rows is None:
        return torch.tensor(float(N), dtype=acc, device=device)
    return (target_rows != ignore_index).sum().clamp(min=1).to(acc)


def fused_options(hyper, temp_plan, compute_grad, grad_scale, teacher_tail,
                  reduction=REDUCTION_NONE):
    """The kernels' options (kdkernels/_options.py) from the checked hyper-parameters."""
    temp_mode, temp_value, _, dyn = temp_plan
    h = hyper
    return FusedOptions(
        temp_mode=temp_mode, temp_value=temp_value,
        tau0=dyn.tau0 if dyn else 4.0, beta=dyn.beta if dyn else 1.0,
        tau_min=dyn.tau_min if dyn else 1.0,
        kd_weight=float(h["kd_weight"]),
        wrong_kd_weight=float(h["kd_weight"] if h["wrong_kd_weight"] is None
                              else h["wrong_kd_weight"]),
        ce_weight=float(h["ce_weight"]), correction=CORRECTIONS[h["correction"]],
        smooth_eps=float(h["smooth_eps"]),
        virtual_teacher=(float(h["virtual_teacher"]) if h["virtual_teacher"] is not None
                         else 0.0),
        t2_scale=bool(h["t2_scale"]), ignore_index=h["ignore_index"],
        compute_grad=compute_grad, grad_scale=grad_scale,
        divergence=_divergence_code(h["divergence"], h["jsd_beta"]),
        divergence_param=float(h["jsd_beta"] if h["divergence"] == "jsd" else h["skew_alpha"]),
        teacher_tail=teacher_tail, reduction=reduction)


def resolve_backend(backend, device, teacher_indices):
    runner = _ops.resolve(backend, device)
    if teacher_indices is not None and teacher_indices.shape[1] > getattr(runner, "MAX_K",
                                                                            math.inf):
        raise ValueError(f"SparseTeacher has k={teacher_indices.shape[1]} classes per row; the "
                         f"{runner.NAME} backend takes at most {runner.MAX_K}")
    return runner


# Option sets already checked, and the kernels' options made from them: a call with options seen
# before pays for neither (keys carry each value's type: 1, 1.0 and True are different keys).
_CHECKED = {}
_KERNEL_OPTIONS = {}
_CACHE_LIMIT = 1024


def _checked(temperature, reduction, backend, hyper):
    """check_options once per distinct set of options; returns the set's cache key (None while
    torch.compile traces: it checks every call, and the caches stay out of its graph)."""
    if torch.compiler.is_compiling():
        check_options(temperature=temperature, reduction=reduction, backend=backend, **hyper)
        return None
    spec = torch.Tensor if isinstance(temperature, torch.Tensor) else temperature
    values = (spec, reduction, backend, *hyper.values())
    key = values + tuple(map(type, values))
    try:
        seen = key in _CHECKED
    except TypeError:  # an unhashable value (a list, ...): let the check name it, cache nothing
        check_options(temperature=temperature, reduction=reduction, backend=backend, **hyper)
        return None
    if not seen:
        check_options(temperature=temperature, reduction=reduction, backend=backend, **hyper)
        if len(_CHECKED) >= _CACHE_LIMIT:
            _CHECKED.clear()
            _KERNEL_OPTIONS.clear()
        _CHECKED[key] = True
    return key


def labels_of(target):
    """Labels as [N] int64: itself, a view, or (other integer dtypes) a copy."""
    return (target if target.dim() == 1 else target.reshape(-1)).long()


def _plan(s, teacher_logits, target, temperature, reduction, backend, hyper, key=None):
    C = s.shape[-1]
    s2 = rows_of(s, C)
    t2, t_idx = teacher_rows(teacher_logits, C)
    y2 = labels_of(target) if target is not None else None
    acc = torch.float64 if s.dtype == torch.float64 else torch.float32
    temp_plan = temperature_plan(temperature, acc, hyper["ignore_index"], y2,
                                 lambda: (s2, t2, t_idx))
    compute_grad = torch.is_grad_enabled() and s.requires_grad
    tail = isinstance(teacher_logits, SparseTeacher) and teacher_logits.tail
    option_key = None if key is None else (key, compute_grad, tail)
    options = _KERNEL_OPTIONS.get(option_key)
    if options is None:  # "mean" and "sum" are done by the kernels, 1 / count included
        options = fused_options(hyper, temp_plan, compute_grad, 1.0, tail,
                                REDUCTION_CODES[reduction])
        if option_key is not None:
            _KERNEL_OPTIONS[option_key] = options
    runner = resolve_backend(backend, s.device, t_idx)
    return _Plan(s2, t2, t_idx, y2, temp_plan[2], runner, options)


def _divergence_code(divergence, jsd_beta):
    """The kernels' enum; TRL's JSD at beta 0 and 1 is the forward and the reverse KL."""
    if divergence == "jsd" and jsd_beta in (0, 1):
        return DIVERGENCE_KL if jsd_beta == 0 else DIVERGENCE_REVERSE_KL
    return DIVERGENCES[divergence]


def _run(plan, reduction):
    """(loss, per-row temperatures, per-row flags) of a plan."""
    s = plan.student
    if s.shape[0] == 0:  # nothing to run: a zero loss that still carries a (zero) gradient
        acc = torch.float64 if s.dtype == torch.float64 else torch.float32
        loss_rows = s.sum(-1).to(acc) * 0
        loss = loss_rows if reduction == "none" else loss_rows.sum()
        return (loss, torch.zeros(0, dtype=acc, device=s.device),
                torch.zeros(0, dtype=torch.int8, device=s.device))
    if plan.options.compute_grad:
        return _FusedDistill.apply(s, plan.teacher, plan.teacher_indices, plan.target,
                                   plan.temp_rows, plan.backend, plan.options)
    # evaluation: the loss alone, no gradient written, no graph
    loss, _, temperature_used, flags = plan.backend.forward(
        s, plan.teacher, plan.target, plan.temp_rows, plan.options, plan.teacher_indices)
    return loss, temperature_used, flags
