"""The Triton backend (docs/METHODS.md, "What the fused paths compute"), as two kernels with one
program per row:

- the forward reads the student and teacher rows once: an online softmax over blocks (maxima,
  first argmax of the teacher, the tempered sums, the KL cross term, CE's sum at T=1), then the
  teacher correction; it writes the row's loss, temperature and flags, and NUM_COEF float32
  coefficients from which the gradient follows in closed form (the KL in the form without
  cancellation of docs/METHODS.md). A dynamic (DTD) temperature adds
  a pre-pass over the row.
- the gradient kernel, run by the backward, reads the rows once more and writes the gradient
  times the upstream gradient, which it reads on the device.

Measured on an H100 (benchmarks/RESULTS.md), this split moves fewer bytes than a forward that
also writes the gradient: the backward must scale a saved gradient by an upstream value it can
only know on the device (one more read and write of N x C), while recomputing from the logits
costs one read of each. It also holds no N x C buffer between forward and backward. Options that
change the code path are constexpr, so plain KD pays nothing for the corrections. Both kernels
are registered with ``torch.library.triton_op``, so torch.compile sees them.

Accumulation is float32 (float64 inputs too: Triton passes scalars as float32).
"""
import importlib.util
import math
import os

import torch

from .._options import CORRECTION_NONE, DIVERGENCE_KL, TEMP_ROWS, TEMP_SCALAR
from . import _rows

NAME = "triton"

# Largest block of classes one program holds; rows longer than this loop. Tests lower it to reach
# the multi-block path at small C.
MAX_BLOCK = 8192
# Rows up to this many classes run the small-rows kernel (several rows per program, the gradient
# written in the forward) where the options allow; tests set 0 to reach the two-kernel path.
SMALL_ROWS_MAX = 1024
# Largest k of a sparse teacher: one program holds the k classes in registers.
MAX_K = 1024
LAUNCH_OVERRIDE = None  # a function (C, kernel) -> (block, warps): for tuning sweeps only
NUM_COEF = 27  # float32 values per row that the forward leaves for the gradient kernel
_INSTALLED = importlib.util.find_spec("triton") is not None


def _interpreting():
    return os.environ.get("TRITON_INTERPRET") == "1"


def availability(device=None):
    if not _INSTALLED:
        return False, "triton is not installed (pip install triton)"
    if device is not None and device.type == "cpu":
        if _interpreting():
            return True, "Triton interpreter (TRITON_INTERPRET=1) on CPU tensors: slow, for tests"
        return False, "CPU tensors need TRITON_INTERPRET=1 (the interpreter, for tests)"
    if device is not None and device.type != "cuda":
        return False, f"Triton kernels run on CUDA tensors, not {device.type}"
    if not torch.cuda.is_available():
        if _interpreting():
            return True, "Triton interpreter (TRITON_INTERPRET=1): CPU tensors only"
        return False, "no CUDA device (torch.cuda.is_available() is False)"
    if device is not None:  # resolve() on a tensor's device: plain Python for torch.compile
        return True, "Triton on CUDA"
    import triton
    return True, f"Triton {triton.__version__} on {torch.cuda.get_device_name()}"


def launch_config(C, kernel):
    """(block, warps) for rows of C classes; kernel is "forward" or "grad"."""
    if LAUNCH_OVERRIDE is not None:  # benchmarks/gpu_sweep.py tries alternatives
        return LAUNCH_OVERRIDE(C, kernel)
    # Measured on an H100 at 4096 x 32000 and 8192 x 128256 (benchmarks/gpu_sweep.py): the
    # forward is fastest with small blocks and 4 warps (many programs per SM), the gradient
    # kernel is within 3% of a copy for every block >= 1024.
    block = min(1 << (max(C, 1) - 1).bit_length(), MAX_BLOCK,
                2048 if kernel == "forward" else 4096)
    return block, 4 if kernel == "forward" or block < 2048 else 8


def shard_config(W):
    """(block, warps) of the shard entry points over a range of W columns: their float64 math
    (rows at a high temperature) must fit the registers too, so at most 8 values per thread."""
    block = min(1 << (max(W, 1) - 1).bit_length(), 2048)
    return block, max(1, min(8, block // 256))


def rows_config(C):
    """(block, rows per program, warps) of the small-rows kernel: a [rows, block] tile of about
    512 values, 4 per thread (compiled for sm_90, tiles of 2048 needed all 255 registers and
    tiles of 1024 up to 183; small tiles also keep many programs at a few hundred rows)."""
    block = max(16, 1 << (max(C, 1) - 1).bit_length())
    return block, max(1, min(16, 512 // block)), 4


def small_rows(C, o, teacher_indices):
    """Whether the small-rows kernel runs: rows that fit one block, the gradient wanted, and the
    options it covers (a fixed or per-row temperature, no correction, the KL divergence)."""
    # (MAX_BLOCK bounds it too: tests lower it to reach the multi-block path at small C)
    return (C <= min(SMALL_ROWS_MAX, MAX_BLOCK) and o.compute_grad and teacher_indices is None
            and o.temp_mode in (TEMP_SCALAR, TEMP_ROWS) and o.correction == CORRECTION_NONE
            and o.divergence == DIVERGENCE_KL)


def k_block(k):
    """The block that holds a sparse teacher's k classes in one program."""
    return max(16, 1 << (max(k, 1) - 1).bit_length())


def virtual_logits(virtual_teacher, C):
    """log a and log((1 - a) / (C - 1)): the Tf-KD reg teacher's two values."""
    if virtual_teacher <= 0:
        return 0.0, 0.0
    rest = math.log((1 - virtual_teacher) / max(C - 1, 1)) if virtual_teacher < 1 else -math.inf
    return math.log(virtual_teacher), rest


def forward_deferred(student, teacher, target, temp_rows, o, teacher_indices=None):
    """The forward kernel alone: (loss, state, temperature, flags); `gradient(state, ...)`
    writes the gradient later, in the backward, scaled by the upstream gradient on the device
    (no host sync, and no N x C buffer between forward and backward)."""
    if small_rows(student.shape[1], o, teacher_indices):  # one launch writes the gradient too
        loss, temps, flags, grad, scale = torch.ops.kdkernels.distill_triton_rows.default(
            student, teacher, target, temp_rows, o.pack())
        state = (grad, scale)
    elif teacher_indices is not None:  # the kernels find each block's classes in sorted ids
        indices, order = teacher_indices.sort(-1)
        loss, temps, flags, coef, index, member, scale = (
            torch.ops.kdkernels.distill_triton_sparse.default(
                student, teacher.gather(1, order), indices, target, temp_rows, o.pack()))
        state = (coef, index, scale, member, indices)
    else:
        loss, temps, flags, coef, index, scale = torch.ops.kdkernels.distill_triton.default(
            student, teacher, target, temp_rows, o.pack())
        state = (coef, index, scale)
    if student.dtype == torch.float64:  # the contract: losses in the accumulation dtype
        loss, temps = loss.double(), temps.double()
    return loss, state, temps, flags


def gradient(student, teacher, state, upstream, o, teacher_indices=None, overwrite=False):
    """d loss / d student times `upstream` ([N] per row, or one value for all rows);
    ``overwrite=True`` writes it over ``student`` (contiguous) and returns that."""
    ops = torch.ops.kdkernels
    if len(state) == 2:  # the small-rows kernel wrote it: scale it
        grad, scale = state
        if overwrite:
            ops.distill_triton_scale_rows_.default(grad, upstream, scale, student, o.pack())
            return student
        return ops.distill_triton_scale_rows.default(grad, upstream, scale, student, o.pack())
    if teacher_indices is not None:
        coef, index, scale, member, indices = state
        op = ops.distill_triton_sparse_grad_ if overwrite else ops.distill_triton_sparse_grad
        grad = op.default(student, indices, coef, index, member, upstream, scale, o.pack())
    else:
        coef, index, scale = state
        op = ops.distill_triton_grad_ if overwrite else ops.distill_triton_grad
        grad = op.default(student, teacher, coef, index, upstream, scale, o.pack())
    return student if overwrite else grad


def forward(student, teacher, target, temp_rows, o, teacher_indices=None, overwrite=False):
    """The backends' common contract: the gradient written at once (times o.grad_scale);
    ``overwrite=True`` lets it be written over ``student`` (a temporary the caller no longer
    needs, as the fused lm_head's chunk logits)."""
    loss, state, temps, flags = forward_deferred(student, teacher, target, temp_rows, o,
                                                 teacher_indices)
    if not o.compute_grad:
        return loss, student.new_empty(0), temps, flags
    upstream = torch.full((1,), o.grad_scale, dtype=torch.float32, device=student.device)
    overwrite = overwrite and student.is_contiguous()
    return loss, gradient(student, teacher, state, upstream, o, teacher_indices,
                          overwrite), temps, flags


GRAD_OVER_STUDENT = True  # forward(overwrite=True) writes the gradient over the logits


def shard_statistics(student, teacher, target, temps, vocab_start, vocab_size, o):
    """The torch backend's shard_statistics (kdkernels/ops/torch_distill.py), in Triton."""
    return _rows.shard_statistics(torch.ops.kdkernels.shard_stats_triton.default, student,
                                  teacher, target, temps, vocab_start, vocab_size, o)


def shard_pass(student, teacher, target, rows, vocab_start, vocab_size, o, grad=True,
               overwrite=False):
    """The torch backend's shard_pass (kdkernels/ops/torch_distill.py), in Triton;
    ``overwrite=True`` writes the gradient over ``student`` (unit class stride) and returns it."""
    return _rows.shard_pass(torch.ops.kdkernels.shard_pass_triton.default,
                            torch.ops.kdkernels.shard_pass_triton_.default, student, teacher,
                            target, rows, vocab_start, vocab_size, o, grad, overwrite)


if _INSTALLED and (_interpreting() or torch.cuda.is_available()):
    from . import (
        _triton_kernels,  # noqa: E402,F401  (registers the kdkernels::distill_triton ops)
        _triton_shard,  # noqa: E402,F401  (and the shard entry points)
    )
