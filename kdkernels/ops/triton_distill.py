"""The Triton backend: one program per row reads the student and teacher logits and writes the
row's loss terms and the gradient wrt the student (METHODS.md, "What every fused path computes").

Loop 1 is an online softmax over blocks of the row (maxima, first argmax of the teacher, the
tempered sums, the KL cross term, CE's sum at T=1); loop 2 writes the gradient. A dynamic (DTD)
temperature adds a pre-pass over the row. Options that change the code path are constexpr, so
plain KD pays nothing for the corrections. Registered with ``torch.library.triton_op``.

Accumulation is float32 (float64 inputs too: Triton passes scalars as float32).
"""
import math
import os
from typing import Optional, Tuple

import torch

NAME = "triton"

try:
    import triton
    import triton.language as tl
    _IMPORT_ERROR = None
except ImportError as error:  # triton is optional
    triton, tl, _IMPORT_ERROR = None, None, error

# Largest block of classes one program holds; rows longer than this loop. Tests lower it to reach
# the multi-block path at small C.
MAX_BLOCK = 8192


def _interpreting():
    return os.environ.get("TRITON_INTERPRET") == "1"


def availability(device=None):
    if triton is None:
        return False, f"triton is not installed ({_IMPORT_ERROR})"
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
    return True, f"Triton {triton.__version__} on {torch.cuda.get_device_name()}"


if triton is not None:
    @triton.jit
    def _teacher_block(t_row, idx, mask, y, log_a, log_rest, VIRTUAL: tl.constexpr):
        if VIRTUAL:  # Tf-KD reg: the teacher's logits are log(pd), built from the label
            t = tl.where(idx == y, log_a, log_rest)
            t = tl.where(mask, t, float("-inf"))
        else:
            t = tl.load(t_row + idx, mask=mask, other=float("-inf")).to(tl.float32)
        return t

    @triton.jit
    def _kl_term(x, log_x, log_p):  # x (log x - log p) with 0 log 0 = 0
        return tl.where(x > 0, x * (log_x - log_p), 0.0)

    @triton.jit
    def _distill_kernel(
        s_ptr, s_stride, t_ptr, t_stride, y_ptr, temp_ptr,
        loss_ptr, grad_ptr, temp_out_ptr, flags_ptr,
        C, temp_value, tau0, beta, tau_min, kd_weight, wrong_kd_weight, ce_weight, smooth_eps,
        log_a, log_rest, ignore_index, grad_scale,
        BLOCK: tl.constexpr, TEMP_MODE: tl.constexpr, CORRECTION: tl.constexpr,
        VIRTUAL: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_CE: tl.constexpr,
        T2_SCALE: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        s_row = s_ptr + row * s_stride
        t_row = t_ptr + row * t_stride
        g_row = grad_ptr + row * C
        cols = tl.arange(0, BLOCK)
        NEG_INF: tl.constexpr = float("-inf")

        if HAS_LABELS:
            y = tl.load(y_ptr + row).to(tl.int64)
            valid = y != ignore_index
            in_range = (y >= 0) & (y < C)
            y = tl.where(in_range, y, 0)  # a safe address; bad labels poison the row below
        else:
            y = tl.zeros([], dtype=tl.int64)
            valid = tl.full([], 1, tl.int1)
            in_range = tl.full([], 1, tl.int1)

        # ---- the row's temperature ------------------------------------------------------
        if TEMP_MODE == 0:
            T = tl.zeros([], dtype=tl.float32) + temp_value
        elif TEMP_MODE == 1:
            T = tl.load(temp_ptr + row).to(tl.float32)
        else:  # DTD: a pre-pass over the row at T = 1
            m1 = tl.full([], NEG_INF, tl.float32)
            z1p = tl.zeros([], dtype=tl.float32)
            ss = tl.zeros([], dtype=tl.float32)
            tt = tl.zeros([], dtype=tl.float32)
            st = tl.zeros([], dtype=tl.float32)
            for start in range(0, C, BLOCK):
                idx = start + cols
                mask = idx < C
                s = tl.load(s_row + idx, mask=mask, other=NEG_INF).to(tl.float32)
                if TEMP_MODE == 2:  # cosine over the classes where both logits are finite
                    t = _teacher_block(t_row, idx, mask, y, log_a, log_rest, VIRTUAL)
                    finite = mask & ((s - s) == 0) & ((t - t) == 0)
                    fs = tl.where(finite, s, 0.0)
                    ft = tl.where(finite, t, 0.0)
                    ss += tl.sum(fs * fs, 0)
                    tt += tl.sum(ft * ft, 0)
                    st += tl.sum(fs * ft, 0)
                else:  # max_prob: sum_j exp(s_j - max s), online
                    m_new = tl.maximum(m1, tl.max(s, 0))
                    m_safe = tl.where(m_new == NEG_INF, 0.0, m_new)
                    z1p = z1p * tl.exp(m1 - m_safe) + tl.sum(tl.exp(s - m_safe), 0)
                    m1 = m_new
            if TEMP_MODE == 2:
                norms = tl.maximum(tl.sqrt(ss), 1e-12) * tl.maximum(tl.sqrt(tt), 1e-12)
                w = (1.0 - st / norms) * (1.0 - st / norms)
            else:
                w = z1p
            raw = tau0 - beta * w
            T = tl.where(raw < tau_min, tau_min, raw)
        inv_t = 1.0 / T

        # ---- loop 1: online softmax statistics -----------------------------------------
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
            es = tl.exp((s - ms_safe) * inv_t)
            et = tl.exp((t - mt_safe) * inv_t)
            zs = zs * tl.exp((m_s - ms_safe) * inv_t) + tl.sum(es, 0)
            alpha_t = tl.exp((m_t - mt_safe) * inv_t)
            zt = zt * alpha_t + tl.sum(et, 0)
            cross = cross * alpha_t + tl.sum(tl.where(et > 0, et * (t - s), 0.0), 0)
            if HAS_CE:
                z1 = z1 * tl.exp(m_s - ms_safe) + tl.sum(tl.exp(s - ms_safe), 0)
            if CORRECTION == 2:
                s_sum += tl.sum(tl.where(mask, s, 0.0), 0)
            if CORRECTION == 3:
                tx = tl.where(idx == y, NEG_INF, t)
                bx1 = tl.max(tx, 0)
                bx2 = tl.max(tl.where(idx == tl.argmax(tx, 0) + start, NEG_INF, tx), 0)
                top2 = tl.maximum(tl.maximum(top2, bx2), tl.minimum(top1, bx1))
                top1 = tl.maximum(top1, bx1)
            m_s = ms_new
            m_t = mt_new

        log_zs = tl.log(zs)
        log_zt = tl.log(zt)
        kl = cross * inv_t / zt + (m_s - m_t) * inv_t + log_zs - log_zt

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
        kd_w = tl.where(wrong, wrong_kd_weight, kd_weight)
        if T2_SCALE:
            kd_grad = kd_w * T
            kd_scale = kd_w * T * T
        else:
            kd_grad = kd_w * inv_t
            kd_scale = kd_w
        q_coef = kd_grad / zt
        const_term = tl.zeros([], dtype=tl.float32)
        if CORRECTION == 1 or CORRECTION == 3:  # swap, rectify: new values at y and b
            s_b = tl.load(s_row + b).to(tl.float32)
            lp_y = (s_y - m_s) * inv_t - log_zs
            lp_b = (s_b - m_s) * inv_t - log_zs
            lq_y = (t_y - m_t) * inv_t - log_zt
            lq_b = -log_zt  # t_b is the maximum
            q_y = tl.exp(lq_y)
            q_b = tl.exp(lq_b)
            if CORRECTION == 1:
                r_y = q_b
                r_b = q_y
                lr_y = lq_b
                lr_b = lq_y
                still_wrong = tl.zeros([], dtype=tl.int1)  # the label now holds the maximum
            else:
                new_y = (q_y + 1) * 0.5
                new_b = q_b * 0.5
                k = (q_y + q_b) / (new_y + new_b)
                r_y = new_y * k
                r_b = new_b * k
                lr_y = tl.log(r_y)
                lr_b = tl.log(r_b)
                q_other = tl.where(top2 == NEG_INF, 0.0, tl.exp((top2 - m_t) * inv_t) / zt)
                still_wrong = wrong & (tl.maximum(r_b, q_other) > r_y)
            kl_fix = (_kl_term(r_y, lr_y, lp_y) + _kl_term(r_b, lr_b, lp_b)
                      - _kl_term(q_y, lq_y, lp_y) - _kl_term(q_b, lq_b, lp_b))
            kl = tl.where(wrong, kl + kl_fix, kl)
            fix_y = tl.where(wrong, kd_grad * (q_y - r_y), 0.0)
            fix_b = tl.where(wrong, kd_grad * (q_b - r_b), 0.0)
        if CORRECTION == 2:  # smooth: target (1 - eps) onehot(y) + eps / C on wrong rows
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

        loss = kd_scale * kl
        if HAS_CE:
            loss += ce_weight * (tl.log(z1) + m_s - s_y)
        bad = (T <= 0) | (T != T) | (valid & ~in_range)
        loss = tl.where(valid, loss, 0.0)
        loss = tl.where(bad, float("nan"), loss)
        tl.store(loss_ptr + row, loss)
        tl.store(temp_out_ptr + row, T)
        flags = tl.where(still_wrong, 2, 0)
        if HAS_LABELS:
            flags += tl.where(valid & ~wrong, 1, 0)
        tl.store(flags_ptr + row, flags.to(tl.int8))

        # ---- loop 2: the gradient --------------------------------------------------------
        if COMPUTE_GRAD:
            ms_safe = tl.where(m_s == NEG_INF, 0.0, m_s)
            mt_safe = tl.where(m_t == NEG_INF, 0.0, m_t)
            p_coef = kd_grad / zs
            ce_coef = ce_weight / z1
            for start in range(0, C, BLOCK):
                idx = start + cols
                mask = idx < C
                s = tl.load(s_row + idx, mask=mask, other=NEG_INF).to(tl.float32)
                t = _teacher_block(t_row, idx, mask, y, log_a, log_rest, VIRTUAL)
                p = tl.exp((s - ms_safe) * inv_t)
                g = p_coef * p - q_coef * tl.exp((t - mt_safe) * inv_t) + const_term
                if HAS_CE:
                    g += ce_coef * tl.exp(s - ms_safe)
                    g = tl.where(idx == y, g - ce_weight, g)
                g = tl.where(idx == y, g + fix_y, g)
                g = tl.where(idx == b, g + fix_b, g)
                g = tl.where(valid, g * grad_scale, 0.0)
                g = tl.where(bad, float("nan"), g)
                tl.store(g_row + idx, g.to(grad_ptr.dtype.element_ty), mask=mask)

    def _launch_config(C):
        block = min(triton.next_power_of_2(max(C, 1)), MAX_BLOCK)
        warps = 4 if block <= 1024 else 8 if block <= 4096 else 16
        return block, warps

    @torch.library.triton_op("kdkernels::distill_triton", mutates_args=())
    def distill_triton(student: torch.Tensor, teacher: Optional[torch.Tensor],
                       target: Optional[torch.Tensor], temperature: Optional[torch.Tensor],
                       temp_value: float, temp_mode: int, tau0: float, beta: float,
                       tau_min: float, kd_weight: float, wrong_kd_weight: float,
                       ce_weight: float, correction: int, smooth_eps: float,
                       virtual_teacher: float, t2_scale: bool, ignore_index: int,
                       compute_grad: bool, grad_scale: float
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        N, C = student.shape
        loss = student.new_empty(N, dtype=torch.float32)
        grad = (torch.empty_like(student, memory_format=torch.contiguous_format) if compute_grad
                else student.new_empty(0))
        temps = student.new_empty(N, dtype=torch.float32)
        flags = student.new_empty(N, dtype=torch.int8)
        virtual = virtual_teacher > 0
        log_a = math.log(virtual_teacher) if virtual else 0.0
        log_rest = (math.log((1 - virtual_teacher) / max(C - 1, 1)) if virtual and virtual_teacher < 1
                    else -math.inf if virtual else 0.0)
        block, warps = _launch_config(C)
        dummy = student  # stands in for absent tensors; constexpr flags keep it unread
        torch.library.wrap_triton(_distill_kernel)[(N,)](
            student, student.stride(0),
            teacher if teacher is not None else dummy,
            teacher.stride(0) if teacher is not None else 0,
            target if target is not None else dummy,
            temperature if temperature is not None else dummy,
            loss, grad, temps, flags,
            C, temp_value, tau0, beta, tau_min, kd_weight, wrong_kd_weight, ce_weight, smooth_eps,
            log_a, log_rest, ignore_index, grad_scale,
            BLOCK=block, TEMP_MODE=temp_mode, CORRECTION=correction, VIRTUAL=virtual,
            HAS_LABELS=target is not None, HAS_CE=ce_weight != 0, T2_SCALE=t2_scale,
            COMPUTE_GRAD=compute_grad, num_warps=warps)
        return loss, grad, temps, flags


def forward(student, teacher, target, temp_rows, o):
    loss, grad, temps, flags = torch.ops.kdkernels.distill_triton(
        student, teacher, target, temp_rows, o.temperature, o.temp_mode, o.tau0, o.beta,
        o.tau_min, o.kd_weight, o.wrong_kd_weight, o.ce_weight, o.correction, o.smooth_eps,
        o.virtual_teacher, o.t2_scale, o.ignore_index, o.compute_grad, o.grad_scale)
    if student.dtype == torch.float64:  # the contract: losses in the accumulation dtype
        loss, temps = loss.double(), temps.double()
    return loss, grad, temps, flags
