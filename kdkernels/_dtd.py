"""Dynamic Temperature Distillation weights in plain torch: the pre-pass of the centred form and
the public ``dtd_temperature``. The kernels compute the uncentred forms themselves."""
import torch


def dtd_weights(student, teacher, weighting, teacher_indices=None):
    """Per-row confusability w from detached [N, C] logits (float32 or float64 accumulation);
    a sparse teacher ([N, k] values at teacher_indices) counts over its k classes."""
    acc = torch.float64 if student.dtype == torch.float64 else torch.float32
    s = student.detach().to(acc)
    if weighting == "max_prob":
        # 1 / max softmax(s) = sum_j exp(s_j - max s)
        return torch.exp(torch.logsumexp(s, -1) - s.max(-1).values)
    t = teacher.detach().to(acc)
    if teacher_indices is not None:  # the finite pairs are the teacher's classes
        used = (teacher_indices >= 0) & (teacher_indices < s.shape[1])  # others: unused slots
        s = s.gather(1, torch.where(used, teacher_indices, 0))
        t = torch.where(used, t, -torch.inf)
    finite = torch.isfinite(s) & torch.isfinite(t)
    s = torch.where(finite, s, 0.0)
    t = torch.where(finite, t, 0.0)
    dot = torch.linalg.vecdot(s, t)
    norms = (torch.linalg.vector_norm(s, dim=-1).clamp(min=1e-12)
             * torch.linalg.vector_norm(t, dim=-1).clamp(min=1e-12))
    return (1 - dot / norms) ** 2


def temperature_from_weights(w, tau0, beta, center, tau_min, valid=None):
    """tau = tau0 - beta w, or tau0 + beta (mean w - w) over the valid rows; clamped at tau_min."""
    if center:
        if valid is None:
            mean_w = w.mean() if w.numel() else w.sum()
        else:
            mean_w = torch.where(valid, w, 0.0).sum() / valid.sum().clamp(min=1)
        tau = tau0 + beta * (mean_w - w)
    else:
        tau = tau0 - beta * w
    return tau.clamp(min=tau_min)
