"""The Triton kernels of the triton backend and their torch.library ops. Imported by
triton_distill only where they can run (a CUDA device, or TRITON_INTERPRET=1), so that importing
kdkernels on a CPU-only machine loads neither triton nor torch's inductor."""
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from .. import _options
from . import triton_distill as config

# the enums of kdkernels/_options.py, as compile-time constants of the kernels
TEMP_SCALAR = tl.constexpr(_options.TEMP_SCALAR)
TEMP_ROWS = tl.constexpr(_options.TEMP_ROWS)
TEMP_COSINE = tl.constexpr(_options.TEMP_COSINE)
CORRECTION_NONE = tl.constexpr(_options.CORRECTION_NONE)
CORRECTION_SWAP = tl.constexpr(_options.CORRECTION_SWAP)
CORRECTION_SMOOTH = tl.constexpr(_options.CORRECTION_SMOOTH)
CORRECTION_RECTIFY = tl.constexpr(_options.CORRECTION_RECTIFY)
DIVERGENCE_KL = tl.constexpr(_options.DIVERGENCE_KL)
DIVERGENCE_REVERSE_KL = tl.constexpr(_options.DIVERGENCE_REVERSE_KL)
DIVERGENCE_JSD = tl.constexpr(_options.DIVERGENCE_JSD)
DIVERGENCE_SKEW_KL = tl.constexpr(_options.DIVERGENCE_SKEW_KL)
DIVERGENCE_SKEW_REVERSE_KL = tl.constexpr(_options.DIVERGENCE_SKEW_REVERSE_KL)
FLAG_TEACHER_CORRECT = tl.constexpr(_options.FLAG_TEACHER_CORRECT)
FLAG_STILL_WRONG = tl.constexpr(_options.FLAG_STILL_WRONG)
PAST_ANY_CLASS = tl.constexpr(1 << 62)  # a class id above every real one


@triton.jit
def _teacher_block(t_row, idx, mask, y, log_a, log_rest, VIRTUAL: tl.constexpr):
    if VIRTUAL:  # Tf-KD reg: the teacher's logits are log(pd), built from the label
        t = tl.where(idx == y, log_a, log_rest)
        t = tl.where(mask, t, float("-inf"))
    else:
        t = tl.load(t_row + idx, mask=mask, other=float("-inf")).to(tl.float32)
    return t

@triton.jit
def _expm1_excess(d):
    """F(d) = expm1(d) - d = sum_{k=2..9} d^k / k!, for |d| < 1/2 (float32 accurate)."""
    f = 1.0 / 362880.0
    f = f * d + 1.0 / 40320.0
    f = f * d + 1.0 / 5040.0
    f = f * d + 1.0 / 720.0
    f = f * d + 1.0 / 120.0
    f = f * d + 1.0 / 24.0
    f = f * d + 1.0 / 6.0
    f = f * d + 0.5
    return d * d * f


@triton.jit
def _expm1(x):  # accurate near 0
    small = tl.abs(x) < 0.5
    xs = tl.where(small, x, 0.0)
    return tl.where(small, xs + _expm1_excess(xs), tl.exp(x) - 1.0)


@triton.jit
def _log1p_excess(a):
    """r(a) = (1 + a) log1p(a) - a >= 0, accurate near 0."""
    x = tl.where(tl.abs(a) < 0.1, a, 0.0)
    series = 1.0 / 56.0
    series = series * -x + 1.0 / 42.0
    series = series * -x + 1.0 / 30.0
    series = series * -x + 1.0 / 20.0
    series = series * -x + 1.0 / 12.0
    series = series * -x + 1.0 / 6.0
    series = series * -x + 0.5
    return tl.where(tl.abs(a) < 0.1, series * x * x, (1.0 + a) * tl.log(1.0 + a) - a)


@triton.jit
def _kl_term(x, log_x, log_p):  # x (log x - log p) with 0 log 0 = 0
    return tl.where(x > 0, x * (log_x - log_p), 0.0)


@triton.jit
def _div_terms(P, lP, R, lR, divergence: tl.constexpr, param):
    """Per entry of the target r and the student p (with their logs): the divergence's term d
    (summing to D) and G = dD/dp up to a constant, 0 where p = 0 (docs/METHODS.md)."""
    if divergence == DIVERGENCE_KL:  # r log(r / p)
        d = tl.where(R > 0, R * (lR - lP), 0.0)
        G = -R / P
    elif divergence == DIVERGENCE_REVERSE_KL:  # p log(p / r)
        d = tl.where(P > 0, P * (lP - lR), 0.0)
        G = lP - lR
    elif divergence == DIVERGENCE_JSD:  # beta r log(r / m) + (1 - beta) p log(p / m)
        lm = tl.log((1.0 - param) * P + param * R)
        d = (param * tl.where(R > 0, R * (lR - lm), 0.0)
             + (1.0 - param) * tl.where(P > 0, P * (lP - lm), 0.0))
        G = (1.0 - param) * (lP - lm)
    elif divergence == DIVERGENCE_SKEW_KL:  # r log(r / m), m = a r + (1 - a) p
        m = param * R + (1.0 - param) * P
        d = tl.where(R > 0, R * (lR - tl.log(m)), 0.0)
        G = tl.where(m > 0, -(1.0 - param) * R / m, 0.0)
    elif divergence == DIVERGENCE_SKEW_REVERSE_KL:  # p log(p / m), m = a p + (1 - a) r
        m = param * P + (1.0 - param) * R
        d = tl.where(P > 0, P * (lP - tl.log(m)), 0.0)
        G = lP - tl.log(m) + 1.0 - param * P / m
    else:  # total variation, |p - r| / 2
        d = 0.5 * tl.abs(P - R)
        G = tl.where(P > R, 0.5, tl.where(P < R, -0.5, 0.0))
    return d, tl.where(P > 0, G, 0.0)

@triton.jit
def _atanh_series(w2):
    """(atanh(w) - w) / w^3 = 1/3 + w^2/5 + ... to w^10/13: float32-accurate for |w| <= 1/3."""
    series = 1.0 / 13.0
    series = series * w2 + 1.0 / 11.0
    series = series * w2 + 1.0 / 9.0
    series = series * w2 + 1.0 / 7.0
    series = series * w2 + 1.0 / 5.0
    return series * w2 + 1.0 / 3.0


@triton.jit
def _log1p(z):
    """log1p(z), accurate near 0 (tl.log(1 + z) is not: its error is absolute): for |z| < 1/2
    as 2 atanh(w), w = z / (2 + z)."""
    small = tl.abs(z) < 0.5
    w = tl.where(small, z, 0.0) / (2.0 + tl.where(small, z, 0.0))
    return tl.where(small, 2.0 * w * (1.0 + w * w * _atanh_series(w * w)), tl.log(1.0 + z))


@triton.jit
def _x_minus_log1p(z):
    """X(z) = z - log1p(z) >= 0 (~z^2/2), accurate near 0: z^2 / (2 + z) - 2 w^3 (1/3 + ...)."""
    small = tl.abs(z) < 0.5
    zs = tl.where(small, z, 0.0)
    w = zs / (2.0 + zs)
    return tl.where(small, zs * w - 2.0 * w * w * w * _atanh_series(w * w), z - tl.log(1.0 + z))


@triton.jit
def _div_terms_exact(P, lP, R, lR, delta, divergence: tl.constexpr, param):
    """_div_terms given also delta = log(r / p), computed accurately: where |delta| < 1 each term
    is p f(e^delta) with f >= 0, ~delta^2 (the f-divergence's linear part, which sums to 0,
    taken out) and G shifted by a constant to be O(delta); elsewhere the direct terms with the
    same part and shift (docs/METHODS.md, "The other divergences without cancellation")."""
    d_far, G_far = _div_terms(P, lP, R, lR, divergence, param)
    E = _expm1(delta)
    u = E + 1.0
    if divergence == DIVERGENCE_REVERSE_KL:  # f(u) = u - 1 - log u
        d = _x_minus_log1p(E)
        G = -delta
        d_far += R - P
    elif divergence == DIVERGENCE_JSD:
        a = param * E
        d = (param * u * _x_minus_log1p((1.0 - param) * _expm1(-delta))
             + (1.0 - param) * _x_minus_log1p(a))
        G = -(1.0 - param) * _log1p(a)
    elif divergence == DIVERGENCE_SKEW_KL:  # f(u) = u log(u / m) - (1 - a)(u - 1)
        bb = (1.0 - param) * _expm1(-delta)
        d = u * _x_minus_log1p(bb)
        G = (1.0 - param) * bb / (1.0 + bb)
        d_far -= (1.0 - param) * (R - P)
        G_far += 1.0 - param
    elif divergence == DIVERGENCE_SKEW_REVERSE_KL:  # f(u) = -log m + (1 - a)(u - 1)
        z = (1.0 - param) * E
        d = _x_minus_log1p(z)
        G = param * z / (1.0 + z) - _log1p(z)
        d_far += (1.0 - param) * (R - P)
        G_far -= 1.0 - param
    else:  # total variation: the sign of p - r from delta
        d = 0.5 * tl.abs(E)
        G = tl.where(delta > 0, -0.5, tl.where(delta < 0, 0.5, 0.0))
    near = (tl.abs(delta) < 1.0) & (P > 0)
    return tl.where(near, P * d, d_far), tl.where(P > 0, tl.where(near, G, G_far), 0.0)


@triton.jit
def _store_row(loss_ptr, temp_out_ptr, flags_ptr, row, loss, T, valid, in_range, wrong,
               still_wrong, HAS_LABELS: tl.constexpr):
    """Writes a row's loss (0 if ignored, NaN for a bad temperature or label), temperature and
    flags; returns whether the row is bad."""
    bad = (T <= 0) | (T != T) | (valid & ~in_range)
    loss = tl.where(valid, loss, 0.0)
    tl.store(loss_ptr + row, tl.where(bad, float("nan"), loss))
    tl.store(temp_out_ptr + row, T)
    flags = tl.where(still_wrong, FLAG_STILL_WRONG, 0)
    if HAS_LABELS:
        flags += tl.where(valid & ~wrong, FLAG_TEACHER_CORRECT, 0)
    tl.store(flags_ptr + row, flags.to(tl.int8))
    return bad


@triton.jit
def _scalars(temp_value, tau0, beta, tau_min, kd_weight, wrong_kd_weight, ce_weight, smooth_eps):
    """The options' floats in float32: they arrive as float32 or (from inductor) float64."""
    return (tl.cast(temp_value, tl.float32), tl.cast(tau0, tl.float32),
            tl.cast(beta, tl.float32), tl.cast(tau_min, tl.float32),
            tl.cast(kd_weight, tl.float32), tl.cast(wrong_kd_weight, tl.float32),
            tl.cast(ce_weight, tl.float32), tl.cast(smooth_eps, tl.float32))


@triton.jit
def _label(y_ptr, y_stride, row, ignore_index, C, HAS_LABELS: tl.constexpr):
    """(label, counts, in range) of a row; a bad label is read as 0 (a safe address) and
    poisons the row later."""
    if HAS_LABELS:
        y = tl.load(y_ptr + row * y_stride).to(tl.int64)
        valid = y != ignore_index
        in_range = (y >= 0) & (y < C)
        y = tl.where(in_range, y, 0)
    else:
        y = tl.zeros([], dtype=tl.int64)
        valid = tl.full([], 1, tl.int1)
        in_range = tl.full([], 1, tl.int1)
    return y, valid, in_range


@triton.jit
def _distill_kernel(
    s_ptr, s_stride, t_ptr, t_stride, y_ptr, y_stride, temp_ptr, temp_stride,
    loss_ptr, temp_out_ptr, flags_ptr, coef_ptr, index_ptr, C,
    # the options, named as in kdkernels/_options.py (FusedOptions.triton_kwargs)
    temp_mode: tl.constexpr, temp_value, tau0, beta, tau_min, kd_weight, wrong_kd_weight,
    ce_weight, correction: tl.constexpr, smooth_eps, virtual_teacher, t2_scale: tl.constexpr,
    ignore_index, divergence: tl.constexpr, divergence_param, teacher_tail: tl.constexpr,
    compute_grad, grad_scale, reduction: tl.constexpr,
    # derived by the launcher
    log_a, log_rest, BLOCK: tl.constexpr, VIRTUAL: tl.constexpr, HAS_LABELS: tl.constexpr,
    HAS_CE: tl.constexpr, NUM_COEF: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_stride
    t_row = t_ptr + row * t_stride
    cols = tl.arange(0, BLOCK)
    NEG_INF: tl.constexpr = float("-inf")
    temp_value, tau0, beta, tau_min, kd_weight, wrong_kd_weight, ce_weight, smooth_eps = _scalars(
        temp_value, tau0, beta, tau_min, kd_weight, wrong_kd_weight, ce_weight, smooth_eps)
    log_a = tl.cast(log_a, tl.float32)
    log_rest = tl.cast(log_rest, tl.float32)

    y, valid, in_range = _label(y_ptr, y_stride, row, ignore_index, C, HAS_LABELS)

    # The DTD pre-pass keeps its sums per lane ([BLOCK] vectors) and reduces them once.
    # (Measured on an H100: the same for loop 1 made the forward 5-19% slower than one
    # reduction per block and statistic, so loop 1 reduces per block.)
    # ---- the row's temperature ------------------------------------------------------
    if temp_mode == TEMP_SCALAR:
        T = tl.zeros([], dtype=tl.float32) + temp_value
    elif temp_mode == TEMP_ROWS:
        T = tl.load(temp_ptr + row * temp_stride).to(tl.float32)
    else:  # DTD: a pre-pass over the row at T = 1
        m1 = tl.full([], NEG_INF, tl.float32)
        z1p = tl.zeros([BLOCK], dtype=tl.float32)
        ss = tl.zeros([BLOCK], dtype=tl.float32)
        tt = tl.zeros([BLOCK], dtype=tl.float32)
        st = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, C, BLOCK):
            idx = start + cols
            mask = idx < C
            s = tl.load(s_row + idx, mask=mask, other=NEG_INF).to(tl.float32)
            if temp_mode == TEMP_COSINE:  # cosine over the classes where both logits are finite
                t = _teacher_block(t_row, idx, mask, y, log_a, log_rest, VIRTUAL)
                finite = mask & ((s - s) == 0) & ((t - t) == 0)
                fs = tl.where(finite, s, 0.0)
                ft = tl.where(finite, t, 0.0)
                ss += fs * fs
                tt += ft * ft
                st += fs * ft
            else:  # max_prob: sum_j exp(s_j - max s), online
                m_new = tl.maximum(m1, tl.max(s, 0))
                m_safe = tl.where(m_new == NEG_INF, 0.0, m_new)
                z1p = z1p * tl.exp(m1 - m_safe) + tl.exp(s - m_safe)
                m1 = m_new
        if temp_mode == TEMP_COSINE:
            norms = (tl.maximum(tl.sqrt(tl.sum(ss, 0)), 1e-12)
                     * tl.maximum(tl.sqrt(tl.sum(tt, 0)), 1e-12))
            w = (1.0 - tl.sum(st, 0) / norms) * (1.0 - tl.sum(st, 0) / norms)
        else:
            w = tl.sum(z1p, 0)
        raw = tau0 - beta * w
        T = tl.where(raw < tau_min, tau_min, raw)
    inv_t = 1.0 / T

    # ---- the cancellation-free KL (docs/METHODS.md): centre d = (t - s) / T - c0 on the mean
    # of (t - s) / T over the first block's finite pairs (any c0 is exact; a close one keeps
    # r(A) small)
    first = cols < C
    s0 = tl.load(s_row + cols, mask=first, other=0.0).to(tl.float32)
    t0 = _teacher_block(t_row, cols, first, y, log_a, log_rest, VIRTUAL)
    finite0 = first & ((s0 - s0) == 0) & ((t0 - t0) == 0)
    c0 = (tl.sum(tl.where(finite0, t0 - s0, 0.0), 0) * inv_t
          / tl.maximum(tl.sum(finite0.to(tl.float32), 0), 1.0))

    # ---- loop 1: online softmax statistics -----------------------------------------
    LOG2E: tl.constexpr = 1.4426950408889634
    a = inv_t * LOG2E
    a_sum = tl.zeros([], dtype=tl.float32)    # sum_j es_j expm1(d_j), like zs
    psi_sum = tl.zeros([], dtype=tl.float32)  # sum_j es_j psi(d_j)
    orphans = tl.zeros([], dtype=tl.int32)    # classes with q > 0 and p = 0
    m_s = tl.full([], NEG_INF, tl.float32)
    m_t = tl.full([], NEG_INF, tl.float32)
    zs = tl.zeros([], dtype=tl.float32)
    zt = tl.zeros([], dtype=tl.float32)
    z1 = tl.zeros([], dtype=tl.float32)
    cross = tl.zeros([], dtype=tl.float32)
    s_sum = tl.zeros([], dtype=tl.float32)
    b = tl.zeros([], dtype=tl.int64)
    top1 = tl.full([], NEG_INF, tl.float32)  # rectify: the two largest teacher logits
    top2 = tl.full([], NEG_INF, tl.float32)  # away from the label
    for start in range(0, C, BLOCK):
        idx = start + cols
        mask = idx < C
        s = tl.load(s_row + idx, mask=mask, other=NEG_INF).to(tl.float32)
        t = _teacher_block(t_row, idx, mask, y, log_a, log_rest, VIRTUAL)
        block_max_t = tl.max(t, 0)
        block_arg_t = tl.argmax(t, 0).to(tl.int64) + start
        b = tl.where(block_max_t > m_t, block_arg_t, b)  # strict: keep the first maximum
        ms_new = tl.maximum(m_s, tl.max(s, 0))
        mt_new = tl.maximum(m_t, block_max_t)
        ms_safe = tl.where(ms_new == NEG_INF, 0.0, ms_new)
        mt_safe = tl.where(mt_new == NEG_INF, 0.0, mt_new)
        # exp2 with log2(e) / T folded into one factor: one multiply per exponential fewer
        es = tl.exp2((s - ms_safe) * a)
        et = tl.exp2((t - mt_safe) * a)
        alpha_s = tl.exp2((m_s - ms_safe) * a)
        zs = zs * alpha_s + tl.sum(es, 0)
        d = (t - s) * inv_t - c0
        small = tl.abs(d) < 0.5
        dz = tl.where(small, d, 0.0)
        F = _expm1_excess(dz)
        et_k = et * tl.exp2(((mt_safe - ms_safe) * inv_t - c0) * LOG2E)  # = es e^d
        live = (es > 0) | (et > 0)
        e = tl.where(small, es * (dz + F), et_k - es)
        psi = tl.where(small, es * (dz * dz + (dz - 1.0) * F), es - et_k * (1.0 - d))
        a_sum = a_sum * alpha_s + tl.sum(tl.where(live, e, 0.0), 0)
        psi_sum = psi_sum * alpha_s + tl.sum(tl.where(live, psi, 0.0), 0)
        orphans += tl.sum(((es == 0) & (et > 0)).to(tl.int32), 0)
        alpha_t = tl.exp2((m_t - mt_safe) * a)
        zt = zt * alpha_t + tl.sum(et, 0)
        cross = cross * alpha_t + tl.sum(tl.where(et > 0, et * (t - s), 0.0), 0)
        if HAS_CE:
            if T == 1.0:  # the same row for every lane: CE's exponentials are the tempered ones
                e1_sum = tl.sum(es, 0)
                alpha_1 = alpha_s
            else:
                e1_sum = tl.sum(tl.exp2((s - ms_safe) * LOG2E), 0)
                alpha_1 = tl.exp2((m_s - ms_safe) * LOG2E)
            z1 = z1 * alpha_1 + e1_sum
        if correction == CORRECTION_SMOOTH:
            s_sum += tl.sum(tl.where(mask, s, 0.0), 0)
        if correction == CORRECTION_RECTIFY:
            tx = tl.where(idx == y, NEG_INF, t)
            bx1 = tl.max(tx, 0)
            bx2 = tl.max(tl.where(idx == tl.argmax(tx, 0) + start, NEG_INF, tx), 0)
            top2 = tl.maximum(tl.maximum(top2, bx2), tl.minimum(top1, bx1))
            top1 = tl.maximum(top1, bx1)
        m_s = ms_new
        m_t = mt_new

    log_zs = tl.log(zs)
    log_zt = tl.log(zt)
    A = a_sum / zs
    kl_stable = (psi_sum / zs - _log1p_excess(A)) / (1.0 + A)
    # |A| < 1/2 keeps 1 + A free of cancellation; elsewhere p and q are far apart and the usual
    # form has nothing to lose
    stable = (tl.abs(A) < 0.5) & ((kl_stable - kl_stable) == 0) & (orphans == 0)
    kl = tl.where(stable, kl_stable,
                  cross * inv_t / zt + (m_s - m_t) * inv_t + log_zs - log_zt)

    # ---- the teacher correction on rows the teacher gets wrong ----------------------
    wrong = tl.zeros([], dtype=tl.int1)
    still_wrong = tl.zeros([], dtype=tl.int1)
    s_y = tl.zeros([], dtype=tl.float32)
    fix_y = tl.zeros([], dtype=tl.float32)
    fix_b = tl.zeros([], dtype=tl.float32)
    if HAS_LABELS:
        s_y = tl.load(s_row + y).to(tl.float32)
        if VIRTUAL:
            t_y = tl.zeros([], dtype=tl.float32) + log_a
        else:
            t_y = tl.load(t_row + y).to(tl.float32)
        wrong = valid & in_range & (t_y < m_t)
        still_wrong = wrong
    # a teacher row with no finite logit has no distribution: its KD term is 0 (CE still counts)
    has_teacher = m_t > NEG_INF
    kl = tl.where(has_teacher, kl, 0.0)
    kd_w = tl.where(wrong, wrong_kd_weight, kd_weight)
    kd_w = tl.where(has_teacher, kd_w, 0.0)
    if t2_scale:
        kd_grad = kd_w * T
        kd_scale = kd_w * T * T
    else:
        kd_grad = kd_w * inv_t
        kd_scale = kd_w
    q_coef = tl.where(has_teacher, kd_grad / zt, 0.0)
    const_term = tl.zeros([], dtype=tl.float32)
    if correction == CORRECTION_SWAP or correction == CORRECTION_RECTIFY:  # new values at y, b
        s_b = tl.load(s_row + b).to(tl.float32)
        lp_y = (s_y - m_s) * inv_t - log_zs
        lp_b = (s_b - m_s) * inv_t - log_zs
        lq_y = (t_y - m_t) * inv_t - log_zt
        lq_b = -log_zt  # t_b is the maximum
        q_y = tl.exp(lq_y)
        q_b = tl.exp(lq_b)
        if correction == CORRECTION_SWAP:
            # KL changes by (q_y - q_b)(lp_y - lp_b): both differences exact, not cancelled
            diff = q_b * _expm1((t_y - m_t) * inv_t)
            kl_fix = diff * (s_y - s_b) * inv_t
            q_change_y = diff
            q_change_b = -diff
            still_wrong = tl.zeros([], dtype=tl.int1)  # the label now holds the maximum
            lr_y = lq_b
            lr_b = lq_y
        else:
            new_y = (q_y + 1) * 0.5
            new_b = q_b * 0.5
            k = (q_y + q_b) / (new_y + new_b)
            r_y = new_y * k
            r_b = new_b * k
            q_other = tl.where(top2 == NEG_INF, 0.0, tl.exp((top2 - m_t) * inv_t) / zt)
            still_wrong = wrong & (tl.maximum(r_b, q_other) > r_y)
            kl_fix = (_kl_term(r_y, tl.log(r_y), lp_y) + _kl_term(r_b, tl.log(r_b), lp_b)
                      - _kl_term(q_y, lq_y, lp_y) - _kl_term(q_b, lq_b, lp_b))
            q_change_y = q_y - r_y
            q_change_b = q_b - r_b
            lr_y = tl.log(r_y)
            lr_b = tl.log(r_b)
        kl = tl.where(wrong, kl + kl_fix, kl)
        fix_y = tl.where(wrong, kd_grad * q_change_y, 0.0)
        fix_b = tl.where(wrong, kd_grad * q_change_b, 0.0)
    if correction == CORRECTION_SMOOTH:  # wrong rows' target: (1 - eps) onehot(y) + eps / C
        ec = smooth_eps / C
        top = 1.0 - smooth_eps + ec
        h = tl.where(top > 0, top * tl.log(top), 0.0) + tl.where(
            ec > 0, (C - 1) * ec * tl.log(ec), 0.0)
        lp_y = (s_y - m_s) * inv_t - log_zs
        sum_lp = (s_sum - C * m_s) * inv_t - C * log_zs
        kl = tl.where(wrong, h - (1.0 - smooth_eps) * lp_y - ec * sum_lp, kl)
        q_coef = tl.where(wrong, 0.0, q_coef)
        const_term = tl.where(wrong, -kd_grad * ec, 0.0)
        fix_y = tl.where(wrong, -kd_grad * (1.0 - smooth_eps), 0.0)
        still_wrong = tl.zeros([], dtype=tl.int1)  # the label holds the maximum

    # ---- the other divergences: one more pass over the row, D and sum_j p_j G_j -----
    g_mean = tl.zeros([], dtype=tl.float32)
    smoothed = tl.zeros([], dtype=tl.int1)
    fix_y_on = tl.zeros([], dtype=tl.int1)
    fix_b_on = tl.zeros([], dtype=tl.int1)
    log_ec = tl.zeros([], dtype=tl.float32)
    if divergence != DIVERGENCE_KL:
        param = tl.cast(divergence_param, tl.float32)
        mt_safe = tl.where(has_teacher, m_t, 0.0)
        log_zt_safe = tl.where(has_teacher, log_zt, 0.0)
        log_ec = tl.log(smooth_eps / C)
        if correction == CORRECTION_SMOOTH:  # the base target of a wrong row is uniform
            smoothed = wrong
        # log(q_j / p_j) = d_j - log1p(A), d of loop 1: exact, where the form applies (no
        # difference of two logs of size log C)
        exact = (tl.abs(A) < 0.5) & ((A - A) == 0) & (orphans == 0) & ~smoothed
        L = _log1p(tl.where(exact, A, 0.0))
        d_sum = tl.zeros([], dtype=tl.float32)
        for start in range(0, C, BLOCK):
            idx = start + cols
            mask = idx < C
            s = tl.load(s_row + idx, mask=mask, other=NEG_INF).to(tl.float32)
            t = _teacher_block(t_row, idx, mask, y, log_a, log_rest, VIRTUAL)
            lP = (s - m_s) * inv_t - log_zs
            lR = tl.where(smoothed, log_ec, (t - mt_safe) * inv_t - log_zt_safe)
            delta = tl.where(exact, ((t - s) * inv_t - c0) - L, lR - lP)
            d, G = _div_terms_exact(tl.exp(lP), lP, tl.exp(lR), lR, delta, divergence, param)
            d_sum += tl.sum(tl.where(mask, d, 0.0), 0)
            g_mean += tl.sum(tl.where(mask, tl.exp(lP) * G, 0.0), 0)
        # the corrected target at y (and b): replace the base target's terms there; a swapped
        # value's log ratio is its partner's plus (s_partner - s_j) / T, exact too
        dy_new = tl.zeros([], dtype=tl.float32)
        db_new = tl.zeros([], dtype=tl.float32)
        if correction == CORRECTION_SMOOTH:
            lr_y = tl.log(1.0 - smooth_eps + smooth_eps / C)
            fix_y_on = smoothed
            lq_y = log_ec
        if correction == CORRECTION_SWAP or correction == CORRECTION_RECTIFY:
            fix_y_on = wrong
            fix_b_on = wrong
            dy_old = tl.where(exact, ((t_y - s_y) * inv_t - c0) - L, lq_y - lp_y)
            db_old = tl.where(exact, ((m_t - s_b) * inv_t - c0) - L, lq_b - lp_b)
            if correction == CORRECTION_SWAP:
                dy_new = db_old + (s_b - s_y) * inv_t
                db_new = dy_old + (s_y - s_b) * inv_t
            else:
                dy_new = lr_y - lp_y
                db_new = lr_b - lp_b
            d_old, G_old = _div_terms_exact(tl.exp(lp_b), lp_b, tl.exp(lq_b), lq_b, db_old,
                                            divergence, param)
            d_new, G_new = _div_terms_exact(tl.exp(lp_b), lp_b, tl.exp(lr_b), lr_b, db_new,
                                            divergence, param)
            d_sum += tl.where(fix_b_on, d_new - d_old, 0.0)
            g_mean += tl.where(fix_b_on, tl.exp(lp_b) * (G_new - G_old), 0.0)
        if correction != CORRECTION_NONE:
            lp_y = (s_y - m_s) * inv_t - log_zs
            if correction == CORRECTION_SMOOTH:
                dy_old = lq_y - lp_y
                dy_new = lr_y - lp_y
            d_old, G_old = _div_terms_exact(tl.exp(lp_y), lp_y, tl.exp(lq_y), lq_y, dy_old,
                                            divergence, param)
            d_new, G_new = _div_terms_exact(tl.exp(lp_y), lp_y, tl.exp(lr_y), lr_y, dy_new,
                                            divergence, param)
            d_sum += tl.where(fix_y_on, d_new - d_old, 0.0)
            g_mean += tl.where(fix_y_on, tl.exp(lp_y) * (G_new - G_old), 0.0)
        else:
            lr_y = tl.zeros([], dtype=tl.float32)
        if correction != CORRECTION_SWAP and correction != CORRECTION_RECTIFY:
            lr_b = tl.zeros([], dtype=tl.float32)
        kl = tl.where(has_teacher, d_sum, 0.0)
        g_mean = tl.where(has_teacher, g_mean, 0.0)
        q_coef = tl.zeros([], dtype=tl.float32)
        const_term = tl.zeros([], dtype=tl.float32)
        fix_y = tl.zeros([], dtype=tl.float32)
        fix_b = tl.zeros([], dtype=tl.float32)

    loss = kd_scale * kl
    if HAS_CE:
        loss += ce_weight * (tl.log(z1) + m_s - s_y)
        fix_y -= ce_weight
    bad = _store_row(loss_ptr, temp_out_ptr, flags_ptr, row, loss, T, valid, in_range, wrong,
                     still_wrong, HAS_LABELS)

    # ---- what the gradient kernel needs: O(1) per row --------------------------------
    row_scale = tl.where(valid, 1.0, 0.0)
    row_scale = tl.where(bad, float("nan"), row_scale)
    c = coef_ptr + row * NUM_COEF
    tl.store(c + 0, inv_t)
    tl.store(c + 1, tl.where(m_s == NEG_INF, 0.0, m_s))
    tl.store(c + 2, tl.where(m_t == NEG_INF, 0.0, m_t))
    tl.store(c + 3, kd_grad / zs)
    tl.store(c + 4, q_coef)
    tl.store(c + 5, ce_weight / z1)
    tl.store(c + 6, const_term)
    tl.store(c + 7, fix_y)
    tl.store(c + 8, fix_b)
    tl.store(c + 9, row_scale)
    tl.store(c + 10, c0)
    tl.store(c + 11, A)
    tl.store(c + 12, tl.where(stable & (q_coef != 0), 1.0, 0.0))  # p - q from the stable form
    if divergence != DIVERGENCE_KL:
        tl.store(c + 13, log_zs)
        tl.store(c + 14, tl.where(has_teacher, log_zt, 0.0))
        tl.store(c + 15, g_mean)
        tl.store(c + 16, kd_grad)
        tl.store(c + 17, lr_y)
        tl.store(c + 18, lr_b)
        tl.store(c + 19, tl.where(smoothed, 1.0, 0.0))
        tl.store(c + 20, tl.where(fix_y_on, 1.0, 0.0))
        tl.store(c + 21, tl.where(fix_b_on, 1.0, 0.0))
        tl.store(c + 22, log_ec)
        tl.store(c + 23, tl.where(exact, 1.0, 0.0))
        tl.store(c + 24, L)
        tl.store(c + 25, dy_new)
        tl.store(c + 26, db_new)
    tl.store(index_ptr + 2 * row, y)
    tl.store(index_ptr + 2 * row + 1, b)

@triton.jit
def _distill_grad_kernel(
    s_ptr, s_stride, t_ptr, t_stride, coef_ptr, index_ptr, up_ptr, up_stride, scale_ptr,
    grad_ptr, C, log_a, log_rest, divergence_param,
    BLOCK: tl.constexpr, VIRTUAL: tl.constexpr, HAS_CE: tl.constexpr,
    NUM_COEF: tl.constexpr, DIVERGENCE: tl.constexpr, SCALED: tl.constexpr,
):
    """d loss_i / d s_i times the upstream gradient, from the forward's row coefficients:
    one read of the student and teacher rows, one write of the gradient."""
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_stride
    t_row = t_ptr + row * t_stride
    g_row = grad_ptr + row * C
    cols = tl.arange(0, BLOCK)
    LOG2E: tl.constexpr = 1.4426950408889634
    log_a = tl.cast(log_a, tl.float32)
    log_rest = tl.cast(log_rest, tl.float32)
    c = coef_ptr + row * NUM_COEF
    inv_t = tl.load(c + 0)
    m_s = tl.load(c + 1)
    m_t = tl.load(c + 2)
    p_coef = tl.load(c + 3)
    q_coef = tl.load(c + 4)
    ce_coef = tl.load(c + 5)
    const_term = tl.load(c + 6)
    fix_y = tl.load(c + 7)
    fix_b = tl.load(c + 8)
    row_scale = tl.load(c + 9)
    y = tl.load(index_ptr + 2 * row)
    b = tl.load(index_ptr + 2 * row + 1)
    c_shift = tl.load(c + 10)
    A = tl.load(c + 11)
    stable = tl.load(c + 12) != 0
    live = row_scale != 0
    read_limit = tl.where(live, C, 0)  # ignored rows: write zeros, read nothing
    scale = row_scale * tl.load(up_ptr + row * up_stride).to(tl.float32)
    if SCALED:  # "mean": 1 / the rows that count, from the forward's reduction
        scale *= tl.load(scale_ptr)
    a = inv_t * LOG2E
    if DIVERGENCE != DIVERGENCE_KL:  # kd_grad p_j (G_j - sum_k p_k G_k)
        param = tl.cast(divergence_param, tl.float32)
        log_zs = tl.load(c + 13)
        log_zt = tl.load(c + 14)
        g_mean = tl.load(c + 15)
        kd_grad = tl.load(c + 16)
        lr_y = tl.load(c + 17)
        lr_b = tl.load(c + 18)
        smoothed = tl.load(c + 19).to(tl.int32) != 0
        fix_y_on = tl.load(c + 20).to(tl.int32) != 0
        fix_b_on = tl.load(c + 21).to(tl.int32) != 0
        log_ec = tl.load(c + 22)
        exact = tl.load(c + 23) != 0
        L = tl.load(c + 24)
        dy_new = tl.load(c + 25)
        db_new = tl.load(c + 26)
        for start in range(0, C, BLOCK):
            idx = start + cols
            mask = idx < C
            read = idx < read_limit
            s = tl.load(s_row + idx, mask=read, other=0.0).to(tl.float32)
            t = _teacher_block(t_row, idx, read, y, log_a, log_rest, VIRTUAL)
            lP = (s - m_s) * inv_t - log_zs
            lR = tl.where(smoothed, log_ec, (t - m_t) * inv_t - log_zt)
            lR = tl.where((idx == y) & fix_y_on, lr_y, lR)
            lR = tl.where((idx == b) & fix_b_on, lr_b, lR)
            delta = tl.where(exact, ((t - s) * inv_t - c_shift) - L, lR - lP)
            delta = tl.where((idx == y) & fix_y_on, dy_new, delta)
            delta = tl.where((idx == b) & fix_b_on, db_new, delta)
            P = tl.exp(lP)
            d, G = _div_terms_exact(P, lP, tl.exp(lR), lR, delta, DIVERGENCE, param)
            g = tl.where(kd_grad != 0, kd_grad * P * (G - g_mean), 0.0)
            if HAS_CE:
                g += ce_coef * tl.exp2((s - m_s) * LOG2E)
            g = tl.where(idx == y, g + fix_y, g)
            g = tl.where(live, g * scale, 0.0)
            tl.store(g_row + idx, g.to(grad_ptr.dtype.element_ty), mask=mask)
    elif stable:  # p - q = -p (expm1(d) - A) / (1 + A), d = (t - s) / T - c: no cancellation
        e_coef = -p_coef / (1.0 + A)
        for start in range(0, C, BLOCK):
            idx = start + cols
            mask = idx < C
            read = idx < read_limit
            s = tl.load(s_row + idx, mask=read, other=0.0).to(tl.float32)
            t = _teacher_block(t_row, idx, read, y, log_a, log_rest, VIRTUAL)
            es = tl.exp2((s - m_s) * a)
            d = (t - s) * inv_t - c_shift
            small = tl.abs(d) < 0.5
            dz = tl.where(small, d, 0.0)
            e = tl.where(small, es * (dz + _expm1_excess(dz)),
                         tl.exp2(((t - m_s) * inv_t - c_shift) * LOG2E) - es)  # es expm1(d)
            g = e_coef * (e - A * es)
            if HAS_CE:
                g += ce_coef * tl.exp2((s - m_s) * LOG2E)
            g = tl.where(idx == y, g + fix_y, g)
            g = tl.where(idx == b, g + fix_b, g)
            g = tl.where(live, g * scale, 0.0)
            tl.store(g_row + idx, g.to(grad_ptr.dtype.element_ty), mask=mask)
    else:
        for start in range(0, C, BLOCK):
            idx = start + cols
            mask = idx < C
            read = idx < read_limit
            s = tl.load(s_row + idx, mask=read, other=0.0).to(tl.float32)
            t = _teacher_block(t_row, idx, read, y, log_a, log_rest, VIRTUAL)
            g = p_coef * tl.exp2((s - m_s) * a) - q_coef * tl.exp2((t - m_t) * a) + const_term
            if HAS_CE:
                g += ce_coef * tl.exp2((s - m_s) * LOG2E)
            g = tl.where(idx == y, g + fix_y, g)
            g = tl.where(idx == b, g + fix_b, g)
            g = tl.where(live, g * scale, 0.0)
            tl.store(g_row + idx, g.to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _reduce_kernel(loss_ptr, y_ptr, y_stride, N, ignore_index, out_ptr, scale_ptr,
                   BLOCK: tl.constexpr, HAS_LABELS: tl.constexpr, MEAN: tl.constexpr):
    """One program: the sum of the rows' losses, or their mean over the rows that count (labels
    not ignore_index, at least 1), and the gradient's scale (1 / that count, or 1)."""
    cols = tl.arange(0, BLOCK)
    total = tl.zeros([BLOCK], dtype=tl.float32)
    count = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, N, BLOCK):
        idx = start + cols
        mask = idx < N
        total += tl.load(loss_ptr + idx, mask=mask, other=0.0)
        if MEAN and HAS_LABELS:
            y = tl.load(y_ptr + idx.to(tl.int64) * y_stride, mask=mask, other=ignore_index)
            count += (y != ignore_index).to(tl.int32)
    total_sum = tl.sum(total, 0)
    if MEAN:
        if HAS_LABELS:
            rows = tl.maximum(tl.sum(count, 0), 1).to(tl.float32)
        else:
            rows = tl.maximum(N, 1).to(tl.float32)
        tl.store(out_ptr, total_sum / rows)
        tl.store(scale_ptr, 1.0 / rows)
    else:
        tl.store(out_ptr, total_sum)
        tl.store(scale_ptr, 1.0)


def _reduce(loss, target, o):
    """(loss, gradient scale) as the options' reduction asks: the rows and an unread scale, or
    one value from _reduce_kernel."""
    scale = loss.new_empty(1)
    if o.reduction == _options.REDUCTION_NONE:
        return loss, scale
    out = loss.new_empty(())
    N = loss.shape[0]
    torch.library.wrap_triton(_reduce_kernel)[(1,)](
        loss, target if target is not None else loss,
        target.stride(0) if target is not None else 0, N, o.ignore_index, out, scale,
        BLOCK=1024, HAS_LABELS=target is not None,
        MEAN=o.reduction == _options.REDUCTION_MEAN, num_warps=4)
    return out, scale


@torch.library.triton_op("kdkernels::distill_triton", mutates_args=())
def distill_triton(student: torch.Tensor, teacher: Optional[torch.Tensor],
                   target: Optional[torch.Tensor], temp_rows: Optional[torch.Tensor],
                   options: List[float]
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                              torch.Tensor, torch.Tensor]:
    """Forward: the loss (per row, or reduced as options.reduction asks), per-row temperature
    and flags, the row coefficients (and label / teacher-argmax indices) from which
    distill_triton_grad writes the gradient, and the gradient's scale ("mean": 1 / the rows that
    count). ``options``: FusedOptions.pack()."""
    o = _options.FusedOptions.unpack(options)
    N, C = student.shape
    loss = student.new_empty(N, dtype=torch.float32)
    temps = student.new_empty(N, dtype=torch.float32)
    flags = student.new_empty(N, dtype=torch.int8)
    coef = student.new_empty((N, config.NUM_COEF), dtype=torch.float32)
    index = student.new_empty((N, 2), dtype=torch.int64)
    log_a, log_rest = config.virtual_logits(o.virtual_teacher, C)
    block, warps = config.launch_config(C, "forward")
    dummy = student  # stands in for absent tensors; constexpr flags keep it unread
    torch.library.wrap_triton(_distill_kernel)[(N,)](
        student, student.stride(0),
        teacher if teacher is not None else dummy,
        teacher.stride(0) if teacher is not None else 0,
        target if target is not None else dummy,
        target.stride(0) if target is not None else 0,
        temp_rows if temp_rows is not None else dummy,
        temp_rows.stride(0) if temp_rows is not None else 0,
        loss, temps, flags, coef, index, C, **o.triton_kwargs(),
        log_a=log_a, log_rest=log_rest, BLOCK=block, VIRTUAL=o.virtual_teacher > 0,
        HAS_LABELS=target is not None, HAS_CE=o.ce_weight != 0, NUM_COEF=config.NUM_COEF,
        num_warps=warps)
    loss, scale = _reduce(loss, target, o)
    return loss, temps, flags, coef, index, scale


@torch.library.triton_op("kdkernels::distill_triton_grad", mutates_args=())
def distill_triton_grad(student: torch.Tensor, teacher: Optional[torch.Tensor],
                        coef: torch.Tensor, index: torch.Tensor, upstream: torch.Tensor,
                        scale: torch.Tensor, options: List[float]) -> torch.Tensor:
    """The gradient wrt the student, each row times upstream[row] (upstream has N values,
    or one for every row), and times scale[0] when the loss was reduced."""
    grad = torch.empty_like(student, memory_format=torch.contiguous_format)
    _launch_grad(student, teacher, coef, index, upstream, scale, options, grad)
    return grad


@torch.library.triton_op("kdkernels::distill_triton_grad_", mutates_args=("student",))
def distill_triton_grad_(student: torch.Tensor, teacher: Optional[torch.Tensor],
                         coef: torch.Tensor, index: torch.Tensor, upstream: torch.Tensor,
                         scale: torch.Tensor, options: List[float]) -> None:
    """distill_triton_grad written over `student` (contiguous; each block is read before it
    is written)."""
    _launch_grad(student, teacher, coef, index, upstream, scale, options, student)


def _launch_grad(student, teacher, coef, index, upstream, scale, options, grad):
    o = _options.FusedOptions.unpack(options)
    N, C = student.shape
    log_a, log_rest = config.virtual_logits(o.virtual_teacher, C)
    block, warps = config.launch_config(C, "grad")
    torch.library.wrap_triton(_distill_grad_kernel)[(N,)](
        student, student.stride(0),
        teacher if teacher is not None else student,
        teacher.stride(0) if teacher is not None else 0,
        coef, index, upstream, upstream.stride(0) if upstream.numel() > 1 else 0, scale, grad,
        C, log_a, log_rest, o.divergence_param,
        BLOCK=block, VIRTUAL=o.virtual_teacher > 0, HAS_CE=o.ce_weight != 0,
        NUM_COEF=config.NUM_COEF, DIVERGENCE=o.divergence,
        SCALED=o.reduction != _options.REDUCTION_NONE, num_warps=warps)


@triton.jit
def _distill_rows_kernel(
    s_ptr, s_stride, t_ptr, t_stride, y_ptr, y_stride, temp_ptr, temp_stride,
    loss_ptr, temp_out_ptr, flags_ptr, grad_ptr, N, C,
    # the options, named as in kdkernels/_options.py (FusedOptions.triton_kwargs)
    temp_mode: tl.constexpr, temp_value, tau0, beta, tau_min, kd_weight, wrong_kd_weight,
    ce_weight, correction: tl.constexpr, smooth_eps, virtual_teacher, t2_scale: tl.constexpr,
    ignore_index, divergence: tl.constexpr, divergence_param, teacher_tail: tl.constexpr,
    compute_grad, grad_scale, reduction: tl.constexpr,
    # derived by the launcher
    log_a, log_rest, ROWS: tl.constexpr, BLOCK: tl.constexpr, VIRTUAL: tl.constexpr,
    HAS_LABELS: tl.constexpr, HAS_CE: tl.constexpr,
):
    """Rows that fit one block, ROWS of them per program ([ROWS, BLOCK] tiles): the forward of
    _distill_kernel for a fixed or per-row temperature, no correction and the KL divergence,
    and the gradient of each row's loss (float32, not yet times the upstream gradient) written
    at once, while the rows are in registers. The same cancellation-free KL."""
    NEG_INF: tl.constexpr = float("-inf")
    LOG2E: tl.constexpr = 1.4426950408889634
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < N
    rows = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = row_ok[:, None] & (cols[None, :] < C)
    temp_value, tau0, beta, tau_min, kd_weight, wrong_kd_weight, ce_weight, smooth_eps = _scalars(
        temp_value, tau0, beta, tau_min, kd_weight, wrong_kd_weight, ce_weight, smooth_eps)
    s = tl.load(s_ptr + rows[:, None] * s_stride + cols[None, :], mask=mask,
                other=NEG_INF).to(tl.float32)
    if HAS_LABELS:
        y = tl.load(y_ptr + rows * y_stride, mask=row_ok, other=ignore_index).to(tl.int64)
        valid = y != ignore_index
        in_range = (y >= 0) & (y < C)
        y = tl.where(in_range, y, 0)
    else:
        y = tl.zeros([ROWS], dtype=tl.int64)
        valid = tl.full([ROWS], 1, tl.int1)
        in_range = tl.full([ROWS], 1, tl.int1)
    at_y = cols[None, :] == y[:, None]
    if VIRTUAL:
        t = tl.where(mask, tl.where(at_y, tl.cast(log_a, tl.float32),
                                    tl.cast(log_rest, tl.float32)), NEG_INF)
    else:
        t = tl.load(t_ptr + rows[:, None] * t_stride + cols[None, :], mask=mask,
                    other=NEG_INF).to(tl.float32)
    if temp_mode == TEMP_ROWS:
        T = tl.load(temp_ptr + rows * temp_stride, mask=row_ok, other=1.0).to(tl.float32)
    else:
        T = tl.zeros([ROWS], dtype=tl.float32) + temp_value
    inv_t = 1.0 / T
    a = inv_t * LOG2E

    # centre of the cancellation-free KL: the mean of (t - s) / T over the finite pairs
    finite = mask & ((s - s) == 0) & ((t - t) == 0)
    c0 = (tl.sum(tl.where(finite, t - s, 0.0), 1) * inv_t
          / tl.maximum(tl.sum(finite.to(tl.float32), 1), 1.0))
    m_s = tl.max(s, 1)
    m_t = tl.max(t, 1)
    ms_safe = tl.where(m_s == NEG_INF, 0.0, m_s)
    mt_safe = tl.where(m_t == NEG_INF, 0.0, m_t)
    es = tl.exp2((s - ms_safe[:, None]) * a[:, None])
    et = tl.exp2((t - mt_safe[:, None]) * a[:, None])
    zs = tl.sum(es, 1)
    zt = tl.sum(et, 1)
    d = (t - s) * inv_t[:, None] - c0[:, None]
    small = tl.abs(d) < 0.5
    dz = tl.where(small, d, 0.0)
    F = _expm1_excess(dz)
    et_k = et * tl.exp2(((mt_safe - ms_safe) * inv_t - c0) * LOG2E)[:, None]  # = es e^d
    live = (es > 0) | (et > 0)
    e = tl.where(live, tl.where(small, es * (dz + F), et_k - es), 0.0)  # es expm1(d)
    psi = tl.where(small, es * (dz * dz + (dz - 1.0) * F), es - et_k * (1.0 - d))
    A = tl.sum(e, 1) / zs
    orphans = tl.sum(((es == 0) & (et > 0)).to(tl.int32), 1)
    kl_stable = (tl.sum(tl.where(live, psi, 0.0), 1) / zs - _log1p_excess(A)) / (1.0 + A)
    stable = (tl.abs(A) < 0.5) & ((kl_stable - kl_stable) == 0) & (orphans == 0)
    cross = tl.sum(tl.where(et > 0, et * (t - s), 0.0), 1)
    kl = tl.where(stable, kl_stable,
                  cross * inv_t / zt + (m_s - m_t) * inv_t + tl.log(zs) - tl.log(zt))
    has_teacher = m_t > NEG_INF
    kl = tl.where(has_teacher, kl, 0.0)

    wrong = tl.zeros([ROWS], dtype=tl.int1)
    s_y = tl.zeros([ROWS], dtype=tl.float32)
    if HAS_LABELS:
        s_y = tl.sum(tl.where(at_y, s, 0.0), 1)
        t_y = tl.max(tl.where(at_y, t, NEG_INF), 1)
        wrong = valid & in_range & (t_y < m_t)
    kd_w = tl.where(wrong, wrong_kd_weight, kd_weight)
    kd_w = tl.where(has_teacher, kd_w, 0.0)
    if t2_scale:
        kd_grad = kd_w * T
        loss = kd_w * T * T * kl
    else:
        kd_grad = kd_w * inv_t
        loss = kd_w * kl
    if HAS_CE:
        e1 = tl.exp2((s - ms_safe[:, None]) * LOG2E)
        z1 = tl.sum(e1, 1)
        loss += ce_weight * (tl.log(z1) + m_s - s_y)

    # stores: the rows' loss (0 if ignored, NaN for a bad temperature or label), T and flags
    bad = (T <= 0) | (T != T) | (valid & ~in_range)
    tl.store(loss_ptr + rows, tl.where(bad, float("nan"), tl.where(valid, loss, 0.0)),
             mask=row_ok)
    tl.store(temp_out_ptr + rows, T, mask=row_ok)
    flags = tl.where(wrong, FLAG_STILL_WRONG, 0)  # no correction: a wrong row stays wrong
    if HAS_LABELS:
        flags += tl.where(valid & ~wrong, FLAG_TEACHER_CORRECT, 0)
    tl.store(flags_ptr + rows, flags.to(tl.int8), mask=row_ok)

    # the gradient: kd_grad (p - q) + ce_weight (softmax(s) - onehot(y)), p - q without
    # cancellation where the stable form holds (as _distill_grad_kernel)
    stable_grad = stable & (kd_grad != 0)
    g = tl.where(stable_grad[:, None],
                 (-kd_grad / (zs * (1.0 + A)))[:, None] * (e - A[:, None] * es),
                 (kd_grad / zs)[:, None] * es
                 - tl.where(has_teacher, kd_grad / zt, 0.0)[:, None] * et)
    if HAS_CE:
        g += (ce_weight / z1)[:, None] * e1
        g = tl.where(at_y, g - ce_weight, g)
    g = tl.where(valid[:, None], g, 0.0)
    g = tl.where(bad[:, None], float("nan"), g)
    tl.store(grad_ptr + rows[:, None] * C + cols[None, :], g, mask=mask)


@triton.jit
def _scale_rows_kernel(g_ptr, up_ptr, up_stride, scale_ptr, out_ptr, C,
                       BLOCK: tl.constexpr, SCALED: tl.constexpr):
    """out = g times the upstream gradient of its row (and the reduction's scale)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < C
    u = tl.load(up_ptr + row * up_stride).to(tl.float32)
    if SCALED:
        u *= tl.load(scale_ptr)
    g = tl.load(g_ptr + row * C + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * C + cols, (g * u).to(out_ptr.dtype.element_ty), mask=mask)


@torch.library.triton_op("kdkernels::distill_triton_rows", mutates_args=())
def distill_triton_rows(student: torch.Tensor, teacher: Optional[torch.Tensor],
                        target: Optional[torch.Tensor], temp_rows: Optional[torch.Tensor],
                        options: List[float]
                        ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                   torch.Tensor]:
    """Small rows in one launch: the loss (per row, or reduced), temperatures, flags, the
    gradient of the loss (float32, before the upstream gradient) and its scale ("mean": 1 / the
    rows that count)."""
    o = _options.FusedOptions.unpack(options)
    N, C = student.shape
    loss = student.new_empty(N, dtype=torch.float32)
    temps = student.new_empty(N, dtype=torch.float32)
    flags = student.new_empty(N, dtype=torch.int8)
    grad = student.new_empty((N, C), dtype=torch.float32)
    log_a, log_rest = config.virtual_logits(o.virtual_teacher, C)
    block, rows, warps = config.rows_config(C)
    dummy = student
    torch.library.wrap_triton(_distill_rows_kernel)[(triton.cdiv(N, rows),)](
        student, student.stride(0),
        teacher if teacher is not None else dummy,
        teacher.stride(0) if teacher is not None else 0,
        target if target is not None else dummy,
        target.stride(0) if target is not None else 0,
        temp_rows if temp_rows is not None else dummy,
        temp_rows.stride(0) if temp_rows is not None else 0,
        loss, temps, flags, grad, N, C, **o.triton_kwargs(),
        log_a=log_a, log_rest=log_rest, ROWS=rows, BLOCK=block, VIRTUAL=o.virtual_teacher > 0,
        HAS_LABELS=target is not None, HAS_CE=o.ce_weight != 0, num_warps=warps)
    loss, scale = _reduce(loss, target, o)
    return loss, temps, flags, grad, scale


@torch.library.triton_op("kdkernels::distill_triton_scale_rows", mutates_args=())
def distill_triton_scale_rows(grad: torch.Tensor, upstream: torch.Tensor, scale: torch.Tensor,
                              like: torch.Tensor, options: List[float]) -> torch.Tensor:
    """grad (float32 [N, C]) times upstream[row] (and scale[0] for a reduced loss), in the
    dtype of `like`."""
    out = torch.empty_like(like, memory_format=torch.contiguous_format)
    _launch_scale_rows(grad, upstream, scale, options, out)
    return out


@torch.library.triton_op("kdkernels::distill_triton_scale_rows_", mutates_args=("out",))
def distill_triton_scale_rows_(grad: torch.Tensor, upstream: torch.Tensor, scale: torch.Tensor,
                               out: torch.Tensor, options: List[float]) -> None:
    """distill_triton_scale_rows written into `out` (contiguous: the student's logits)."""
    _launch_scale_rows(grad, upstream, scale, options, out)


def _launch_scale_rows(grad, upstream, scale, options, out):
    o = _options.FusedOptions.unpack(options)
    N, C = grad.shape
    block = 1024
    torch.library.wrap_triton(_scale_rows_kernel)[(N, triton.cdiv(C, block))](
        grad, upstream, upstream.stride(0) if upstream.numel() > 1 else 0, scale, out, C,
        BLOCK=block, SCALED=o.reduction != _options.REDUCTION_NONE, num_warps=4)


@triton.jit
def _members_in_block(k_idx, start, BLOCK: tl.constexpr):
    """[lo, hi): the slots of the sorted class ids k_idx that fall in [start, start + BLOCK)
    (unused slots, negative, sort first)."""
    lo = tl.sum((k_idx < start).to(tl.int32), 0)
    hi = tl.sum((k_idx < start + BLOCK).to(tl.int32), 0)
    return lo, hi


@triton.jit
def _distill_sparse_kernel(
    s_ptr, s_stride, v_ptr, v_stride, i_ptr, i_stride, y_ptr, y_stride, temp_ptr, temp_stride,
    loss_ptr, temp_out_ptr, flags_ptr, coef_ptr, index_ptr, member_ptr, C, K,
    # the options, named as in kdkernels/_options.py (FusedOptions.triton_kwargs)
    temp_mode: tl.constexpr, temp_value, tau0, beta, tau_min, kd_weight, wrong_kd_weight,
    ce_weight, correction: tl.constexpr, smooth_eps, virtual_teacher, t2_scale: tl.constexpr,
    ignore_index, divergence: tl.constexpr, divergence_param, teacher_tail: tl.constexpr,
    compute_grad, grad_scale, reduction: tl.constexpr,
    # derived by the launcher
    BLOCK: tl.constexpr, KBLOCK: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_CE: tl.constexpr,
    NUM_COEF: tl.constexpr,
):
    """A sparse (top-k) teacher (docs/METHODS.md, "Sparse (top-k) teachers"): its k class ids,
    sorted, and values per row; the student row is read once (online softmax, the rest's mass
    summed directly: each block leaves out its explicit classes). The divergence runs over the
    outcomes: the k classes, the label's slot (a swap or rectify of a label outside them), the
    rest (the tail's mass, or none). Leaves per row the coefficients of the rest's classes and
    the gradient values of the explicit ones (member_ptr, K + 1 per row)."""
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_stride
    v_row = v_ptr + row * v_stride
    i_row = i_ptr + row * i_stride
    cols = tl.arange(0, BLOCK)
    kcols = tl.arange(0, KBLOCK)
    NEG_INF: tl.constexpr = float("-inf")
    temp_value, tau0, beta, tau_min, kd_weight, wrong_kd_weight, ce_weight, smooth_eps = _scalars(
        temp_value, tau0, beta, tau_min, kd_weight, wrong_kd_weight, ce_weight, smooth_eps)
    param = tl.cast(divergence_param, tl.float32)

    y, valid, in_range = _label(y_ptr, y_stride, row, ignore_index, C, HAS_LABELS)

    # ---- the teacher's k classes ------------------------------------------------------
    k_idx = tl.load(i_row + kcols, mask=kcols < K, other=PAST_ANY_CLASS)  # padding sorts last
    used = (kcols < K) & (k_idx >= 0) & (k_idx < C)
    v = tl.where(used, tl.load(v_row + kcols, mask=used, other=0.0).to(tl.float32), NEG_INF)
    s_k = tl.load(s_row + k_idx, mask=used, other=NEG_INF).to(tl.float32)
    best = tl.max(v, 0)
    pos_b = tl.argmax(v, 0)  # the first maximum: the smallest class id (ids are sorted)
    is_y = used & (k_idx == y)
    in_k = tl.sum(is_y.to(tl.int32), 0) > 0
    pos_y = tl.where(in_k, tl.argmax(is_y.to(tl.int32), 0), K)
    v_y = tl.sum(tl.where(is_y, v, 0.0), 0)
    wrong = tl.zeros([], dtype=tl.int1)
    if HAS_LABELS:
        wrong = valid & in_range & (best > NEG_INF) & (~in_k | (v_y < best))
    extra = tl.zeros([], dtype=tl.int1)
    if correction == CORRECTION_SWAP or correction == CORRECTION_RECTIFY:
        extra = wrong & ~in_k  # the label becomes an outcome of its own
    n_explicit = tl.sum(used.to(tl.int32), 0) + extra.to(tl.int32)
    rest_empty = n_explicit >= C

    # ---- the row's temperature ------------------------------------------------------
    if temp_mode == TEMP_SCALAR:
        T = tl.zeros([], dtype=tl.float32) + temp_value
    elif temp_mode == TEMP_ROWS:
        T = tl.load(temp_ptr + row * temp_stride).to(tl.float32)
    elif temp_mode == TEMP_COSINE:  # over the teacher's classes: the finite pairs
        finite = used & ((s_k - s_k) == 0) & ((v - v) == 0)
        fs = tl.where(finite, s_k, 0.0)
        fv = tl.where(finite, v, 0.0)
        cos = tl.sum(fs * fv, 0) / (tl.maximum(tl.sqrt(tl.sum(fs * fs, 0)), 1e-12)
                                    * tl.maximum(tl.sqrt(tl.sum(fv * fv, 0)), 1e-12))
        T = tl.maximum(tau0 - beta * (1.0 - cos) * (1.0 - cos), tau_min)
    else:  # max_prob: sum_j exp(s_j - max s), a pre-pass
        m1 = tl.full([], NEG_INF, tl.float32)
        z1p = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, C, BLOCK):
            idx = start + cols
            s = tl.load(s_row + idx, mask=idx < C, other=NEG_INF).to(tl.float32)
            m_new = tl.maximum(m1, tl.max(s, 0))
            m_safe = tl.where(m_new == NEG_INF, 0.0, m_new)
            z1p = z1p * tl.exp(m1 - m_safe) + tl.exp(s - m_safe)
            m1 = m_new
        T = tl.maximum(tau0 - beta * tl.sum(z1p, 0), tau_min)
    inv_t = 1.0 / T

    # ---- the student row: online softmax; the rest's mass without the explicit classes
    m_s = tl.full([], NEG_INF, tl.float32)
    zs = tl.zeros([], dtype=tl.float32)
    rest = tl.zeros([], dtype=tl.float32)
    z1 = tl.zeros([], dtype=tl.float32)
    s_sum = tl.zeros([], dtype=tl.float32)
    for start in range(0, C, BLOCK):
        idx = start + cols
        mask = idx < C
        s = tl.load(s_row + idx, mask=mask, other=NEG_INF).to(tl.float32)
        ms_new = tl.maximum(m_s, tl.max(s, 0))
        ms_safe = tl.where(ms_new == NEG_INF, 0.0, ms_new)
        es = tl.exp((s - ms_safe) * inv_t)
        alpha = tl.exp((m_s - ms_safe) * inv_t)
        zs = zs * alpha + tl.sum(es, 0)
        lo, hi = _members_in_block(k_idx, start, BLOCK)
        for m in range(lo, hi):
            es = tl.where(idx == tl.load(i_row + m), 0.0, es)
        es = tl.where(extra & (idx == y), 0.0, es)
        rest = rest * alpha + tl.sum(es, 0)
        if HAS_CE:
            z1 = z1 * tl.exp(m_s - ms_safe) + tl.sum(tl.exp(s - ms_safe), 0)
        if correction == CORRECTION_SMOOTH:
            s_sum += tl.sum(tl.where(mask, s, 0.0), 0)
        m_s = ms_new
    log_zs = tl.log(zs)
    s_y = tl.zeros([], dtype=tl.float32)
    if HAS_LABELS:
        s_y = tl.load(s_row + y).to(tl.float32)

    # ---- the outcomes: classes (vectors), the label's slot and the rest (scalars) ------
    lP_k = tl.where(used, (s_k - m_s) * inv_t - log_zs, NEG_INF)
    P_k = tl.exp(lP_k)
    lP_e = tl.where(extra, (s_y - m_s) * inv_t - log_zs, NEG_INF)
    P_e = tl.exp(lP_e)
    P_r = tl.where(rest_empty, 0.0, rest / zs)
    lP_r = tl.log(P_r)
    u_r = tl.full([], NEG_INF, tl.float32)
    if teacher_tail:  # values are log-probabilities: 1 - sum exp(v) is every other class's
        # in float64: the tail is often a small difference of masses near 1
        mass = tl.sum(tl.where(used, tl.exp(v.to(tl.float64)), 0.0), 0)
        tail = tl.maximum(1.0 - mass, 0.0).to(tl.float32)
        u_r = tl.where(rest_empty | (tail <= 0), NEG_INF, tl.log(tail))
    m_q = tl.maximum(best, u_r)
    has_teacher = tl.max((v != NEG_INF).to(tl.int32), 0) > 0  # a tail alone is no teacher
    m_q = tl.where(has_teacher, m_q, 0.0)
    lQ_k = (v - m_q) * inv_t
    lQ_r = (u_r - m_q) * inv_t
    log_zq = tl.log(tl.sum(tl.exp(lQ_k), 0) + tl.exp(lQ_r))
    lR_k = lQ_k - log_zq
    lR_r = lQ_r - log_zq
    lR_e = tl.full([], NEG_INF, tl.float32)

    # ---- the correction at the label's and the argmax's outcomes ------------------------
    still_wrong = wrong
    if correction == CORRECTION_SWAP or correction == CORRECTION_RECTIFY:
        lq_y = tl.where(in_k, tl.sum(tl.where(kcols == pos_y, lR_k, 0.0), 0), NEG_INF)
        lq_b = tl.sum(tl.where(kcols == pos_b, lR_k, 0.0), 0)
        if correction == CORRECTION_SWAP:
            lnew_y = lq_b
            lnew_b = lq_y
            still_wrong = tl.zeros([], dtype=tl.int1)
        else:
            q_y = tl.exp(lq_y)
            q_b = tl.exp(lq_b)
            new_y = (q_y + 1) * 0.5
            new_b = q_b * 0.5
            scale = (q_y + q_b) / (new_y + new_b)
            lnew_y = tl.log(new_y * scale)
            lnew_b = tl.log(new_b * scale)
            others = tl.max(tl.where(used & (kcols != pos_y) & (kcols != pos_b), lR_k, NEG_INF), 0)
            still_wrong = wrong & (tl.maximum(lnew_b, others) > lnew_y)
        lR_k = tl.where(wrong & (kcols == pos_b), lnew_b, lR_k)
        lR_k = tl.where(wrong & in_k & (kcols == pos_y), lnew_y, lR_k)
        lR_e = tl.where(extra, lnew_y, lR_e)

    # ---- D and sum_j p_j G_j over the outcomes ------------------------------------------
    d_k, G_k = _div_terms(P_k, lP_k, tl.exp(lR_k), lR_k, divergence, param)
    d_k = tl.where(used, d_k, 0.0)
    G_k = tl.where(used, G_k, 0.0)
    d_e, G_e = _div_terms(P_e, lP_e, tl.exp(lR_e), lR_e, divergence, param)
    d_r, G_r = _div_terms(P_r, lP_r, tl.exp(lR_r), lR_r, divergence, param)
    D = tl.sum(d_k, 0) + d_e + d_r
    g_mean = tl.sum(P_k * G_k, 0) + P_e * G_e + P_r * G_r
    smoothed = tl.zeros([], dtype=tl.int1)
    ec = smooth_eps / C
    if correction == CORRECTION_SMOOTH:  # the target of a wrong row is dense: (1-eps) y + eps/C
        smoothed = wrong
        top = 1.0 - smooth_eps + ec
        h = tl.where(top > 0, top * tl.log(top), 0.0) + tl.where(
            ec > 0, (C - 1) * ec * tl.log(ec), 0.0)
        sum_lp = (s_sum - C * m_s) * inv_t - C * log_zs
        D = tl.where(smoothed, h - (1.0 - smooth_eps) * ((s_y - m_s) * inv_t - log_zs)
                     - ec * sum_lp, D)
        still_wrong = tl.zeros([], dtype=tl.int1)
    D = tl.where(has_teacher, D, 0.0)

    kd_w = tl.where(wrong, wrong_kd_weight, kd_weight)
    kd_w = tl.where(has_teacher, kd_w, 0.0)
    if t2_scale:
        kd_grad = kd_w * T
        loss = kd_w * T * T * D
    else:
        kd_grad = kd_w * inv_t
        loss = kd_w * D
    ce_coef = tl.zeros([], dtype=tl.float32)
    if HAS_CE:
        loss += ce_weight * (tl.log(z1) + m_s - s_y)
        ce_coef = ce_weight / z1
    bad = _store_row(loss_ptr, temp_out_ptr, flags_ptr, row, loss, T, valid, in_range, wrong,
                     still_wrong, HAS_LABELS)

    # ---- for the gradient kernel: the rest's classes' coefficients, the explicit values
    kd_on = kd_grad != 0
    rest_coef = tl.where(smoothed, kd_grad / zs,
                         tl.where(kd_on, kd_grad / zs * (G_r - g_mean), 0.0))
    g_k = (tl.where(kd_on, kd_grad * P_k * (G_k - g_mean), 0.0)
           - tl.where(k_idx == y, ce_weight, 0.0))
    g_e = tl.where(kd_on, kd_grad * P_e * (G_e - g_mean), 0.0) - ce_weight
    if HAS_CE:
        g_k += ce_coef * tl.exp(s_k - m_s)
        g_e += ce_coef * tl.exp(s_y - m_s)
    fix_y = -ce_weight
    if correction == CORRECTION_SMOOTH:
        fix_y = tl.where(smoothed, fix_y - kd_grad * (1.0 - smooth_eps), fix_y)
    row_scale = tl.where(valid, 1.0, 0.0)
    row_scale = tl.where(bad, float("nan"), row_scale)
    members = member_ptr + row * (K + 1)
    tl.store(members + kcols, g_k, mask=kcols < K)
    tl.store(members + K, g_e)
    c = coef_ptr + row * NUM_COEF
    tl.store(c + 0, inv_t)
    tl.store(c + 1, tl.where(m_s == NEG_INF, 0.0, m_s))
    tl.store(c + 2, rest_coef)
    tl.store(c + 3, tl.where(smoothed, -kd_grad * ec, 0.0))
    tl.store(c + 4, ce_coef)
    tl.store(c + 5, fix_y)
    tl.store(c + 6, row_scale)
    tl.store(c + 7, tl.where(extra, 1.0, 0.0))
    tl.store(c + 8, tl.where(smoothed, 1.0, 0.0))
    tl.store(index_ptr + 2 * row, y)
    tl.store(index_ptr + 2 * row + 1, pos_b)


@triton.jit
def _distill_sparse_grad_kernel(
    s_ptr, s_stride, i_ptr, i_stride, coef_ptr, index_ptr, member_ptr, up_ptr, up_stride,
    scale_ptr, grad_ptr, C, K,
    BLOCK: tl.constexpr, KBLOCK: tl.constexpr, HAS_CE: tl.constexpr, NUM_COEF: tl.constexpr,
    SCALED: tl.constexpr,
):
    """The gradient against a sparse teacher, times the upstream gradient: the rest's
    coefficient on every class, the forward's values on the explicit ones."""
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_stride
    i_row = i_ptr + row * i_stride
    g_row = grad_ptr + row * C
    members = member_ptr + row * (K + 1)
    cols = tl.arange(0, BLOCK)
    kcols = tl.arange(0, KBLOCK)
    LOG2E: tl.constexpr = 1.4426950408889634
    c = coef_ptr + row * NUM_COEF
    inv_t = tl.load(c + 0)
    m_s = tl.load(c + 1)
    rest_coef = tl.load(c + 2)
    shift = tl.load(c + 3)
    ce_coef = tl.load(c + 4)
    fix_y = tl.load(c + 5)
    row_scale = tl.load(c + 6)
    extra = tl.load(c + 7).to(tl.int32) != 0
    smoothed = tl.load(c + 8).to(tl.int32) != 0
    y = tl.load(index_ptr + 2 * row)
    k_idx = tl.load(i_row + kcols, mask=kcols < K, other=PAST_ANY_CLASS)  # padding sorts last
    g_e = tl.load(members + K)
    live = row_scale != 0
    read_limit = tl.where(live, C, 0)
    scale = row_scale * tl.load(up_ptr + row * up_stride).to(tl.float32)
    if SCALED:
        scale *= tl.load(scale_ptr)
    a = inv_t * LOG2E
    for start in range(0, C, BLOCK):  # (0/1 flags via int32: the interpreter's float compare)
        idx = start + cols
        mask = idx < C
        s = tl.load(s_row + idx, mask=idx < read_limit, other=0.0).to(tl.float32)
        g = rest_coef * tl.exp2((s - m_s) * a) + shift
        if HAS_CE:
            g += ce_coef * tl.exp2((s - m_s) * LOG2E)
        g = tl.where(idx == y, g + fix_y, g)
        lo, hi = _members_in_block(k_idx, start, BLOCK)
        hi = tl.where(smoothed, lo, hi)  # a smoothed row's target is dense: no explicit classes
        for m in range(lo, hi):
            g = tl.where(idx == tl.load(i_row + m), tl.load(members + m), g)
        g = tl.where(extra & (idx == y), g_e, g)
        g = tl.where(live, g * scale, 0.0)
        tl.store(g_row + idx, g.to(grad_ptr.dtype.element_ty), mask=mask)


@torch.library.triton_op("kdkernels::distill_triton_sparse", mutates_args=())
def distill_triton_sparse(student: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                          target: Optional[torch.Tensor], temp_rows: Optional[torch.Tensor],
                          options: List[float]
                          ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                     torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward against a sparse teacher whose class ids are sorted within each row:
    per-row loss, temperature, flags, the coefficients, label / argmax indices and the
    explicit classes' gradient values from which distill_triton_sparse_grad writes the
    gradient."""
    o = _options.FusedOptions.unpack(options)
    N, C = student.shape
    K = indices.shape[1]
    loss = student.new_empty(N, dtype=torch.float32)
    temps = student.new_empty(N, dtype=torch.float32)
    flags = student.new_empty(N, dtype=torch.int8)
    coef = student.new_empty((N, config.NUM_COEF), dtype=torch.float32)
    index = student.new_empty((N, 2), dtype=torch.int64)
    member = student.new_empty((N, K + 1), dtype=torch.float32)
    block, warps = config.launch_config(C, "forward")
    dummy = student
    torch.library.wrap_triton(_distill_sparse_kernel)[(N,)](
        student, student.stride(0), values, values.stride(0), indices, indices.stride(0),
        target if target is not None else dummy,
        target.stride(0) if target is not None else 0,
        temp_rows if temp_rows is not None else dummy,
        temp_rows.stride(0) if temp_rows is not None else 0,
        loss, temps, flags, coef, index, member, C, K, **o.triton_kwargs(),
        BLOCK=block, KBLOCK=config.k_block(K), HAS_LABELS=target is not None,
        HAS_CE=o.ce_weight != 0, NUM_COEF=config.NUM_COEF, num_warps=warps)
    loss, scale = _reduce(loss, target, o)
    return loss, temps, flags, coef, index, member, scale


@torch.library.triton_op("kdkernels::distill_triton_sparse_grad", mutates_args=())
def distill_triton_sparse_grad(student: torch.Tensor, indices: torch.Tensor, coef: torch.Tensor,
                               index: torch.Tensor, member: torch.Tensor,
                               upstream: torch.Tensor, scale: torch.Tensor,
                               options: List[float]) -> torch.Tensor:
    grad = torch.empty_like(student, memory_format=torch.contiguous_format)
    _launch_sparse_grad(student, indices, coef, index, member, upstream, scale, options, grad)
    return grad


@torch.library.triton_op("kdkernels::distill_triton_sparse_grad_", mutates_args=("student",))
def distill_triton_sparse_grad_(student: torch.Tensor, indices: torch.Tensor,
                                coef: torch.Tensor, index: torch.Tensor, member: torch.Tensor,
                                upstream: torch.Tensor, scale: torch.Tensor,
                                options: List[float]) -> None:
    """distill_triton_sparse_grad written over `student` (contiguous)."""
    _launch_sparse_grad(student, indices, coef, index, member, upstream, scale, options,
                        student)


def _launch_sparse_grad(student, indices, coef, index, member, upstream, scale, options, grad):
    o = _options.FusedOptions.unpack(options)
    N, C = student.shape
    K = indices.shape[1]
    block, warps = config.launch_config(C, "grad")
    torch.library.wrap_triton(_distill_sparse_grad_kernel)[(N,)](
        student, student.stride(0), indices, indices.stride(0), coef, index, member,
        upstream, upstream.stride(0) if upstream.numel() > 1 else 0, scale, grad, C, K,
        BLOCK=block, KBLOCK=config.k_block(K), HAS_CE=o.ce_weight != 0,
        NUM_COEF=config.NUM_COEF, SCALED=o.reduction != _options.REDUCTION_NONE,
        num_warps=warps)
