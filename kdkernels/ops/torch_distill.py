"""The pure-torch backend: the fused primitive's math on whole tensors, with the gradient written
in closed form (as the kernels do) rather than by autograd. Correct on any device; not fast."""
import math

import torch

from .._dtd import dtd_weights, temperature_from_weights
from .._options import (
    CORRECTION_RECTIFY,
    CORRECTION_SMOOTH,
    CORRECTION_SWAP,
    DIVERGENCE_JSD,
    DIVERGENCE_KL,
    DIVERGENCE_REVERSE_KL,
    DIVERGENCE_SKEW_KL,
    DIVERGENCE_SKEW_REVERSE_KL,
    FLAG_STILL_WRONG,
    FLAG_TEACHER_CORRECT,
    REDUCTION_MEAN,
    REDUCTION_NONE,
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


def divergence_terms(P, Q, kind, param):
    """Per entry, the divergence's term d(P, Q) (summing to D) and G = dD/dP, for the non-KL
    divergences; P, Q may be classes or coarse outcomes. Every d(P, 0) is linear in P, so an
    outcome gathering many classes of teacher mass 0 has the d and G of its classes."""
    live = P > 0
    P1 = torch.where(live, P, 1.0)

    def xlog(x, y):  # x log(x / y), 0 where x = 0
        ok = x > 0
        return torch.where(ok, x * (torch.log(torch.where(ok, x, 1.0))
                                    - torch.log(torch.where(ok, y, 1.0))), 0.0)
    if kind == DIVERGENCE_REVERSE_KL:
        d = xlog(P, Q)
        G = torch.log(P1) - torch.log(Q)
    elif kind == DIVERGENCE_JSD:
        m = (1 - param) * P + param * Q
        d = param * xlog(Q, m) + (1 - param) * xlog(P, m)
        G = (1 - param) * (torch.log(P1) - torch.log(torch.where(live, m, 1.0)))
    elif kind == DIVERGENCE_SKEW_KL:
        r = param * Q + (1 - param) * P
        d = xlog(Q, r)
        G = -(1 - param) * Q / torch.where(r > 0, r, 1.0)
    elif kind == DIVERGENCE_SKEW_REVERSE_KL:
        r = param * P + (1 - param) * Q
        r1 = torch.where(live, r, 1.0)
        d = xlog(P, r)
        G = torch.log(P1) - torch.log(r1) + 1 - param * P / r1
    else:  # total variation
        d = 0.5 * (P - Q).abs()
        G = 0.5 * torch.sign(P - Q)
    return d, torch.where(live, G, 0.0)


def x_minus_log1p(z):
    """X(z) = z - log1p(z) (>= 0, ~z^2/2), accurate near 0."""
    small = z.abs() < 0.1
    zs = torch.where(small, z, 0.0)
    last = 16 if z.dtype == torch.float64 else 8  # X(z) = sum_{k>=2} (-z)^k / k
    series = torch.zeros_like(zs)
    for k in range(last, 1, -1):
        series = series * -zs + 1 / k
    return torch.where(small, series * zs * zs, z - torch.log1p(z))


def exact_log_ratio(s, t, T, p):
    """log(q_j / p_j) for the dense teacher, free of the cancellation of two logs of size log C:
    (x - c) - log1p(A), x = ((t - max t) - (s - max s)) / T, c = log(Z_t / Z_s),
    A = E_p[expm1(x - c)] (E_p[q / p] = 1); and the rows where that holds: |A| < 1/2 and no
    class with q > 0 = p (elsewhere q and p are far apart and the difference of the logs is
    accurate)."""
    Tc = T[:, None]
    x = ((t - t.max(-1, keepdim=True).values) - (s - s.max(-1, keepdim=True).values)) / Tc
    c = torch.logsumexp(t / Tc, -1) - torch.logsumexp(s / Tc, -1)
    d = x - c[:, None]
    A = torch.where(p > 0, p * torch.expm1(d), 0.0).sum(-1)
    q_on_p_zero = ((t > -math.inf) & (p == 0)).any(-1)  # then E_p[q / p] < 1
    usable = torch.isfinite(A) & (A.abs() < 0.5) & ~q_on_p_zero
    return d - torch.log1p(torch.where(usable, A, 0.0))[:, None], usable


# the linear part taken out of each f-divergence (times r - p, summing to 0) and the constant
# taken out of its G, for the cancellation-free terms (docs/METHODS.md)
def _linear_parts(kind, param):
    if kind == DIVERGENCE_REVERSE_KL:
        return 1.0, 0.0
    if kind == DIVERGENCE_SKEW_KL:
        return -(1 - param), 1 - param
    if kind == DIVERGENCE_SKEW_REVERSE_KL:
        return 1 - param, -(1 - param)
    return 0.0, 0.0  # jsd, tv


def divergence_terms_exact(P, Q, delta, kind, param):
    """divergence_terms given also delta = log(Q / P), accurate: where |delta| < 1 each term is
    P f(e^delta) with f >= 0, ~delta^2 (no cancellation), G shifted to be O(delta); elsewhere
    the direct terms with the same linear part and shift."""
    d_far, G_far = divergence_terms(P, Q, kind, param)
    linear, shift = _linear_parts(kind, param)
    d_far, G_far = d_far + linear * (Q - P), G_far + shift
    E = torch.expm1(delta)
    u = E + 1
    if kind == DIVERGENCE_REVERSE_KL:
        d, G = x_minus_log1p(E), -delta
    elif kind == DIVERGENCE_JSD:
        a, b = param * E, (1 - param) * torch.expm1(-delta)
        d = param * u * x_minus_log1p(b) + (1 - param) * x_minus_log1p(a)
        G = -(1 - param) * torch.log1p(a)
    elif kind == DIVERGENCE_SKEW_KL:
        b = (1 - param) * torch.expm1(-delta)
        d, G = u * x_minus_log1p(b), (1 - param) * b / (1 + b)
    elif kind == DIVERGENCE_SKEW_REVERSE_KL:
        z = (1 - param) * E
        d, G = x_minus_log1p(z), param * z / (1 + z) - torch.log1p(z)
    else:  # total variation
        d, G = 0.5 * E.abs(), -0.5 * torch.sign(delta)
    near = (delta.abs() < 1) & (P > 0)
    return torch.where(near, P * d, d_far), torch.where(P > 0, torch.where(near, G, G_far), 0.0)


def forward(student, teacher, target, temp_rows, o, teacher_indices=None, overwrite=False):
    """The backends' contract, a few rows at a time: the two dozen N x C temporaries of the math
    below then stay in cache. With ``teacher_indices``, ``teacher`` holds the values of a sparse
    (top-k) teacher at those indices. The gradient is a new tensor (``overwrite`` is a
    permission the kernels take; this backend holds temporaries of that size anyway)."""
    N, C = student.shape
    rows = max(1, (1 << 18) // max(C, 1))
    acc = torch.float64 if student.dtype == torch.float64 else torch.float32
    count = None  # the rows "mean" divides by (a tensor: no host sync)
    grad_scale = o.grad_scale
    if o.reduction == REDUCTION_MEAN:
        count = (torch.tensor(float(N), dtype=acc, device=student.device) if target is None
                 else (target != o.ignore_index).sum().clamp(min=1).to(acc))
        grad_scale = o.grad_scale / count

    def part(x, i):
        return None if x is None else x[i:i + rows]
    parts = [_forward_rows(student[i:i + rows], part(teacher, i), part(target, i),
                           part(temp_rows, i), o, part(teacher_indices, i), grad_scale)
             for i in range(0, N, rows)]
    loss, grad, temps, flags = (torch.cat(values) for values in zip(*parts))
    if o.reduction != REDUCTION_NONE:
        loss = loss.sum() if count is None else loss.sum() / count
    return loss, grad, temps, flags


def _temperatures(s, t_for_dtd, temp_rows, o, teacher_indices=None):
    N = s.shape[0]
    if o.temp_mode == TEMP_SCALAR:
        return torch.full((N,), o.temp_value, dtype=s.dtype, device=s.device)
    if o.temp_mode == TEMP_ROWS:
        return temp_rows.to(s.dtype)
    weighting = "cosine" if o.temp_mode == TEMP_COSINE else "max_prob"
    w = dtd_weights(s, t_for_dtd, weighting, teacher_indices)
    return temperature_from_weights(w, o.tau0, o.beta, False, o.tau_min)


def _forward_rows(student, teacher, target, temp_rows, o, teacher_indices, grad_scale):
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
    if teacher_indices is not None:
        T, log_p, kl, direction, wrong, still_wrong, has_teacher = _sparse_teacher(
            s, teacher_indices, teacher.to(acc), y, valid, temp_rows, o)
    else:
        if o.virtual_teacher > 0:
            t = virtual_teacher(y[:, 0], C, o.virtual_teacher, acc)
        else:
            t = teacher.to(acc)
        T, log_p, kl, direction, wrong, still_wrong, has_teacher = _dense_teacher(
            s, t, y, valid, temp_rows, o)

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
        grad = (kd_w * (T if o.t2_scale else 1 / T))[:, None] * direction
        if o.ce_weight != 0:
            grad = grad + o.ce_weight * (log_p1.exp() - torch.zeros_like(s).scatter_(1, y, 1.0))
        grad = torch.where(valid[:, None], grad, 0.0)
        grad = torch.where(bad[:, None], torch.nan, grad * grad_scale).to(student.dtype)

    flags = torch.zeros(N, dtype=torch.int8, device=s.device)
    if y is not None:
        flags = (torch.where(valid & ~wrong, FLAG_TEACHER_CORRECT, 0)
                 + torch.where(still_wrong, FLAG_STILL_WRONG, 0)).to(torch.int8)
    return loss, grad, T, flags


def _dense_teacher(s, t, y, valid, temp_rows, o):
    """(T, log p, D per row, dD/ds without 1/T, wrong, still wrong, has teacher)."""
    N, C = s.shape
    # a teacher row with no finite logit has no distribution: its KD term is 0 (CE still counts)
    has_teacher = t.max(-1).values > -math.inf
    t = torch.where(has_teacher[:, None], t, 0.0)
    T = _temperatures(s, t, temp_rows, o)
    Tc = T[:, None]
    log_p = torch.log_softmax(s / Tc, -1)
    q = torch.softmax(t / Tc, -1)
    p = log_p.exp()
    kl_div = o.divergence == DIVERGENCE_KL
    if kl_div:
        kl, p_minus_q = kl_and_difference(s, t, T, p, q, log_p)

    # the correction of wrong rows, as the kernels apply it: new target values at y and b
    wrong = torch.zeros(N, dtype=torch.bool, device=s.device)
    target_dist = q
    if y is not None:
        t_y = t.gather(1, y)[:, 0]
        wrong = valid & (t_y < t.max(-1).values)
        b = t.argmax(-1, keepdim=True)
        q_y, q_b = q.gather(1, y)[:, 0], q.gather(1, b)[:, 0]
        lp_y, lp_b = log_p.gather(1, y)[:, 0], log_p.gather(1, b)[:, 0]
        fix_y = fix_b = None
        if o.correction == CORRECTION_SWAP:  # KL changes by (q_y - q_b)(lp_y - lp_b), both exact
            diff = q_b * torch.expm1((t_y - t.gather(1, b)[:, 0]) / T)  # q_y - q_b
            change = diff * (lp_y - lp_b)
            fix_y, fix_b = diff, -diff
            new_y, new_b = q_b, q_y
        elif o.correction == CORRECTION_RECTIFY:
            new_y, new_b = (q_y + 1) / 2, q_b / 2
            k = (q_y + q_b) / (new_y + new_b)
            new_y, new_b = new_y * k, new_b * k
            change = (_kl_term(new_y, lp_y) + _kl_term(new_b, lp_b)
                      - _kl_term(q_y, lp_y) - _kl_term(q_b, lp_b))
            fix_y, fix_b = q_y - new_y, q_b - new_b
        if fix_y is not None:
            w = wrong[:, None]
            target_dist = q.clone()
            target_dist.scatter_(1, b, torch.where(w, new_b[:, None], q_b[:, None]))
            target_dist.scatter_(1, y, torch.where(w, new_y[:, None], q_y[:, None]))
            if kl_div:
                kl = torch.where(wrong, kl + change, kl)
                p_minus_q = (p_minus_q.scatter_add(1, y, torch.where(wrong, fix_y, 0.0)[:, None])
                             .scatter_add(1, b, torch.where(wrong, fix_b, 0.0)[:, None]))
        elif o.correction == CORRECTION_SMOOTH:  # target (1 - eps) onehot(y) + eps / C
            smooth = torch.full_like(q, o.smooth_eps / C)
            smooth.scatter_add_(1, y, torch.full_like(smooth[:, :1], 1 - o.smooth_eps))
            target_dist = torch.where(wrong[:, None], smooth, q)
            if kl_div:
                kl_smooth = (torch.xlogy(smooth, smooth) - smooth * log_p).sum(-1)
                kl = torch.where(wrong, kl_smooth, kl)
                p_minus_q = torch.where(wrong[:, None], p - smooth, p_minus_q)
    if kl_div:
        direction = p_minus_q
    else:
        delta = _target_log_ratio(s, t, T, p, log_p, target_dist, y, wrong, o)
        d, G = divergence_terms_exact(p, target_dist, delta, o.divergence, o.divergence_param)
        kl = d.sum(-1)
        direction = torch.where(p > 0, p * (G - (p * G).sum(-1, keepdim=True)), 0.0)

    still_wrong = torch.zeros_like(wrong)
    if y is not None:
        label_mass = target_dist.gather(1, y)[:, 0]
        still_wrong = wrong & (target_dist.scatter(1, y, -1.0).max(-1).values > label_mass)
    kl = torch.where(has_teacher, kl, 0.0)
    return T, log_p, kl, direction, wrong, still_wrong, has_teacher


def _target_log_ratio(s, t, T, p, log_p, target_dist, y, wrong, o):
    """log(target / p) of the dense path: exact for the teacher's values, and for the two a swap
    exchanged (the partner's ratio plus (s_partner - s_j) / T); from the logs where another
    correction replaced them (those targets are far from p)."""
    delta, usable = exact_log_ratio(s, t, T, p)
    teacher = torch.log_softmax(t / T[:, None], -1) - log_p  # before any correction
    delta = torch.where(usable[:, None], delta, teacher)
    direct = torch.log(target_dist) - log_p
    if y is None or o.correction not in (CORRECTION_SWAP, CORRECTION_SMOOTH, CORRECTION_RECTIFY):
        return delta
    changed = wrong[:, None]
    if o.correction == CORRECTION_SWAP:
        b = t.argmax(-1, keepdim=True)
        d_y, d_b = delta.gather(1, y), delta.gather(1, b)
        s_y, s_b = s.gather(1, y), s.gather(1, b)
        Tc = T[:, None]
        delta = delta.scatter(1, y, torch.where(changed, d_b + (s_b - s_y) / Tc, d_y))
        return delta.scatter(1, b, torch.where(changed, d_y + (s_y - s_b) / Tc, d_b))
    if o.correction == CORRECTION_SMOOTH:
        return torch.where(changed, direct, delta)
    columns = torch.zeros_like(delta, dtype=torch.bool)  # rectify: y and b
    columns.scatter_(1, y, True).scatter_(1, t.argmax(-1, keepdim=True), True)
    return torch.where(changed & columns, direct, delta)


def _sparse_teacher(s, indices, values, y, valid, temp_rows, o):
    """The same for a sparse teacher: coarse outcomes (its k classes, the label when a
    correction needs it outside them, and the rest of the classes, which carries the tail's mass
    or none). docs/METHODS.md, "Sparse (top-k) teachers"."""
    N, C = s.shape
    rows = torch.arange(N, device=s.device)
    k = indices.shape[1]
    used = (indices >= 0) & (indices < C)  # out of range (unchecked on CUDA): unused
    at = torch.where(used, indices, 0)
    T = _temperatures(s, values, temp_rows, o, indices)  # cosine: over the teacher's classes
    Tc = T[:, None]
    log_p = torch.log_softmax(s / Tc, -1)
    p = log_p.exp()
    teacher_logits = torch.where(used, values, -math.inf)
    wrong = torch.zeros(N, dtype=torch.bool, device=s.device)
    in_k = torch.zeros(N, dtype=torch.bool, device=s.device)
    pos_y = torch.full((N,), k, dtype=torch.long, device=s.device)
    pos_b = torch.zeros(N, dtype=torch.long, device=s.device)
    if y is not None:
        is_y = used & (indices == y)
        in_k = is_y.any(-1)
        pos_y = torch.where(in_k, is_y.long().argmax(-1), k)
        best = teacher_logits[:, :k].max(-1).values
        first = torch.where(used & (values == best[:, None]), indices, C).min(-1).values
        pos_b = (used & (indices == first[:, None])).long().argmax(-1)
        value_y = torch.where(is_y, values, 0.0).sum(-1)
        wrong = valid & (best > -math.inf) & (~in_k | (value_y < best))
    extra = wrong & ~in_k & (o.correction in (CORRECTION_SWAP, CORRECTION_RECTIFY))
    y_class = y[:, 0] if y is not None else torch.zeros(N, dtype=torch.long, device=s.device)

    # outcomes: the k classes, the label's slot, the rest
    member = torch.zeros(N, C + 1, dtype=torch.bool, device=s.device)
    member.scatter_(1, torch.where(used, indices, C), True)
    member[rows, torch.where(extra, y_class, C)] = True
    rest = ~member[:, :C]
    if o.teacher_tail:  # log-probabilities: the mass outside the k classes is one more outcome
        # in float64: the tail is often a small difference of masses near 1
        tail = (1 - torch.where(used, values.double().exp(), 0.0).sum(-1)).clamp(min=0)
        tail = tail.to(values.dtype)
        tail = torch.where(rest.any(-1), tail, 0.0)  # no class left for it: rounding, dropped
        teacher_logits = torch.cat([teacher_logits, tail.log()[:, None]], -1)
    q = torch.softmax(teacher_logits / Tc, -1)
    q = torch.nan_to_num(q, nan=0.0)  # a row with no mass at all
    # no teacher on a row whose every slot is unused or -inf, with a tail too (a NaN value
    # still poisons the row)
    has_teacher = (used & (values != -math.inf)).any(-1)
    q_rest = q[:, k] if o.teacher_tail else torch.zeros(N, dtype=s.dtype, device=s.device)
    P = torch.cat([torch.where(used, p.gather(1, at), 0.0),
                   torch.where(extra, p[rows, y_class], 0.0)[:, None],
                   torch.where(rest, p, 0.0).sum(-1, keepdim=True)], -1)
    Q = torch.cat([q[:, :k], torch.zeros_like(P[:, :1]), q_rest[:, None]], -1)
    target = Q.clone()
    if o.correction == CORRECTION_SWAP:
        target[rows, pos_y], target[rows, pos_b] = Q[rows, pos_b], Q[rows, pos_y]
    elif o.correction == CORRECTION_RECTIFY:
        q_y, q_b = Q[rows, pos_y], Q[rows, pos_b]
        new_y, new_b = (q_y + 1) / 2, q_b / 2
        scale = (q_y + q_b) / (new_y + new_b)
        target[rows, pos_y], target[rows, pos_b] = new_y * scale, new_b * scale
    target = torch.where(wrong[:, None], target, Q)

    if o.divergence == DIVERGENCE_KL:
        d = _kl_term(target, torch.log(P))
        G = torch.where(P > 0, -target / torch.where(P > 0, P, 1.0),
                        torch.where(target > 0, -math.inf, 0.0))
    else:
        d, G = divergence_terms(P, target, o.divergence, o.divergence_param)
    kl = d.sum(-1)
    mean_G = (P * G).sum(-1, keepdim=True)
    # each class: p_j (G of its outcome - mean G); the rest's G, then the explicit outcomes
    direction = p * (G[:, k + 1:] - mean_G)
    explicit_used = torch.cat([used, extra[:, None]], -1)
    explicit = torch.where(explicit_used, torch.cat([at, y_class[:, None]], -1), C)  # C: unused
    direction = torch.cat([direction, direction[:, :1]], -1).scatter(
        1, explicit, P[:, :k + 1] * (G[:, :k + 1] - mean_G))[:, :C]
    direction = torch.where(p > 0, direction, 0.0)
    if o.correction == CORRECTION_SMOOTH:  # the target is no longer the teacher: dense
        smooth = torch.full_like(p, o.smooth_eps / C)
        smooth[rows, y_class] += 1 - o.smooth_eps
        kl = torch.where(wrong, (torch.xlogy(smooth, smooth) - smooth * log_p).sum(-1), kl)
        direction = torch.where(wrong[:, None], p - smooth, direction)

    still_wrong = torch.zeros_like(wrong)
    if y is not None and o.correction != CORRECTION_SMOOTH:
        classes = target[:, :k + 1].clone()
        classes[rows, pos_y] = -1
        still_wrong = wrong & (classes.max(-1).values > target[rows, pos_y])
    kl = torch.where(has_teacher, kl, 0.0)
    direction = torch.where(has_teacher[:, None], direction, 0.0)  # NaN where no outcome has mass
    return T, log_p, kl, direction, wrong, still_wrong, has_teacher


# ---- the shard entry points (kdkernels/_options.py, SHARD_STATS / SHARD_ROWS) ---------------

def _shard_logits(student, teacher, target, vocab_start, vocab_size, o):
    """float64 student and teacher columns of the range (the virtual teacher's built from the
    labels), the rows' local label ids clamped into the range, and which rows own their label."""
    s = student.detach().double()
    n, width = s.shape
    owns = torch.zeros(n, dtype=torch.bool, device=s.device)
    ly = torch.zeros(n, 1, dtype=torch.long, device=s.device)
    if target is not None:
        local = target.long() - vocab_start
        owns = (local >= 0) & (local < width)
        ly = torch.where(owns, local, 0)[:, None]
    if teacher is None:  # Tf-KD reg's virtual teacher, this range's columns of it
        a = o.virtual_teacher
        rest = math.log((1 - a) / max(vocab_size - 1, 1)) if a < 1 else -math.inf
        t = torch.full_like(s, rest)
        t.scatter_(1, ly, torch.where(owns, s.new_tensor(math.log(a)),
                                      s.new_tensor(rest))[:, None])
    else:
        t = teacher.detach().double()
    return s, t, ly, owns


def shard_statistics(student, teacher, target, temps, vocab_start, vocab_size, o):
    """[n, len(SHARD_STATS)] float64: each row's statistics over the range of columns
    [vocab_start, vocab_start + width) that `student` / `teacher` hold (temps: [n] float64)."""
    s, t, ly, owns = _shard_logits(student, teacher, target, vocab_start, vocab_size, o)
    n, width = s.shape
    Tc = temps.double()[:, None]
    ms = s.max(-1).values
    ms_safe = torch.where(ms == -math.inf, 0.0, ms)
    mt = t.max(-1).values
    mt_safe = torch.where(mt == -math.inf, 0.0, mt)
    es = torch.exp((s - ms_safe[:, None]) / Tc)
    et = torch.exp((t - mt_safe[:, None]) / Tc)
    cross = torch.where(et > 0, et * (t - s), 0.0).sum(-1)
    zero = torch.zeros_like(ms)
    z1 = torch.exp(s - ms_safe[:, None]).sum(-1) if o.ce_weight != 0 else zero
    s_y = torch.where(owns, s.gather(1, ly)[:, 0], 0.0)
    t_y = torch.where(owns, t.gather(1, ly)[:, 0], 0.0)
    b, s_b = torch.zeros(n, dtype=torch.long, device=s.device), zero
    if o.correction in (CORRECTION_SWAP, CORRECTION_RECTIFY):  # only a correction needs them
        b = t.argmax(-1)
        s_b = s.gather(1, b[:, None])[:, 0]
    tx1 = tx2 = torch.full_like(ms, -math.inf)
    idx1 = torch.zeros(n, dtype=torch.long, device=s.device)
    if o.correction == CORRECTION_RECTIFY:  # the two largest teacher logits away from the label
        tx = t.scatter(1, ly, torch.where(owns[:, None], -math.inf, t.gather(1, ly)))
        top = tx.topk(min(2, width), -1)
        tx1, idx1 = top.values[:, 0], top.indices[:, 0]
        tx2 = top.values[:, 1] if width > 1 else tx2
    s_sum = s.sum(-1) if o.correction == CORRECTION_SMOOTH else zero
    cols = [ms, es.sum(-1), mt, et.sum(-1), cross, z1, s_y, t_y, owns.double(),
            (b + vocab_start).double(), s_b, tx1, (idx1 + vocab_start).double(), tx2, s_sum]
    return torch.stack(cols, -1)


def shard_pass(student, teacher, target, rows, vocab_start, vocab_size, o, grad=True,
               overwrite=False):
    """From each row's merged values `rows` ([n, len(SHARD_ROWS)] float64): the range's
    gradient ([n, width], the student's dtype), or (grad=False) its part of D and of
    sum_j p_j G_j ([n, 2] float64; the divergences other than the forward KL). ``overwrite``:
    the gradient may be written over ``student`` (Triton's kernel does; here a new tensor)."""
    s, t, _, _ = _shard_logits(student, teacher, target, vocab_start, vocab_size, o)
    width = s.shape[1]
    r = dict(zip(("T", "ms", "log_zs", "mt", "log_zt", "z1", "kd_grad", "b", "lr_y", "lr_b",
                  "g_mean", "scale", "fix_y", "fix_b", "smoothed", "has_teacher"),
                 rows.double().unbind(1)))
    r = {k: v[:, None] for k, v in r.items()}
    lp = (s - r["ms"]) / r["T"] - r["log_zs"]
    lr = (t - r["mt"]) / r["T"] - r["log_zt"]
    log_ec = math.log(o.smooth_eps / vocab_size) if o.smooth_eps > 0 else -math.inf
    lr = torch.where(r["smoothed"] > 0, log_ec, lr)
    cols = torch.arange(vocab_start, vocab_start + width, device=s.device)[None, :]
    if target is not None:
        lr = torch.where((r["fix_y"] > 0) & (cols == target.long()[:, None]), r["lr_y"], lr)
    lr = torch.where((r["fix_b"] > 0) & (cols == r["b"].long()), r["lr_b"], lr)
    p = lp.exp()
    if o.divergence != DIVERGENCE_KL:
        d, G = divergence_terms(p, lr.exp(), o.divergence, o.divergence_param)
    if not grad:
        d = torch.where(r["has_teacher"] > 0, d, 0.0)
        return torch.stack([d.sum(-1), (p * G).sum(-1)], -1)
    if o.divergence == DIVERGENCE_KL:
        direction = p - lr.exp()
    else:
        direction = torch.where(p > 0, p * (G - r["g_mean"]), 0.0)
    g = torch.where(r["kd_grad"] != 0, r["kd_grad"] * direction, 0.0)
    if o.ce_weight != 0:
        g = g + o.ce_weight * torch.exp(s - r["ms"]) / r["z1"]
        if target is not None:
            g = g - o.ce_weight * (cols == target.long()[:, None]).double()
    g = torch.where(r["scale"] == 0, 0.0, g * r["scale"])  # NaN scale: a bad row
    return g.to(student.dtype)


def shard_dtd_sums(student, teacher, weighting):
    """[n, 3] (cosine: s.s, t.t, s.t over the finite pairs) or [n, 2] (max_prob: max s and
    sum exp(s - max s)) float64 over a range of columns, for a DTD temperature."""
    s = student.detach().double()
    if weighting == "cosine":
        t = teacher.detach().double()
        finite = torch.isfinite(s) & torch.isfinite(t)
        s, t = torch.where(finite, s, 0.0), torch.where(finite, t, 0.0)
        return torch.stack([(s * s).sum(-1), (t * t).sum(-1), (s * t).sum(-1)], -1)
    m = s.max(-1).values
    return torch.stack([m, torch.exp(s - m[:, None]).sum(-1)], -1)
