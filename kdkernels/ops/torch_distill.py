"""The pure-torch backend: the fused primitive's math on whole tensors, with the gradient written
in closed form (as the kernels do) rather than by autograd. Correct on any device; not fast."""
import math

import torch

from .._dtd import dtd_weights, temperature_from_weights
from .._options import (
    CORRECTION_RECTIFY,
    CORRECTION_SMOOTH,
    CORRECTION_SWAP,
    FLAG_STILL_WRONG,
    FLAG_TEACHER_CORRECT,
    TEMP_COSINE,
    TEMP_ROWS,
    TEMP_SCALAR,
)

NAME = "torch"


def availability(device=None):
    return True, "pure PyTorch: runs wherever torch runs"


def virtual_teacher(target, num_classes, a, dtype):
    """Logits of the Tf-KD reg teacher: log a at the label, log((1 - a) / (C - 1)) elsewhere."""
    rest = math.log((1 - a) / max(num_classes - 1, 1)) if a < 1 else -math.inf
    logits = torch.full((target.shape[0], num_classes), rest, dtype=dtype, device=target.device)
    return logits.scatter_(1, target[:, None], math.log(a))


def _kl_term(x, log_p):  # x (log x - log p) with 0 log 0 = 0
    return torch.where(x > 0, x * (torch.log(x) - log_p), 0.0)


def expm1_and_psi(x):
    """expm1(x) and psi(x) = 1 - e^x (1 - x) (>= 0, ~x^2/2), both accurate near 0; psi(-inf) = 1.
    Near 0 from F(x) = expm1(x) - x = sum_{k>=2} x^k / k!: expm1 = x + F,
    psi = x^2 + (x - 1) F."""
    small = x.abs() < 0.5
    xs = torch.where(small, x, 0.0)
    last = 17 if x.dtype == torch.float64 else 9  # 0.5^(last+1) / (last+1)! under the dtype's eps
    f = torch.full_like(xs, 1 / math.factorial(last))
    for k in range(last - 1, 1, -1):
        f = f * xs + 1 / math.factorial(k)
    F = xs * xs * f
    psi_big = torch.where(x == -math.inf, 1.0, 1 - torch.exp(x) * (1 - x))
    return (torch.where(small, xs + F, torch.expm1(x)),
            torch.where(small, xs * xs + (xs - 1) * F, psi_big))


def log1p_excess(a):
    """r(a) = (1 + a) log1p(a) - a (>= 0, ~a^2/2), accurate near 0."""
    small = a.abs() < 0.1
    x = torch.where(small, a, 0.0)
    last = 16 if a.dtype == torch.float64 else 8  # r(a) = sum_{k>=2} (-a)^k / (k (k - 1))
    series = torch.zeros_like(x)
    for k in range(last, 1, -1):
        series = series * -x + 1 / (k * (k - 1))
    return torch.where(small, series * x * x, (1 + a) * torch.log1p(a) - a)


def kl_and_difference(s, t, T, p, q, log_p):
    """KL(q || p) per row and p - q, accurately at any temperature (docs/METHODS.md, "Computing
    KL without cancellation"): where |A| < 1/2, the cancellation-free form
    KL = (E_p[psi(d)] - r(A)) / (1 + A), A = E_p[expm1(d)], d = (t - s) / T - c,
    c = E_q[(t - s) / T],
    and p - q = -p (expm1(d) - A) / (1 + A); elsewhere the usual one, which has nothing to lose
    there (q and p differ by much)."""
    Tc = T[:, None]
    log_q = torch.log_softmax(t / Tc, -1)
    standard = (torch.where(q > 0, q * (log_q - log_p), 0.0)).sum(-1)
    diff = (t - s) / Tc
    c = torch.where(q > 0, q * diff, 0.0).sum(-1)
    d = diff - c[:, None]
    E, psi = expm1_and_psi(d)
    live = p > 0
    A = torch.where(live, p * E, 0.0).sum(-1)
    Psi = torch.where(live, p * psi, 0.0).sum(-1)
    stable = (Psi - log1p_excess(A)) / (1 + A)
    # |A| < 1/2 keeps 1 + A free of cancellation
    usable = (A.abs() < 0.5) & torch.isfinite(stable) & ~((q > 0) & ~live).any(-1)
    kl = torch.where(usable, stable, standard)
    p_minus_q = torch.where(usable[:, None], -p * (E - A[:, None]) / (1 + A[:, None]), p - q)
    return kl, torch.where(live | (q > 0), p_minus_q, 0.0)


def forward(student, teacher, target, temp_rows, o):
    """The backends' contract, a few rows at a time: the two dozen N x C temporaries of the math
    below then stay in cache."""
    N, C = student.shape
    rows = max(1, (1 << 18) // max(C, 1))
    if N <= rows:
        return _forward_rows(student, teacher, target, temp_rows, o)
    parts = [_forward_rows(student[i:i + rows],
                           None if teacher is None else teacher[i:i + rows],
                           None if target is None else target[i:i + rows],
                           None if temp_rows is None else temp_rows[i:i + rows], o)
             for i in range(0, N, rows)]
    return tuple(torch.cat(values) for values in zip(*parts))


def _forward_rows(student, teacher, target, temp_rows, o):
    acc = torch.float64 if student.dtype == torch.float64 else torch.float32
    N, C = student.shape
    s = student.to(acc)
    if target is None:
        valid = torch.ones(N, dtype=torch.bool, device=s.device)
        y = None
    else:
        valid = target != o.ignore_index
        in_range = (target >= 0) & (target < C)
        y = torch.where(valid & in_range, target, 0)[:, None]
    if o.virtual_teacher > 0:
        t = virtual_teacher(y[:, 0], C, o.virtual_teacher, acc)
    else:
        t = teacher.to(acc)
    # a teacher row with no finite logit has no distribution: its KD term is 0 (CE still counts)
    has_teacher = t.max(-1).values > -math.inf
    t = torch.where(has_teacher[:, None], t, 0.0)

    if o.temp_mode == TEMP_SCALAR:
        T = torch.full((N,), o.temp_value, dtype=acc, device=s.device)
    elif o.temp_mode == TEMP_ROWS:
        T = temp_rows.to(acc)
    else:
        weighting = "cosine" if o.temp_mode == TEMP_COSINE else "max_prob"
        T = temperature_from_weights(dtd_weights(s, t, weighting), o.tau0, o.beta, False, o.tau_min)
    Tc = T[:, None]
    log_p = torch.log_softmax(s / Tc, -1)
    q = torch.softmax(t / Tc, -1)
    p = log_p.exp()
    kl, p_minus_q = kl_and_difference(s, t, T, p, q, log_p)

    # the correction of wrong rows, as the kernels apply it: new target values at y and b
    wrong = torch.zeros(N, dtype=torch.bool, device=s.device)
    fix_y = fix_b = torch.zeros(N, dtype=acc, device=s.device)
    target_dist = q  # for the still-wrong flag
    if y is not None:
        t_y = t.gather(1, y)[:, 0]
        wrong = valid & (t_y < t.max(-1).values)
        b = t.argmax(-1, keepdim=True)
        q_y, q_b = q.gather(1, y)[:, 0], q.gather(1, b)[:, 0]
        lp_y, lp_b = log_p.gather(1, y)[:, 0], log_p.gather(1, b)[:, 0]
        if o.correction == CORRECTION_SWAP:  # KL changes by (q_y - q_b)(lp_y - lp_b), both exact
            diff = q_b * torch.expm1((t_y - t.gather(1, b)[:, 0]) / T)  # q_y - q_b
            kl = torch.where(wrong, kl + diff * (lp_y - lp_b), kl)
            fix_y, fix_b = torch.where(wrong, diff, 0.0), torch.where(wrong, -diff, 0.0)
            new_y, new_b = q_b, q_y
        elif o.correction == CORRECTION_RECTIFY:
            new_y, new_b = (q_y + 1) / 2, q_b / 2
            k = (q_y + q_b) / (new_y + new_b)
            new_y, new_b = new_y * k, new_b * k
            change = (_kl_term(new_y, lp_y) + _kl_term(new_b, lp_b)
                      - _kl_term(q_y, lp_y) - _kl_term(q_b, lp_b))
            kl = torch.where(wrong, kl + change, kl)
            fix_y = torch.where(wrong, q_y - new_y, 0.0)
            fix_b = torch.where(wrong, q_b - new_b, 0.0)
        if o.correction in (CORRECTION_SWAP, CORRECTION_RECTIFY):
            w = wrong[:, None]
            target_dist = q.clone()
            target_dist.scatter_(1, b, torch.where(w, new_b[:, None], q_b[:, None]))
            target_dist.scatter_(1, y, torch.where(w, new_y[:, None], q_y[:, None]))
        elif o.correction == CORRECTION_SMOOTH:  # target (1 - eps) onehot(y) + eps / C
            smooth = torch.full_like(q, o.smooth_eps / C)
            smooth.scatter_add_(1, y, torch.full_like(smooth[:, :1], 1 - o.smooth_eps))
            kl_smooth = (torch.xlogy(smooth, smooth) - smooth * log_p).sum(-1)
            kl = torch.where(wrong, kl_smooth, kl)
            p_minus_q = torch.where(wrong[:, None], p - smooth, p_minus_q)
            target_dist = torch.where(wrong[:, None], smooth, q)

    kd_w = (o.kd_weight + (o.wrong_kd_weight - o.kd_weight) * wrong.to(acc)) * has_teacher
    loss = kd_w * (T * T if o.t2_scale else 1.0) * kl
    if o.ce_weight != 0:
        log_p1 = torch.log_softmax(s, -1)
        loss = loss - o.ce_weight * log_p1.gather(1, y)[:, 0]
    bad = ~(T > 0)  # values the Python side checks only on CPU: poison the row, as the kernels do
    if target is not None:
        bad = bad | (valid & ~in_range)
    loss = torch.where(bad, torch.nan, torch.where(valid, loss, 0.0))
    grad = student.new_empty(0)
    if o.compute_grad:
        if y is not None:  # the correction's change of target at y and b
            p_minus_q = (p_minus_q.scatter_add(1, y, fix_y[:, None])
                         .scatter_add(1, b, fix_b[:, None]))
        grad = (kd_w * (T if o.t2_scale else 1 / T))[:, None] * p_minus_q
        if o.ce_weight != 0:
            grad = grad + o.ce_weight * (log_p1.exp() - torch.zeros_like(s).scatter_(1, y, 1.0))
        grad = torch.where(valid[:, None], grad, 0.0)
        grad = torch.where(bad[:, None], torch.nan, grad * o.grad_scale).to(student.dtype)

    flags = torch.zeros(N, dtype=torch.int8, device=s.device)
    if y is not None:
        label_mass = target_dist.gather(1, y)[:, 0]
        still_wrong = wrong & (target_dist.scatter(1, y, -1.0).max(-1).values > label_mass)
        flags = (torch.where(valid & ~wrong, FLAG_TEACHER_CORRECT, 0)
                 + torch.where(still_wrong, FLAG_STILL_WRONG, 0)).to(torch.int8)
    return loss, grad, T, flags
