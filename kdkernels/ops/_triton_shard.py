"""The Triton backend's shard entry points (kdkernels/_options.py, SHARD_STATS / SHARD_ROWS;
docs/METHODS.md, "Vocab-parallel distillation"): one program per row over a range of its
columns, in blocks.

- ``shard_stats_triton``: the range's statistics, an online softmax over the blocks (the
  maxima and the tempered sums rescaled as the maxima move), float64 out;
- ``shard_pass_triton``: from each row's merged values, the range's gradient (it may be written
  over the student's logits: each block is read before it is written), or its part of D and
  of sum_j p_j G_j (the divergences other than the forward KL).

Precision, as the C++ kernel's: the merge subtracts log-sums, so the per-class math is float32
only where the inputs are 16/32-bit and the row's temperature is at most FLOAT_SHARD_T (a
branch per row, on the device), float64 elsewhere; block sums and the rescaling are float64
always. Scalars reach the kernels as float32, so each float option travels as two (hi + lo).
"""
import math
from typing import List, Optional

import torch
import triton
import triton.language as tl

from .. import _options
from . import triton_distill as config
from ._triton_kernels import (
    CORRECTION_RECTIFY,
    CORRECTION_SMOOTH,
    CORRECTION_SWAP,
    DIVERGENCE_KL,
    _div_terms,
)

FLOAT_SHARD_T = tl.constexpr(8.0)  # float32 math up to this temperature (float64 above)
NUM_STATS = tl.constexpr(len(_options.SHARD_STATS))
NUM_ROWS = tl.constexpr(len(_options.SHARD_ROWS))


def _columns(names, *wanted):  # by name: the contract's order is its own
    return [tl.constexpr(names.index(name)) for name in wanted]


(ST_MS, ST_ZS, ST_MT, ST_ZT, ST_CROSS, ST_Z1, ST_SY, ST_TY, ST_OWNS, ST_B, ST_SB, ST_TX1,
 ST_IDX1, ST_TX2, ST_SSUM) = _columns(_options.SHARD_STATS, "ms", "zs", "mt", "zt", "cross",
                                      "z1", "s_y", "t_y", "owns", "b", "s_b", "tx1", "idx1",
                                      "tx2", "s_sum")
(RW_T, RW_MS, RW_LOG_ZS, RW_MT, RW_LOG_ZT, RW_Z1, RW_KD_GRAD, RW_B, RW_LR_Y, RW_LR_B,
 RW_G_MEAN, RW_SCALE, RW_FIX_Y, RW_FIX_B, RW_SMOOTHED, RW_HAS_TEACHER) = _columns(
    _options.SHARD_ROWS, "T", "ms", "log_zs", "mt", "log_zt", "z1", "kd_grad", "b", "lr_y",
    "lr_b", "g_mean", "scale", "fix_y", "fix_b", "smoothed", "has_teacher")


def split64(x):
    """x as two float32 scalars whose sum is x to ~48 bits (the kernels add them in float64)."""
    hi = float(torch.tensor(x, dtype=torch.float32))
    return hi, (x - hi) if math.isfinite(x) else 0.0


@triton.jit
def _f64(hi, lo):
    return tl.cast(hi, tl.float64) + tl.cast(lo, tl.float64)


@triton.jit
def _local_label(y_ptr, y_stride, row, W, vocab_start, HAS_LABELS: tl.constexpr):
    """The label's column in the range, or -1 (no labels, an ignored row, another range)."""
    ly = tl.full([], -1, tl.int64)
    if HAS_LABELS:
        local = tl.load(y_ptr + row * y_stride).to(tl.int64) - vocab_start
        ly = tl.where((local >= 0) & (local < W), local, -1)
    return ly


@triton.jit
def _teacher(t_row, idx, mask, ly, log_a, log_rest, DT: tl.constexpr, VIRTUAL: tl.constexpr):
    if VIRTUAL:  # Tf-KD reg: this range's columns of the virtual teacher, from the label
        t = tl.where(idx == ly, log_a.to(DT), log_rest.to(DT))
        t = tl.where(mask, t, float("-inf"))
    else:
        t = tl.load(t_row + idx, mask=mask, other=float("-inf")).to(DT)
    return t


@triton.jit
def _stats_row(s_row, t_row, out_row, W, ly, T, vocab_start, log_a, log_rest,
               DT: tl.constexpr, BLOCK: tl.constexpr, VIRTUAL: tl.constexpr,
               HAS_CE: tl.constexpr, CORRECTION: tl.constexpr):
    NEG_INF: tl.constexpr = float("-inf")
    F64: tl.constexpr = tl.float64
    cols = tl.arange(0, BLOCK)
    inv_t = 1.0 / T
    inv_t_dt = inv_t.to(DT)
    m_s = tl.full([], NEG_INF, DT)
    m_t = tl.full([], NEG_INF, DT)
    zs = tl.zeros([], F64)
    zt = tl.zeros([], F64)
    cross = tl.zeros([], F64)
    z1 = tl.zeros([], F64)
    s_sum = tl.zeros([], F64)
    b = tl.zeros([], tl.int64)
    tx1 = tl.full([], NEG_INF, DT)  # rectify: the two largest teacher logits away from the label
    tx2 = tl.full([], NEG_INF, DT)
    idx1 = tl.zeros([], tl.int64)
    for start in range(0, W, BLOCK):
        idx = start + cols
        mask = idx < W
        s = tl.load(s_row + idx, mask=mask, other=NEG_INF).to(DT)
        t = _teacher(t_row, idx, mask, ly, log_a, log_rest, DT, VIRTUAL)
        block_max_t = tl.max(t, 0)
        if CORRECTION == CORRECTION_SWAP or CORRECTION == CORRECTION_RECTIFY:
            arg = tl.argmax(t, 0).to(tl.int64) + start
            b = tl.where(block_max_t > m_t, arg, b)  # strict: the first maximum
        ms_new = tl.maximum(m_s, tl.max(s, 0))
        mt_new = tl.maximum(m_t, block_max_t)
        ms_safe = tl.where(ms_new == NEG_INF, 0.0, ms_new)
        mt_safe = tl.where(mt_new == NEG_INF, 0.0, mt_new)
        es = tl.exp((s - ms_safe) * inv_t_dt)
        et = tl.exp((t - mt_safe) * inv_t_dt)
        # the sums so far, moved to the new maxima in float64 (exactly 1 where they did not move)
        alpha_s = tl.exp((m_s.to(F64) - ms_safe.to(F64)) * inv_t)
        alpha_t = tl.exp((m_t.to(F64) - mt_safe.to(F64)) * inv_t)
        zs = zs * alpha_s + tl.sum(es, 0).to(F64)
        zt = zt * alpha_t + tl.sum(et, 0).to(F64)
        cross = cross * alpha_t + tl.sum(tl.where(et > 0, et * (t - s), 0.0), 0).to(F64)
        if HAS_CE:  # CE's sum at T = 1
            z1 = (z1 * tl.exp(m_s.to(F64) - ms_safe.to(F64))
                  + tl.sum(tl.exp(s - ms_safe), 0).to(F64))
        if CORRECTION == CORRECTION_SMOOTH:
            s_sum += tl.sum(tl.where(mask, s, 0.0), 0).to(F64)
        if CORRECTION == CORRECTION_RECTIFY:
            away = tl.where(idx == ly, NEG_INF, t)
            v1 = tl.max(away, 0)
            i1 = tl.argmax(away, 0).to(tl.int64) + start
            v2 = tl.max(tl.where(idx == i1, NEG_INF, away), 0)
            better = v1 > tx1  # strict: ties go to the runner-up, as in the C++ kernel
            tx2 = tl.where(better, tl.maximum(tx1, v2), tl.maximum(tx2, v1))
            idx1 = tl.where(better, i1, idx1)
            tx1 = tl.where(better, v1, tx1)
        m_s = ms_new
        m_t = mt_new
    owns = ly >= 0
    at_label = tl.where(owns, ly, 0)
    s_y = tl.where(owns, tl.load(s_row + at_label).to(F64), 0.0)
    if VIRTUAL:
        t_y = tl.where(owns, log_a.to(DT).to(F64), 0.0)
    else:
        t_y = tl.where(owns, tl.load(t_row + at_label).to(DT).to(F64), 0.0)
    s_b = tl.zeros([], F64)
    if CORRECTION == CORRECTION_SWAP or CORRECTION == CORRECTION_RECTIFY:
        s_b = tl.load(s_row + b).to(DT).to(F64)
    tl.store(out_row + ST_MS, m_s.to(F64))
    tl.store(out_row + ST_ZS, zs)
    tl.store(out_row + ST_MT, m_t.to(F64))
    tl.store(out_row + ST_ZT, zt)
    tl.store(out_row + ST_CROSS, cross)
    tl.store(out_row + ST_Z1, z1)
    tl.store(out_row + ST_SY, s_y)
    tl.store(out_row + ST_TY, t_y)
    tl.store(out_row + ST_OWNS, owns.to(F64))
    tl.store(out_row + ST_B, (b + vocab_start).to(F64))
    tl.store(out_row + ST_SB, s_b)
    tl.store(out_row + ST_TX1, tx1.to(F64))
    tl.store(out_row + ST_IDX1, (idx1 + vocab_start).to(F64))
    tl.store(out_row + ST_TX2, tx2.to(F64))
    tl.store(out_row + ST_SSUM, s_sum)


@triton.jit
def _shard_stats_kernel(s_ptr, s_stride, t_ptr, t_stride, y_ptr, y_stride, temp_ptr, temp_stride,
                        out_ptr, W, vocab_start, log_a_hi, log_a_lo, log_rest_hi, log_rest_lo,
                        BLOCK: tl.constexpr, VIRTUAL: tl.constexpr, HAS_LABELS: tl.constexpr,
                        HAS_CE: tl.constexpr, CORRECTION: tl.constexpr,
                        FLOAT_MATH: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_stride
    t_row = t_ptr + row * t_stride
    out_row = out_ptr + row * NUM_STATS
    T = tl.load(temp_ptr + row * temp_stride).to(tl.float64)
    ly = _local_label(y_ptr, y_stride, row, W, vocab_start, HAS_LABELS)
    log_a = _f64(log_a_hi, log_a_lo)
    log_rest = _f64(log_rest_hi, log_rest_lo)
    if FLOAT_MATH:
        if T <= FLOAT_SHARD_T:
            _stats_row(s_row, t_row, out_row, W, ly, T, vocab_start, log_a, log_rest,
                       tl.float32, BLOCK, VIRTUAL, HAS_CE, CORRECTION)
        else:
            _stats_row(s_row, t_row, out_row, W, ly, T, vocab_start, log_a, log_rest,
                       tl.float64, BLOCK, VIRTUAL, HAS_CE, CORRECTION)
    else:
        _stats_row(s_row, t_row, out_row, W, ly, T, vocab_start, log_a, log_rest,
                   tl.float64, BLOCK, VIRTUAL, HAS_CE, CORRECTION)


@triton.jit
def _pass_row(s_row, t_row, g_row, sums_row, r, W, ly, vocab_start, log_a, log_rest, ce_w,
              log_ec, param, DT: tl.constexpr, BLOCK: tl.constexpr, VIRTUAL: tl.constexpr,
              HAS_CE: tl.constexpr, DIVERGENCE: tl.constexpr, GRAD: tl.constexpr,
              FLOAT_MATH: tl.constexpr):
    F64: tl.constexpr = tl.float64
    cols = tl.arange(0, BLOCK)
    inv_t = (1.0 / tl.load(r + RW_T)).to(DT)
    ms = tl.load(r + RW_MS).to(DT)
    log_zs = tl.load(r + RW_LOG_ZS).to(DT)
    mt = tl.load(r + RW_MT).to(DT)
    log_zt = tl.load(r + RW_LOG_ZT).to(DT)
    c1 = (ce_w / tl.load(r + RW_Z1)).to(DT)
    kd_grad = tl.load(r + RW_KD_GRAD).to(DT)
    lb = tl.load(r + RW_B).to(tl.int64) - vocab_start
    lr_y = tl.load(r + RW_LR_Y).to(DT)
    lr_b = tl.load(r + RW_LR_B).to(DT)
    g_mean = tl.load(r + RW_G_MEAN).to(DT)
    scale = tl.load(r + RW_SCALE).to(DT)
    fix_y = tl.load(r + RW_FIX_Y) > 0
    fix_b = tl.load(r + RW_FIX_B) > 0
    smoothed = tl.load(r + RW_SMOOTHED) > 0
    D = tl.zeros([], F64)
    pG = tl.zeros([], F64)
    for start in range(0, W, BLOCK):
        idx = start + cols
        mask = idx < W
        s = tl.load(s_row + idx, mask=mask, other=float("-inf")).to(DT)
        t = _teacher(t_row, idx, mask, ly, log_a, log_rest, DT, VIRTUAL)
        lp = (s - ms) * inv_t - log_zs
        lr = tl.where(smoothed, log_ec.to(DT), (t - mt) * inv_t - log_zt)
        lr = tl.where(idx == ly, tl.where(fix_y, lr_y, lr), lr)  # the correction's targets
        lr = tl.where(idx == lb, tl.where(fix_b, lr_b, lr), lr)
        P = tl.exp(lp)
        Q = tl.exp(lr)
        if DIVERGENCE != DIVERGENCE_KL:
            d, G = _div_terms(P, lp, Q, lr, DIVERGENCE, param.to(DT))
        if GRAD:
            if DIVERGENCE == DIVERGENCE_KL:
                direction = P - Q
            else:
                direction = tl.where(P > 0, P * (G - g_mean), 0.0)
            g = tl.where(kd_grad != 0, kd_grad * direction, 0.0)
            if HAS_CE:
                g = g + c1 * tl.exp(s - ms) - tl.where(idx == ly, ce_w.to(DT), 0.0)
            g = tl.where(scale == 0, 0.0, g * scale)  # a NaN scale: a bad row
            if not FLOAT_MATH:  # float64 logits
                tl.store(g_row + idx, g, mask=mask)
            else:  # (through float32: the interpreter has no float64 -> bfloat16)
                tl.store(g_row + idx, g.to(tl.float32).to(g_row.dtype.element_ty), mask=mask)
        else:
            if DIVERGENCE != DIVERGENCE_KL:
                D += tl.sum(tl.where(mask, d, 0.0), 0).to(F64)
                pG += tl.sum(tl.where(mask, P * G, 0.0), 0).to(F64)
    if not GRAD:
        tl.store(sums_row, tl.where(tl.load(r + RW_HAS_TEACHER) > 0, D, 0.0))
        tl.store(sums_row + 1, pG)


@triton.jit
def _shard_pass_kernel(s_ptr, s_stride, t_ptr, t_stride, y_ptr, y_stride, rows_ptr, g_ptr,
                       g_stride, sums_ptr, W, vocab_start, log_a_hi, log_a_lo, log_rest_hi,
                       log_rest_lo, ce_hi, ce_lo, log_ec_hi, log_ec_lo, param_hi, param_lo,
                       BLOCK: tl.constexpr, VIRTUAL: tl.constexpr, HAS_LABELS: tl.constexpr,
                       HAS_CE: tl.constexpr, DIVERGENCE: tl.constexpr, GRAD: tl.constexpr,
                       FLOAT_MATH: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_stride
    t_row = t_ptr + row * t_stride
    g_row = g_ptr + row * g_stride
    sums_row = sums_ptr + row * 2
    r = rows_ptr + row * NUM_ROWS
    ly = _local_label(y_ptr, y_stride, row, W, vocab_start, HAS_LABELS)
    log_a = _f64(log_a_hi, log_a_lo)
    log_rest = _f64(log_rest_hi, log_rest_lo)
    ce_w = _f64(ce_hi, ce_lo)
    log_ec = _f64(log_ec_hi, log_ec_lo)
    param = _f64(param_hi, param_lo)
    if FLOAT_MATH:
        if tl.load(r + RW_T) <= FLOAT_SHARD_T:
            _pass_row(s_row, t_row, g_row, sums_row, r, W, ly, vocab_start, log_a, log_rest,
                      ce_w, log_ec, param, tl.float32, BLOCK, VIRTUAL, HAS_CE, DIVERGENCE, GRAD,
                      FLOAT_MATH)
        else:
            _pass_row(s_row, t_row, g_row, sums_row, r, W, ly, vocab_start, log_a, log_rest,
                      ce_w, log_ec, param, tl.float64, BLOCK, VIRTUAL, HAS_CE, DIVERGENCE, GRAD,
                  FLOAT_MATH)
    else:
        _pass_row(s_row, t_row, g_row, sums_row, r, W, ly, vocab_start, log_a, log_rest,
                  ce_w, log_ec, param, tl.float64, BLOCK, VIRTUAL, HAS_CE, DIVERGENCE, GRAD,
                  FLOAT_MATH)


def _virtual(o, vocab_size):
    log_a, log_rest = config.virtual_logits(o.virtual_teacher, vocab_size)
    return (*split64(log_a), *split64(log_rest))


@torch.library.triton_op("kdkernels::shard_stats_triton", mutates_args=())
def shard_stats_triton(student: torch.Tensor, teacher: Optional[torch.Tensor],
                       target: Optional[torch.Tensor], temps: torch.Tensor, vocab_start: int,
                       vocab_size: int, options: List[float]) -> torch.Tensor:
    """[N, len(SHARD_STATS)] float64: each row's statistics over its columns [vocab_start,
    vocab_start + W) (student / teacher [N, W] with unit class stride; temps [N] float64)."""
    o = _options.FusedOptions.unpack(options)
    N, W = student.shape
    out = student.new_empty((N, len(_options.SHARD_STATS)), dtype=torch.float64)
    if N == 0:
        return out
    block, warps = config.shard_config(W)
    torch.library.wrap_triton(_shard_stats_kernel)[(N,)](
        student, student.stride(0), teacher if teacher is not None else student,
        teacher.stride(0) if teacher is not None else 0,
        target if target is not None else student, target.stride(0) if target is not None else 0,
        temps, temps.stride(0), out, W, vocab_start, *_virtual(o, vocab_size),
        BLOCK=block, VIRTUAL=teacher is None, HAS_LABELS=target is not None,
        HAS_CE=o.ce_weight != 0, CORRECTION=o.correction,
        FLOAT_MATH=student.dtype != torch.float64, num_warps=warps)
    return out


@torch.library.triton_op("kdkernels::shard_pass_triton", mutates_args=())
def shard_pass_triton(student: torch.Tensor, teacher: Optional[torch.Tensor],
                      target: Optional[torch.Tensor], rows: torch.Tensor, vocab_start: int,
                      vocab_size: int, options: List[float], grad: bool) -> torch.Tensor:
    """From each row's merged values (rows: [N, len(SHARD_ROWS)] float64, contiguous): the
    range's gradient ([N, W], the student's dtype), or its part of D and sum_j p_j G_j
    ([N, 2] float64)."""
    o = _options.FusedOptions.unpack(options)
    N, W = student.shape
    out = (torch.empty_like(student, memory_format=torch.contiguous_format) if grad
           else student.new_empty((N, 2), dtype=torch.float64))
    _launch_pass(student, teacher, target, rows, vocab_start, vocab_size, o, grad, out)
    return out


@torch.library.triton_op("kdkernels::shard_pass_triton_", mutates_args=("student",))
def shard_pass_triton_(student: torch.Tensor, teacher: Optional[torch.Tensor],
                       target: Optional[torch.Tensor], rows: torch.Tensor, vocab_start: int,
                       vocab_size: int, options: List[float]) -> None:
    """The range's gradient written over `student` (its logits are not needed after)."""
    o = _options.FusedOptions.unpack(options)
    _launch_pass(student, teacher, target, rows, vocab_start, vocab_size, o, True, student)


def _launch_pass(student, teacher, target, rows, vocab_start, vocab_size, o, grad, out):
    N, W = student.shape
    if N == 0:
        return
    block, warps = config.shard_config(W)
    log_ec = math.log(o.smooth_eps / vocab_size) if o.smooth_eps > 0 else -math.inf
    torch.library.wrap_triton(_shard_pass_kernel)[(N,)](
        student, student.stride(0), teacher if teacher is not None else student,
        teacher.stride(0) if teacher is not None else 0,
        target if target is not None else student, target.stride(0) if target is not None else 0,
        rows, out if grad else student, out.stride(0) if grad else 0,
        out if not grad else rows, W, vocab_start, *_virtual(o, vocab_size),
        *split64(o.ce_weight), *split64(log_ec), *split64(o.divergence_param),
        BLOCK=block, VIRTUAL=teacher is None, HAS_LABELS=target is not None,
        HAS_CE=o.ce_weight != 0, DIVERGENCE=o.divergence, GRAD=grad,
        FLOAT_MATH=student.dtype != torch.float64, num_warps=warps)
