"""The pure-torch backend: the fused primitive's math on whole tensors, with the gradient written
in closed form (as the kernels do) rather than by autograd. Correct on any device; not fast."""
import math

import torch

from .._dtd import dtd_weights, temperature_from_weights
from .._options import (FLAG_STILL_WRONG, FLAG_TEACHER_CORRECT, TEMP_COSINE, TEMP_ROWS,
                        TEMP_SCALAR)

NAME = "torch"


def availability(device=None):
    return True, "pure PyTorch: runs wherever torch runs"


def virtual_teacher(target, num_classes, a, dtype):
    """Logits of the Tf-KD reg teacher: log a at the label, log((1 - a) / (C - 1)) elsewhere."""
    rest = math.log((1 - a) / max(num_classes - 1, 1)) if a < 1 else -math.inf
    logits = torch.full((target.shape[0], num_classes), rest, dtype=dtype, device=target.device)
    return logits.scatter_(1, target[:, None], math.log(a))


def forward(student, teacher, target, temp_rows, o):
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
    t = virtual_teacher(y[:, 0], C, o.virtual_teacher, acc) if o.virtual_teacher > 0 else teacher.to(acc)
    # a teacher row with no finite logit has no distribution: its KD term is 0 (CE still counts)
    has_teacher = t.max(-1).values > -math.inf
    t = torch.where(has_teacher[:, None], t, 0.0)

    if o.temp_mode == TEMP_SCALAR:
        T = torch.full((N,), o.temperature, dtype=acc, device=s.device)
    elif o.temp_mode == TEMP_ROWS:
        T = temp_rows.to(acc)
    else:
        weighting = "cosine" if o.temp_mode == TEMP_COSINE else "max_prob"
        T = temperature_from_weights(dtd_weights(s, t, weighting), o.tau0, o.beta, False, o.tau_min)
    Tc = T[:, None]
    log_p = torch.log_softmax(s / Tc, -1)
    q = torch.softmax(t / Tc, -1)

    target_dist = q
    wrong = torch.zeros(N, dtype=torch.bool, device=s.device)
    if y is not None:
        t_y = t.gather(1, y)[:, 0]
        wrong = valid & (t_y < t.max(-1).values)
        b = t.argmax(-1, keepdim=True)
        if o.correction in (1, 3):  # swap / rectify: new values at the label and the argmax
            q_y, q_b = q.gather(1, y), q.gather(1, b)
            if o.correction == 1:
                new_y, new_b = q_b, q_y
            else:
                new_y, new_b = (q_y + 1) / 2, q_b / 2
                k = (q_y + q_b) / (new_y + new_b)
                new_y, new_b = new_y * k, new_b * k
            w = wrong[:, None]
            target_dist = q.clone()
            target_dist.scatter_(1, b, torch.where(w, new_b, q_b))
            target_dist.scatter_(1, y, torch.where(w, new_y, q_y))
        elif o.correction == 2:  # smooth
            smooth = torch.full_like(q, o.smooth_eps / C)
            smooth.scatter_add_(1, y, torch.full_like(smooth[:, :1], 1 - o.smooth_eps))
            target_dist = torch.where(wrong[:, None], smooth, q)

    kl = (torch.xlogy(target_dist, target_dist)
          - target_dist * torch.where(target_dist > 0, log_p, 0.0)).sum(-1)
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
        grad = (kd_w * (T if o.t2_scale else 1 / T))[:, None] * (log_p.exp() - target_dist)
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
