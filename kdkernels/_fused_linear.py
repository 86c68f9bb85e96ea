"""Fused linear distillation: the student's lm_head matmul and the distillation loss, computed in
chunks of rows so that at most one chunk's [rows, V] logits exist at a time (docs/METHODS.md,
"Fused linear distillation").

Per chunk: the student's logits by torch.matmul (cuBLAS on a GPU), the teacher's rows (its own
matmul, a slice of dense logits, or of a sparse top-k), the fused kernel of the primitive, which
writes d loss / d logits, then the two matmuls of the backward: d hidden for the chunk's rows and
d weight accumulated over the chunks. With a final logit soft-cap (Gemma 2's
``final_logit_softcapping``) the chunk's logits are ``cap * tanh(logits / cap)``, in float32,
before the kernel, and its gradient is multiplied by ``1 - tanh^2`` before the two matmuls. For
"mean" and "sum" all of it runs in the forward and the backward only scales the results by the
upstream gradient; for "none", whose per-row upstream gradients are known only then, the forward
computes the losses alone and the backward runs the chunks again.
"""
import math
from dataclasses import replace

import torch

from ._core import (
    check_floating,
    check_options,
    check_padded_width,
    check_tensors,
    count_rows,
    empty_result,
    finish,
    fit_teacher,
    fused_options,
    reduce_rows,
    resolve_backend,
    scale_saved,
    temperature_plan,
)
from ._options import DynamicTemperature, SparseTeacher
from .ops._rows import unit_stride

MIB = 1 << 20


def fused_linear_distillation_loss(student_hidden, student_weight, teacher=None, target=None, *,
                                   student_bias=None, teacher_weight=None, teacher_bias=None,
                                   temperature=4.0, kd_weight=0.9, ce_weight=0.1,
                                   wrong_kd_weight=None, correction=None, smooth_eps=0.1,
                                   virtual_teacher=None, t2_scale=True, divergence="kl",
                                   jsd_beta=0.5, skew_alpha=0.1, ignore_index=-100,
                                   reduction="mean", return_stats=False, backend="auto",
                                   chunk_size=None, memory_budget=None, padded_teacher=False,
                                   logit_softcap=None, teacher_logit_softcap=None):
    r""":func:`distillation_loss` of the logits ``student_hidden @ student_weight.T (+ bias)``
    without materialising them: rows go through the matmul and the fused loss in chunks.

    Args:
        student_hidden: [..., H] the student's last hidden states; receives a gradient.
        student_weight: [V, H] its lm_head (same dtype); receives a gradient, as does
            ``student_bias`` ([V]) if given.
        teacher: the teacher's hidden states [..., H_t] with ``teacher_weight`` [V, H_t] (and
            ``teacher_bias``); or its logits [..., V]; or a :class:`SparseTeacher` ([..., k]);
            or None with ``virtual_teacher``. No gradient flows to the teacher.
        target: [...] labels, as for :func:`distillation_loss`; so are every loss option and
            ``temperature`` (a float, a [...] tensor, or an uncentred DTD temperature).
        chunk_size: rows per chunk. By default, as many as ``memory_budget`` bytes of chunk
            buffers allow (the chunk's logits, over which the C++ and Triton kernels write
            their gradient, a second buffer for it on the torch backend, and, from hidden
            states, the teacher's logits); that budget defaults to half the bytes of
            ``student_weight`` (at least 32 MiB): the chunk then holds half as much as the
            weight's gradient, which the path holds anyway. Smaller chunks cost time: the
            weight's gradient is read and written once per chunk.
        padded_teacher: the teacher's vocabulary is the student's V classes plus padding: its
            weight (and bias) may have more rows, its logits more columns, a sparse teacher
            (with its ``vocab_size``) classes >= V; only the first V are read (views). As for
            :func:`distillation_loss`.
        logit_softcap: the student's final logit soft-cap (a number > 0, Gemma 2's
            ``config.final_logit_softcapping``): its logits are ``logit_softcap * tanh((h @ W.T
            + b) / logit_softcap)``, computed per chunk in float32 (float64 for float64); the
            gradient goes through the tanh. None: the plain ``h @ W.T + b``.
        teacher_logit_softcap: the same for the teacher's logits computed here from its hidden
            states and ``teacher_weight`` (its own cap: it may differ from the student's).
            Teacher logits given as such, dense or sparse, are used as they are (a model's own
            ``.logits`` are already capped).

    Returns the loss (and a :class:`DistillStats` with ``return_stats``). The weight's and the
    bias's gradients accumulate chunk by chunk in float32 (float64 for float64).
    """
    hyper = dict(kd_weight=kd_weight, ce_weight=ce_weight, wrong_kd_weight=wrong_kd_weight,
                 correction=correction, smooth_eps=smooth_eps, virtual_teacher=virtual_teacher,
                 t2_scale=t2_scale, divergence=divergence, jsd_beta=jsd_beta,
                 skew_alpha=skew_alpha, ignore_index=ignore_index)
    check_options(temperature=temperature, reduction=reduction, backend=backend,
                  padded_teacher=padded_teacher, **hyper)
    check_chunking(chunk_size, memory_budget)
    for name, cap in (("logit_softcap", logit_softcap),
                      ("teacher_logit_softcap", teacher_logit_softcap)):
        check_softcap(name, cap)
    h, W = student_hidden, student_weight
    _check_linear("student", h, W, student_bias)
    lead, V = h.shape[:-1], W.shape[0]
    if teacher_logit_softcap is not None and teacher_weight is None:
        raise ValueError("teacher_logit_softcap caps the teacher logits computed from its hidden "
                         "states and teacher_weight; teacher logits given as such (dense or "
                         "sparse) are used as they are: cap them yourself, or pass the "
                         "model's own (already capped) logits")

    def fit_rows(name, rows):
        check_padded_width(name, rows, V, padded_teacher, "student_weight")
    checked_teacher, teacher_weight, teacher_bias = teacher_stand_in(
        teacher, teacher_weight, teacher_bias, h, lead, V, V, fit_rows)
    if checked_teacher is None:
        teacher = checked_teacher = fit_teacher(teacher, V, padded_teacher, "teacher",
                                                "student_weight")
    if isinstance(temperature, DynamicTemperature) and temperature.center:
        raise ValueError("DynamicTemperature(center=True) needs every row's logits at once; the "
                         "fused linear path has one chunk at a time: use center=False")
    # the checks of the primitive, against a stand-in for the logits (no storage)
    logits_like = h.new_empty(()).expand(*lead, V)
    temperature = check_tensors(logits_like, checked_teacher, target, temperature, **hyper)

    H = h.shape[-1]
    h2 = h.reshape(-1, H)
    N = h2.shape[0]
    source = _TeacherSource(teacher, teacher_weight, teacher_bias, V, lead,
                            teacher_logit_softcap)
    y2 = target.reshape(-1).long() if target is not None else None
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    temp_plan = temperature_plan(temperature, acc, ignore_index)
    runner = resolve_backend(backend, h.device, source.indices)
    count = count_rows(N, y2, ignore_index, acc, h.device) if reduction == "mean" else None
    wants_grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (h, W, student_bias))
    options = fused_options(hyper, temp_plan, True, 1.0, source.tail)
    # a soft-capped chunk also holds its tanh, the capped logits and their gradient in `acc`
    capped_bytes = 0 if logit_softcap is None else 3 * V * _itemsize(acc)
    rows = chunk_rows(N, h, W, source.bytes_per_row(V) + capped_bytes, chunk_size,
                      memory_budget, getattr(runner, "GRAD_OVER_STUDENT", False))
    job = _Job(runner, options, source, y2, temp_plan[2], rows, reduction, count, logit_softcap)
    if N == 0:
        loss, temps, flags = empty_result([h2, W, student_bias], reduction, acc, h.device)
    elif wants_grad:
        loss, temps, flags = _FusedLinearDistill.apply(h2, W, student_bias, job)
    else:
        loss, temps, flags = _loss_only(job, h2, W, student_bias)
    return finish(loss, temps, flags, lead, reduction, return_stats, target is not None)


def teacher_stand_in(teacher, weight, bias, h, lead, width, full_width, fit_rows):
    """For a teacher given as hidden states with its (shard of the) lm_head ``weight``: checks
    them and returns (a storage-free stand-in for its [..., full_width] logits, the weight and
    bias cut to ``width`` rows, views); (None, None, None) for a teacher given otherwise (which
    must then come without a bias). A weight with other than ``width`` rows goes to
    ``fit_rows(name, rows)``, which raises unless the rows past ``width`` are padding."""
    if weight is None:
        if bias is not None:
            raise ValueError("teacher_bias needs teacher_weight (teacher given as hidden states)")
        return None, None, None
    if not isinstance(teacher, torch.Tensor):
        raise TypeError("teacher_weight is given: teacher must be the teacher's hidden states, "
                        "a tensor")
    _check_linear("teacher", teacher, weight, bias)
    if teacher.shape[:-1] != lead:
        raise ValueError(f"teacher hidden states {tuple(teacher.shape)} and weight "
                         f"{tuple(weight.shape)} do not give logits of shape "
                         f"{tuple(lead) + (width,)}")
    if weight.shape[0] != width:
        fit_rows("teacher_weight", weight.shape[0])
        weight, bias = weight[:width], None if bias is None else bias[:width]
    if teacher.device != h.device:
        raise ValueError(f"teacher is on {teacher.device} but student_hidden on {h.device}")
    return teacher.new_empty(()).expand(*lead, full_width), weight, bias


def check_softcap(name, cap):
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, (int, float))
                            or not math.isfinite(cap) or cap <= 0):
        raise ValueError(f"{name} must be a finite number > 0 (the logits become cap * "
                         f"tanh(logits / cap)) or None, got {cap!r}")


def soft_capped(logits, cap):
    """(cap * tanh(logits / cap), the tanh) in float32 (float64 for float64)."""
    squashed = torch.tanh(logits.to(_accumulation(logits.dtype)) / cap)
    return squashed * cap, squashed


def _itemsize(dtype):
    return torch.empty((), dtype=dtype).element_size()


def _check_linear(who, hidden, weight, bias):
    check_floating(f"{who}_hidden" if who == "student" else "teacher", hidden)
    check_floating(f"{who}_weight", weight)
    if hidden.dim() < 1 or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{who}: hidden states [..., H] and a weight [V, H] expected, got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if weight.shape[0] < 1:
        raise ValueError(f"{who}_weight must have V >= 1 rows, got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype or weight.device != hidden.device:
        raise ValueError(f"{who}_weight is {weight.dtype} on {weight.device}, its hidden states "
                         f"{hidden.dtype} on {hidden.device}: they must match")
    if bias is not None:
        check_floating(f"{who}_bias", bias)
        if bias.shape != weight.shape[:1] or bias.dtype != weight.dtype \
                or bias.device != weight.device:
            raise ValueError(f"{who}_bias must be [{weight.shape[0]}], {weight.dtype} on "
                             f"{weight.device}, got {tuple(bias.shape)} {bias.dtype} on "
                             f"{bias.device}")


class _TeacherSource:
    """The teacher's rows for a chunk: its own matmul, a slice of its logits or of a sparse
    teacher, or nothing (a virtual teacher)."""

    def __init__(self, teacher, weight, bias, V, lead, softcap=None):
        self.weight, self.bias, self.indices, self.tail = weight, bias, None, False
        self.softcap = softcap
        self.hidden = self.logits = self.values = None
        if weight is not None:
            self.hidden = teacher.detach().reshape(-1, teacher.shape[-1])
        elif isinstance(teacher, SparseTeacher):
            k = teacher.indices.shape[-1]
            self.values = teacher.values.detach().reshape(-1, k)
            self.indices = teacher.indices.reshape(-1, k).long()
            self.tail = teacher.tail
        elif teacher is not None:
            self.logits = teacher.detach().reshape(-1, V)

    def bytes_per_row(self, V):
        """Bytes of chunk buffers this teacher adds per row."""
        if self.hidden is None:
            return 0
        capped = 0 if self.softcap is None else _itemsize(_accumulation(self.hidden.dtype))
        return V * (self.hidden.element_size() + capped)

    def rows(self, i, j):
        """(teacher values or logits, indices or None) for rows [i, j)."""
        if self.hidden is not None:
            with torch.no_grad():
                logits = linear(self.hidden[i:j], self.weight, self.bias)
                if self.softcap is not None:
                    logits = soft_capped(logits, self.softcap)[0]
                return logits, None
        if self.indices is not None:
            return self.values[i:j].contiguous(), self.indices[i:j].contiguous()
        if self.logits is not None:
            return unit_stride(self.logits[i:j]), None
        return None, None


def check_chunking(chunk_size, memory_budget):
    for name, value, unit in (("chunk_size", chunk_size, "rows"),
                              ("memory_budget", memory_budget, "bytes")):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise ValueError(f"{name} must be an int >= 1 ({unit}), got {value!r}")
    if chunk_size is not None and memory_budget is not None:
        raise ValueError("give chunk_size or memory_budget, not both")


def chunk_rows(N, h, W, teacher_row_bytes, chunk_size, memory_budget, grad_over_logits=False):
    """Rows per chunk: `chunk_size`, or as many as the budget of chunk buffers allows (the
    logits and, unless the backend writes it over them, their gradient, in h's dtype, and
    `teacher_row_bytes` per row of teacher logits computed from hidden states); the budget
    defaults to half the weight's bytes."""
    if chunk_size is not None:
        return chunk_size
    if memory_budget is None:
        memory_budget = max(32 * MIB, W.numel() * W.element_size() // 2)
    per_row = (1 if grad_over_logits else 2) * W.shape[0] * h.element_size() + teacher_row_bytes
    return max(1, min(N, memory_budget // per_row))


class _Job:
    """One call's fixed parts: the backend, its options, the teacher, labels, temperatures, the
    student's soft-cap."""

    def __init__(self, runner, options, source, target, temp_rows, rows, reduction, count,
                 softcap=None):
        self.runner, self.options, self.source = runner, options, source
        self.target, self.temp_rows, self.rows = target, temp_rows, rows
        self.reduction, self.count, self.softcap = reduction, count, softcap

    def chunks(self, N):
        return [(i, min(i + self.rows, N)) for i in range(0, N, self.rows)]

    def run(self, h, W, b, i, j, compute_grad):
        """(loss rows, d loss rows / d logits or empty, temperatures, flags) of rows [i, j); with
        a soft-cap, the gradient wrt the linear layer's logits (before the cap), in h's dtype."""
        with torch.no_grad():
            logits = linear(h[i:j], W, b)
            if self.softcap is not None:
                logits, squashed = soft_capped(logits, self.softcap)
        teacher, indices = self.source.rows(i, j)
        options = self.options if compute_grad else replace(self.options, compute_grad=False)
        # the kernels write the gradient over the chunk's logits (no second [rows, V] buffer)
        loss, grad, temps, flags = self.runner.forward(
            logits, teacher, _part(self.target, i, j), _part(self.temp_rows, i, j), options,
            indices, overwrite=compute_grad)
        if self.softcap is not None and compute_grad:
            # d cap tanh(z / cap) / dz = 1 - tanh^2, in float32, before the matmuls in h's dtype
            grad = grad.mul_(squashed.square_().neg_().add_(1)).to(h.dtype)
        return loss, grad, temps, flags


def linear(x, weight, bias):
    """Chunk logits as torch.nn.Linear computes them: the bias added before the one rounding
    to a 16-bit dtype (a matmul then `+= bias` rounds twice)."""
    return torch.nn.functional.linear(x.detach(), weight.detach(),
                                      None if bias is None else bias.detach())


def _part(x, i, j):
    return None if x is None else x[i:j]


def _loss_only(job, h, W, b):
    parts = [job.run(h, W, b, i, j, False) for i, j in job.chunks(h.shape[0])]
    loss_rows, temps, flags = (torch.cat([p[k] for p in parts]) for k in (0, 2, 3))
    return reduce_rows(loss_rows, job.reduction, job.count), temps, flags


class GradientSink:
    """Takes d loss / d logits a chunk of rows at a time and turns it into the gradients of the
    hidden states (the chunk's rows), the weight and the bias (accumulated)."""

    def __init__(self, h, W, b, need):
        need_h, need_w, need_b = need
        self.h, self.W = h, W
        self.grad_h = torch.empty(h.shape, dtype=h.dtype, device=h.device) if need_h else None
        # the weight's and the bias's gradients summed over the chunks in float32 (float64 for
        # float64): in a 16-bit dtype each chunk's addition would round the running sum, and
        # the error would grow with the number of chunks. A 16-bit weight's chunk product is
        # written into one reused buffer of its dtype (a GEMM at 16-bit speed), then added.
        self.grad_w = self.product = None
        if need_w:
            self.grad_w = torch.zeros(W.shape, dtype=_accumulation(W.dtype), device=W.device)
            if self.grad_w.dtype != W.dtype:
                self.product = torch.empty(W.shape, dtype=W.dtype, device=W.device)
        self.grad_b = None
        if need_b:
            self.grad_b = torch.zeros(W.shape[0], dtype=_accumulation(b.dtype), device=b.device)
        self.b_dtype = None if b is None else b.dtype

    def __call__(self, i, j, g):
        if self.grad_h is not None:
            torch.mm(g, self.W.detach(), out=self.grad_h[i:j])
        if self.product is not None:
            self.grad_w += torch.mm(g.t(), self.h[i:j].detach(), out=self.product)
        elif self.grad_w is not None:
            self.grad_w.addmm_(g.t(), self.h[i:j].detach())
        if self.grad_b is not None:
            self.grad_b += g.sum(0, dtype=self.grad_b.dtype)

    def results(self, scale=None):
        """The gradients, each times ``scale`` (a "mean"'s 1 / count, a tensor: no host sync),
        taken in float32 by the weight's and the bias's sums before their one rounding."""
        grad_h, grad_w, grad_b = self.grad_h, self.grad_w, self.grad_b
        if scale is not None:
            if grad_h is not None:
                grad_h.mul_(scale)
            if grad_b is not None:
                grad_b = grad_b * scale
            if grad_w is not None and self.product is None:
                grad_w.mul_(scale)
        if self.product is not None:  # rounded once, into the product's buffer
            grad_w = (self.product.copy_(grad_w) if scale is None
                      else torch.mul(grad_w, scale, out=self.product))
        if grad_b is not None:
            grad_b = grad_b.to(self.b_dtype)
        return grad_h, grad_w, grad_b


def _accumulation(dtype):
    return torch.promote_types(dtype, torch.float32)


def _backward_chunks(job, h, W, b, upstream, need, scale=None):
    """d loss / d (hidden, weight, bias) over every chunk; ``upstream``: the per-row upstream
    gradients ([N], for "none") or None (rows summed); ``scale``: as GradientSink.results."""
    sink = GradientSink(h, W, b, need)
    parts = []
    for i, j in job.chunks(h.shape[0]):
        loss_rows, g, temps, flags = job.run(h, W, b, i, j, True)
        parts.append((loss_rows, temps, flags))
        if upstream is not None:
            g = g * upstream[i:j, None].to(g.dtype)
        sink(i, j, g)
        del g
    loss_rows, temps, flags = (torch.cat([p[k] for p in parts]) for k in range(3))
    return (loss_rows, temps, flags) + sink.results(scale)


class _FusedLinearDistill(torch.autograd.Function):
    """Autograd for the chunked path: "mean" / "sum" compute every gradient in the forward (the
    backward scales them); "none" recomputes the chunks in the backward with the upstream
    gradient of each row."""

    @staticmethod
    def forward(ctx, h, W, b, job):
        ctx.job = job
        ctx.need = ctx.needs_input_grad[:3]
        if job.reduction == "none":
            loss, temps, flags = _loss_only(job, h, W, b)
            ctx.save_for_backward(h, W, b)
        else:
            # a mean's 1 / count taken by the float32 sums before their rounding: the backward
            # then has the upstream gradient alone to apply (nothing, on CPU, for backward())
            scale = None if job.reduction == "sum" else 1 / job.count
            loss_rows, temps, flags, gh, gw, gb = _backward_chunks(job, h, W, b, None, ctx.need,
                                                                   scale)
            loss = reduce_rows(loss_rows, job.reduction, job.count)
            ctx.save_for_backward(gh, gw, gb)
        ctx.mark_non_differentiable(temps, flags)
        return loss, temps, flags

    @staticmethod
    def backward(ctx, grad_loss, _grad_temps, _grad_flags):
        job = ctx.job
        if job.reduction == "none":
            h, W, b = ctx.saved_tensors
            grads = _backward_chunks(job, h, W, b, grad_loss.reshape(-1), ctx.need)[3:]
            return (*grads, None)
        gh, gw, gb = ctx.saved_tensors
        return (*scale_saved((gh, gw, gb), grad_loss), None)
