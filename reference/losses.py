"""The oracle. Notation as in docs/METHODS.md: s student logits [N, C], t teacher logits [N, C],
y labels [N] (or None), T temperature (float or [N]). Every function returns per-row values
before reduction unless it says otherwise."""
import torch


def _valid_rows(s, y, ignore_index):
    if y is None:
        return torch.ones(s.shape[0], dtype=torch.bool, device=s.device)
    return y != ignore_index


def reduce_rows(rows, valid, reduction):
    """mean over rows that count (torch's batchmean), sum, or the rows themselves (0 on ignored)."""
    rows = torch.where(valid, rows, torch.zeros_like(rows))
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / valid.sum().clamp(min=1)


def _kl(target, log_p):
    """KL(target || p) per row with 0 * log 0 = 0."""
    safe_log_p = torch.where(target > 0, log_p, torch.zeros_like(log_p))
    return (torch.xlogy(target, target) - target * safe_log_p).sum(-1)


DIVERGENCES = ("kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tv")


def _xlog(x, y):
    """x log(x / y) with 0 log(0 / y) = 0 (and x log(x / 0) = inf for x > 0); the logs see 1
    where x = 0, so that the branch torch.where leaves out has a finite gradient."""
    live = x > 0
    x_safe = torch.where(live, x, torch.ones_like(x))
    y_safe = torch.where(live, y, torch.ones_like(y))
    return torch.where(live, x * (torch.log(x_safe) - torch.log(y_safe)), torch.zeros_like(x))


def divergence_rows(q, p, kind="kl", jsd_beta=0.5, skew_alpha=0.1):
    """D(q, p) per row, q the (corrected) teacher distribution, p the student's, over the last
    dimension (classes, or the coarse outcomes of a sparse teacher with a tail)."""
    if kind == "kl" or (kind == "jsd" and jsd_beta == 0):
        return _xlog(q, p).sum(-1)
    if kind == "reverse_kl" or (kind == "jsd" and jsd_beta == 1):
        return _xlog(p, q).sum(-1)
    if kind == "jsd":  # TRL's generalized JSD: beta KL(q || m) + (1 - beta) KL(p || m)
        m = (1 - jsd_beta) * p + jsd_beta * q
        return (jsd_beta * _xlog(q, m) + (1 - jsd_beta) * _xlog(p, m)).sum(-1)
    if kind == "skew_kl":  # DistiLLM: KL(q || a q + (1 - a) p)
        return _xlog(q, skew_alpha * q + (1 - skew_alpha) * p).sum(-1)
    if kind == "skew_reverse_kl":  # KL(p || a p + (1 - a) q)
        return _xlog(p, skew_alpha * p + (1 - skew_alpha) * q).sum(-1)
    if kind == "tv":
        return 0.5 * (p - q).abs().sum(-1)
    raise ValueError(kind)


def _ce(s, y, valid):
    y_safe = torch.where(valid, y, torch.zeros_like(y))
    return -torch.log_softmax(s, -1).gather(1, y_safe[:, None])[:, 0]


def rectify(q, a, b):
    """Teacher's bias rectification of every row of q (label a, wrong argmax b):
    q'_a = (q_a + 1) / 2, q'_b = q_b / 2, both rescaled so that the row still sums to 1."""
    rows = torch.arange(q.shape[0], device=q.device)
    q_a, q_b = q[rows, a], q[rows, b]
    new_a, new_b = (q_a + 1) / 2, q_b / 2
    scale = (q_a + q_b) / (new_a + new_b)
    rect = q.clone()
    rect[rows, a] = new_a * scale
    rect[rows, b] = new_b * scale
    return rect


def dtd_temperature(s, t, tau0=4.0, beta=1.0, weighting="cosine", center=False, tau_min=1.0,
                    valid=None):
    """Dynamic Temperature Distillation (docs/METHODS.md, Preparing Lessons), from detached logits.

    cosine: w = (1 - v.u)^2 with v, u the L2-normalised rows (non-finite entries left out).
    max_prob: w = 1 / max_j softmax(s)_j.
    tau = tau0 - beta * w, or with center=True tau0 + beta * (mean(w) - w); clamp at tau_min."""
    s, t = s.detach(), t.detach()
    if weighting == "cosine":
        finite = torch.isfinite(s) & torch.isfinite(t)
        s0 = torch.where(finite, s, torch.zeros_like(s))
        t0 = torch.where(finite, t, torch.zeros_like(t))
        v = s0 / s0.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        u = t0 / t0.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        w = (1 - (v * u).sum(-1)) ** 2
    elif weighting == "max_prob":
        w = 1 / torch.softmax(s, -1).max(-1).values
    else:
        raise ValueError(weighting)
    if center:
        if valid is None:
            valid = torch.ones_like(w, dtype=torch.bool)
        mean_w = torch.where(valid, w, torch.zeros_like(w)).sum() / valid.sum().clamp(min=1)
        tau = tau0 + beta * (mean_w - w)
    else:
        tau = tau0 - beta * w
    return tau.clamp(min=tau_min)


def virtual_teacher_logits(y, num_classes, a, dtype):
    """Tf-KD reg: log of pd, pd_y = a and (1 - a) / (C - 1) elsewhere."""
    rest = (1 - a) / max(num_classes - 1, 1)
    pd = torch.full((y.shape[0], num_classes), rest, dtype=dtype, device=y.device)
    pd.scatter_(1, y[:, None].clamp(min=0), a)
    return torch.log(pd)


def densify(indices, values, num_classes):
    """A sparse (top-k) teacher as dense logits: its values at its indices, -inf elsewhere
    (negative indices are unused slots)."""
    used = indices >= 0
    dense = torch.full((indices.shape[0], num_classes + 1), float("-inf"), dtype=values.dtype,
                       device=values.device)
    dense.scatter_(1, torch.where(used, indices, num_classes), torch.where(used, values, 0.0))
    return dense[:, :num_classes]


def distillation_loss(s, t, y=None, temperature=4.0, kd_weight=0.9, ce_weight=0.1,
                      wrong_kd_weight=None, correction=None, smooth_eps=0.1, virtual_teacher=None,
                      t2_scale=True, ignore_index=-100, reduction="mean", divergence="kl",
                      jsd_beta=0.5, skew_alpha=0.1):
    """The general loss every method maps onto. Returns (loss, stats) where stats holds the
    per-row teacher_correct mask, temperature and still_wrong mask.

    l_i = w_i * T_i^2 * D(A(q_T), p_T) + ce_weight * CE(s, y), w_i = kd_weight on rows the
    teacher gets right (or with no labels), wrong_kd_weight on the rows it gets wrong; D the
    divergence (KL(q || p) by default). t may be a sparse teacher (indices, values, tail): without
    a tail it is the dense teacher with -inf outside its indices; with one, see
    _sparse_tail_loss."""
    N, C = s.shape
    valid = _valid_rows(s, y, ignore_index)
    if wrong_kd_weight is None:
        wrong_kd_weight = kd_weight
    if t is not None and not isinstance(t, torch.Tensor):  # a sparse teacher
        if t.tail:
            return _sparse_tail_loss(s, t, y, temperature, kd_weight, ce_weight, wrong_kd_weight,
                                     correction, smooth_eps, t2_scale, valid, reduction,
                                     divergence, jsd_beta, skew_alpha)
        t = densify(t.indices, t.values.detach().to(s.dtype), C)
    if virtual_teacher is not None:
        t = virtual_teacher_logits(torch.where(valid, y, torch.zeros_like(y)), C, virtual_teacher,
                                   s.dtype)
    t = t.detach().to(s.dtype)
    # a teacher row with no finite logit has no distribution: its KD term is 0 (CE still counts)
    has_teacher = t.max(-1).values > float("-inf")
    t = torch.where(has_teacher[:, None], t, torch.zeros_like(t))

    if isinstance(temperature, torch.Tensor):
        T = temperature.detach().to(s.dtype)
    else:
        T = torch.full((N,), float(temperature), dtype=s.dtype, device=s.device)

    log_p = torch.log_softmax(s / T[:, None], -1)
    q = torch.softmax(t / T[:, None], -1)

    if y is not None:
        y_safe = torch.where(valid, y, torch.zeros_like(y))
        b = t.argmax(-1)  # first maximum: a tie with the label counts as correct
        wrong = valid & (b != y_safe) & (t.gather(1, y_safe[:, None])[:, 0] < t.max(-1).values)
    else:
        y_safe = None
        wrong = torch.zeros(N, dtype=torch.bool, device=s.device)

    target = q
    if correction == "swap":  # Probability Shift: exchange the values at y and b on wrong rows
        rows = torch.arange(N, device=s.device)
        swapped = q.clone()
        swapped[rows, y_safe] = q[rows, b]
        swapped[rows, b] = q[rows, y_safe]
        target = torch.where(wrong[:, None], swapped, q)
    elif correction == "smooth":  # (1 - eps) onehot(y) + eps / C, not tempered
        onehot = torch.nn.functional.one_hot(y_safe, C).to(s.dtype)
        smooth = (1 - smooth_eps) * onehot + smooth_eps / C
        target = torch.where(wrong[:, None], smooth, q)
    elif correction == "rectify":  # Teacher's bias, applied to q_T with a = y
        target = torch.where(wrong[:, None], rectify(q, y_safe, b), q)

    if divergence == "kl":
        d = _kl(target, log_p)
    else:
        d = divergence_rows(target, log_p.exp(), divergence, jsd_beta, skew_alpha)
    kl = torch.where(has_teacher, d, torch.zeros_like(T))
    T_pow = T ** 2 if t2_scale else torch.ones_like(T)
    w = torch.where(wrong, torch.full_like(T, wrong_kd_weight), torch.full_like(T, kd_weight))
    rows_loss = w * T_pow * kl
    if ce_weight != 0:
        rows_loss = rows_loss + ce_weight * _ce(s, y, valid)

    if y is not None:
        # still wrong: some other class keeps more target mass than the label
        others = target.clone()
        others[torch.arange(N, device=s.device), y_safe] = -1
        still_wrong = wrong & (others.max(-1).values > target.gather(1, y_safe[:, None])[:, 0])
        teacher_correct = valid & ~wrong
    else:
        still_wrong, teacher_correct = None, None
    stats = {"teacher_correct": teacher_correct, "temperature": T, "still_wrong": still_wrong}
    return reduce_rows(rows_loss, valid, reduction), stats


def _sparse_tail_loss(s, teacher, y, temperature, kd_weight, ce_weight, wrong_kd_weight,
                      correction, smooth_eps, t2_scale, valid, reduction, kind, jsd_beta,
                      skew_alpha):
    """A top-k teacher given as log-probabilities with its tail (the mass outside its k classes):
    the divergence compares coarse distributions over the outcomes: each of the k classes, the
    label when a correction needs it and it is not among them (teacher mass 0 before the
    correction), and the tail, every other class (its mass dropped when no class is left for it).
    Tempering: q ~ exp(log q_1 / T) on each outcome, the tail's mass 1 - sum_k q_k included."""
    N, C = s.shape
    rows = torch.arange(N, device=s.device)
    idx, v = teacher.indices, teacher.values.detach().to(s.dtype)
    used = idx >= 0
    at = torch.where(used, idx, 0)
    T = (temperature.detach().to(s.dtype) if isinstance(temperature, torch.Tensor)
         else torch.full((N,), float(temperature), dtype=s.dtype, device=s.device))
    log_p = torch.log_softmax(s / T[:, None], -1)
    p = log_p.exp()
    wrong = torch.zeros(N, dtype=torch.bool, device=s.device)
    y_safe = torch.zeros(N, dtype=torch.long, device=s.device)
    in_k = torch.zeros(N, dtype=torch.bool, device=s.device)
    pos_y = torch.zeros(N, dtype=torch.long, device=s.device)
    pos_b = torch.zeros(N, dtype=torch.long, device=s.device)
    if y is not None:
        y_safe = torch.where(valid, y, torch.zeros_like(y))
        is_y = used & (idx == y_safe[:, None])
        in_k = is_y.any(-1)
        pos_y = is_y.long().argmax(-1)
        best = torch.where(used, v, float("-inf")).max(-1).values
        first = torch.where(used & (v == best[:, None]), idx, C).min(-1).values  # first maximum
        pos_b = (used & (idx == first[:, None])).long().argmax(-1)
        value_y = torch.where(is_y, v, 0.0).sum(-1)
        wrong = valid & (best > float("-inf")) & (~in_k | (value_y < best))
    extra = wrong & ~in_k & (correction in ("swap", "rectify"))
    k = idx.shape[1]
    pos_y = torch.where(in_k, pos_y, k)  # the label's outcome: among the k, or its own slot
    member = torch.zeros(N, C + 1, dtype=torch.bool, device=s.device)
    member.scatter_(1, torch.where(used, idx, C), True)
    member[rows, torch.where(extra, y_safe, C)] = True
    member = member[:, :C]
    # the tail's outcome: the classes not among the others; with none left, the stored tail
    # mass is rounding and is dropped
    tail_mass = (1 - torch.where(used, v.exp(), 0.0).sum(-1)).clamp(min=0)
    tail_mass = torch.where(member.all(-1), torch.zeros_like(tail_mass), tail_mass)
    logits = torch.cat([torch.where(used, v, float("-inf")), tail_mass.log()[:, None]], -1)
    q = torch.softmax(logits / T[:, None], -1)  # [N, k + 1]: the classes, then the tail
    # every slot unused or -inf: no teacher, even with a tail (docs/METHODS.md)
    has_teacher = (used & (v != float("-inf"))).any(-1)
    P = torch.cat([torch.where(used, p.gather(1, at), 0.0),
                   torch.where(extra, p[rows, y_safe], 0.0)[:, None],
                   torch.where(member, 0.0, p).sum(-1, keepdim=True)], -1)
    Q = torch.cat([q[:, :k], torch.zeros_like(q[:, :1]), q[:, k:]], -1)
    target = Q.clone()
    if correction == "swap":
        target[rows, pos_y], target[rows, pos_b] = Q[rows, pos_b], Q[rows, pos_y]
    elif correction == "rectify":
        q_y, q_b = Q[rows, pos_y], Q[rows, pos_b]
        new_y, new_b = (q_y + 1) / 2, q_b / 2
        scale = (q_y + q_b) / (new_y + new_b)
        target[rows, pos_y], target[rows, pos_b] = new_y * scale, new_b * scale
    target = torch.where(wrong[:, None], target, Q)
    # a row without a teacher compares P with itself: D = 0 and a zero gradient (masking D
    # afterwards would send NaN through an infinite reverse KL)
    target = torch.where(has_teacher[:, None], target, P.detach())
    d = divergence_rows(target, P, kind, jsd_beta, skew_alpha)
    if correction == "smooth":  # the target is no longer the teacher: dense, as without a tail
        smooth = torch.full_like(p, smooth_eps / C)
        smooth[rows, y_safe] += 1 - smooth_eps
        d = torch.where(wrong, _kl(smooth, log_p), d)
    d = torch.where(has_teacher, d, torch.zeros_like(d))
    w = torch.where(wrong, torch.full_like(T, wrong_kd_weight), torch.full_like(T, kd_weight))
    rows_loss = w * (T ** 2 if t2_scale else torch.ones_like(T)) * d
    if ce_weight != 0:
        rows_loss = rows_loss + ce_weight * _ce(s, y, valid)
    stats = {"temperature": T, "teacher_correct": None, "still_wrong": None}
    if y is not None:
        classes = target[:, :k + 1].clone()
        classes[rows, pos_y] = -1
        still_wrong = wrong & (classes.max(-1).values > target[rows, pos_y])
        if correction in ("swap", "smooth"):
            still_wrong = torch.zeros_like(wrong)
        stats.update(teacher_correct=valid & ~wrong, still_wrong=still_wrong)
    return reduce_rows(rows_loss, valid, reduction), stats


def kd_loss(s, t, y=None, temperature=4.0, kd_weight=0.9, ce_weight=0.1, t2_scale=True,
            ignore_index=-100, reduction="mean"):
    """Hinton KD: kd_weight * T^2 * KL(q_T || p_T) + ce_weight * CE(s, y)."""
    valid = _valid_rows(s, y, ignore_index)
    T = temperature
    log_p = torch.log_softmax(s / T, -1)
    q = torch.softmax(t.detach().to(s.dtype) / T, -1)
    rows = kd_weight * (T ** 2 if t2_scale else 1.0) * _kl(q, log_p)
    if ce_weight != 0:
        rows = rows + ce_weight * _ce(s, y, valid)
    return reduce_rows(rows, valid, reduction)


def tfkd_reg_loss(s, y, a=0.99, temperature=20.0, kd_weight=0.9, ce_weight=0.1,
                  ignore_index=-100, reduction="mean"):
    """Tf-KD reg, paper form: the virtual teacher pd softened at T, student at the same T."""
    valid = _valid_rows(s, y, ignore_index)
    C = s.shape[-1]
    y_safe = torch.where(valid, y, torch.zeros_like(y))
    pd = torch.exp(virtual_teacher_logits(y_safe, C, a, s.dtype))
    q = torch.softmax(torch.log(pd) / temperature, -1)
    log_p = torch.log_softmax(s / temperature, -1)
    rows = kd_weight * temperature ** 2 * _kl(q, log_p) + ce_weight * _ce(s, y, valid)
    return reduce_rows(rows, valid, reduction)


def preparing_lessons_loss(s, t, y, correction="swap", temperature=4.0, smooth_eps=0.1,
                           kd_weight=0.9, ce_weight=0.1, ignore_index=-100, reduction="mean"):
    """kd_weight * tau_i^2 * KL(A(q_tau) || p_tau) + ce_weight * CE. temperature is a float, an
    [N] tensor, or a dict of dtd_temperature arguments (computed here from the raw logits)."""
    if isinstance(temperature, dict):
        valid = _valid_rows(s, y, ignore_index)
        temperature = dtd_temperature(s, t, valid=valid, **temperature)
    return distillation_loss(s, t, y, temperature, kd_weight, ce_weight, correction=correction,
                             smooth_eps=smooth_eps, ignore_index=ignore_index,
                             reduction=reduction)[0]


def teacher_bias_loss(s, t, y, gamma, temperature=4.0, ignore_index=-100, reduction="mean"):
    """(1 - gamma) CE + w_i T^2 KL(q'_T || p_T), w = 1 - gamma on easy rows, gamma on hard ones,
    both KL parts averaged over the same valid rows."""
    valid = _valid_rows(s, y, ignore_index)
    y_safe = torch.where(valid, y, torch.zeros_like(y))
    T = temperature
    log_p = torch.log_softmax(s / T, -1)
    q = torch.softmax(t.detach().to(s.dtype) / T, -1)
    tt = t.detach().to(s.dtype)
    b = tt.argmax(-1)
    hard = valid & (tt.gather(1, y_safe[:, None])[:, 0] < tt.max(-1).values)
    q_used = torch.where(hard[:, None], rectify(q, y_safe, b), q)
    kl = _kl(q_used, log_p)
    easy_part = torch.where(hard, torch.zeros_like(kl), kl)
    hard_part = torch.where(hard, kl, torch.zeros_like(kl))
    rows_loss = ((1 - gamma) * _ce(s, y, valid)
                 + (1 - gamma) * T ** 2 * easy_part + gamma * T ** 2 * hard_part)
    return reduce_rows(rows_loss, valid, reduction)


def top_score_difference_loss(logits, y, eta=0.6, k=5, ignore_index=-100, reduction="mean"):
    """Tolerant teacher: eta * CE + (1 - eta) * (f_(1) - mean(f_(2..K))), f = softmax(logits)."""
    valid = _valid_rows(logits, y, ignore_index)
    f = torch.softmax(logits, -1)
    k = min(k, logits.shape[-1])
    top = f.topk(k, -1).values
    gap = top[:, 0] - (top[:, 1:].mean(-1) if k > 1 else torch.zeros_like(top[:, 0]))
    rows = eta * _ce(logits, y, valid) + (1 - eta) * gap
    return reduce_rows(rows, valid, reduction)
