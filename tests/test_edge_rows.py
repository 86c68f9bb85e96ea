"""Edge rows of a sparse (top-k) teacher on every backend, against the float64 oracle: rows
whose every slot is unused or -inf have no teacher (no KD term, no KD gradient), with or
without a tail (docs/METHODS.md, "Sparse (top-k) teachers")."""
import pytest
import torch
from helpers import BACKEND_IDS, BACKENDS, oracle, run, tolerances

from kdkernels import SparseTeacher

DIVERGENCES = ["kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tv"]
INF = float("inf")


def _teacher_without_rows(tail, dtype):
    """Six rows: 0 every slot unused, 1 every used value -inf, 2 unused and -inf slots mixed,
    3-5 ordinary rows (two used slots, one unused)."""
    g = torch.Generator().manual_seed(7)
    N, C = 6, 11
    s = (torch.randn(N, C, generator=g, dtype=torch.float64) * 2).to(dtype)
    y = torch.randint(0, C, (N,), generator=g)
    indices = torch.tensor([[-1, -1, -1], [2, 5, 7], [-1, 4, -1],
                            [1, 3, -1], [0, 9, -1], [10, 6, -1]])
    values = torch.tensor([[0.0, 0.0, 0.0], [-INF, -INF, -INF], [0.0, -INF, 0.0],
                           [-0.5, -1.5, 0.0], [-1.0, -2.0, 0.0], [-0.3, -2.5, 0.0]],
                          dtype=torch.float64)
    if not tail:
        values = values + 1.0  # logits: any finite values
    return s, SparseTeacher(indices, values.to(dtype), tail), y


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("tail", [False, True], ids=["no-tail", "tail"])
@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
def test_rows_without_a_teacher_have_no_kd_term(backend, device, tail, divergence, dtype):
    s, teacher, y = _teacher_without_rows(tail, dtype)
    teacher = SparseTeacher(teacher.indices.to(device), teacher.values.to(device), tail)
    s, y = s.to(device), y.to(device)
    loss, grad, _, upstream = run(backend, s, teacher, y, divergence=divergence, ce_weight=0.5)
    ref_loss, ref_grad, _ = oracle(s, teacher, y, upstream, divergence=divergence,
                                   ce_weight=0.5)
    # the rows without a teacher: the CE term alone, and its gradient
    ce = torch.nn.functional.cross_entropy(s[:3].double().cpu(), y[:3].cpu(), reduction="none")
    torch.testing.assert_close(ref_loss[:3], 0.5 * ce)
    # (the reverse KL of a teacher without a tail is infinite on the ordinary rows)
    rows = slice(0, 3) if divergence == "reverse_kl" and not tail else slice(None)
    assert torch.isfinite(grad[rows]).all(), grad
    rtol, atol = tolerances(torch.float32 if backend == "triton" else dtype)
    loss, grad, ref_loss, ref_grad = loss[rows], grad[rows], ref_loss[rows], ref_grad[rows]
    torch.testing.assert_close(loss.double().cpu(), ref_loss, rtol=rtol,
                               atol=atol * (1 + ref_loss.abs().max().item()))
    torch.testing.assert_close(grad.double().cpu(), ref_grad, rtol=rtol,
                               atol=atol * (1 + ref_grad.abs().max().item()))
