"""The divergences and the sparse (top-k) teachers of issue LLM-scale distillation, on every
backend, against the float64 oracle: random problems, -inf teacher logits, ignored rows, all
reductions, corrections, temperatures, bf16."""
import os

import pytest
import torch
from helpers import BACKEND_IDS, BACKENDS, INTERPRETED, make_inputs, run, tolerances
from hypothesis import given, settings
from hypothesis import strategies as st

import kdkernels
import kdkernels.reference as R
from kdkernels import DynamicTemperature, SparseTeacher
from kdkernels.ops import triton_distill

DIVERGENCES = ["kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tv"]


@pytest.fixture(autouse=True)
def small_triton_blocks(monkeypatch):
    """Under the interpreter, 16-class blocks reach the multi-block path (online softmax, a
    sparse teacher's classes spread over blocks) at small C."""
    if INTERPRETED:
        monkeypatch.setattr(triton_distill, "MAX_BLOCK", 16)
CORRECTIONS = [None, "swap", "smooth", "rectify"]


def _oracle(s, t, y, upstream, reduction="none", temperature=4.0, **kw):
    s64 = s.detach().double().cpu().requires_grad_()
    if isinstance(t, SparseTeacher):
        t64 = SparseTeacher(t.indices.cpu(), t.values.detach().double().cpu(), t.tail)
        dense_for_dtd = R.densify(t64.indices, t64.values, s.shape[-1])
    else:
        t64 = t.detach().double().cpu()
        dense_for_dtd = t64
    if isinstance(temperature, DynamicTemperature):
        d = temperature
        valid = y.cpu() != kw.get("ignore_index", -100)
        temperature = R.dtd_temperature(s64, dense_for_dtd, d.tau0, d.beta, d.weighting, d.center,
                                        d.tau_min, valid=valid)
    elif isinstance(temperature, torch.Tensor):
        temperature = temperature.double().cpu()
    loss, stats = R.distillation_loss(s64, t64, y.cpu(), temperature, reduction=reduction, **kw)
    (grad,) = torch.autograd.grad(loss, s64, upstream.double().cpu())
    return loss.detach(), grad, stats


def _check(backend, s, t, y, reduction="none", **kw):
    loss, grad, stats, upstream = run(backend, s, t, y, reduction=reduction, **kw)
    ref_loss, ref_grad, ref_stats = _oracle(s, t, y, upstream, reduction=reduction, **kw)
    dtype = torch.float32 if backend == "triton" and s.dtype == torch.float64 else s.dtype
    rtol, atol = tolerances(dtype)
    loss_scale = 1 + ref_loss.abs().max().item()
    grad_scale = 1 + ref_grad.abs().max().item()
    torch.testing.assert_close(loss.double().cpu(), ref_loss, rtol=rtol, atol=atol * loss_scale)
    torch.testing.assert_close(grad.double().cpu(), ref_grad, rtol=rtol, atol=atol * grad_scale)
    torch.testing.assert_close(stats.temperature.double().cpu(), ref_stats["temperature"],
                               rtol=1e-5, atol=1e-6)
    assert torch.equal(stats.teacher_correct.cpu(), ref_stats["teacher_correct"])
    assert torch.equal(stats.still_wrong.cpu(), ref_stats["still_wrong"])
    return loss, grad


def _sparse(t, k, seed, tail, unused=0):
    """The top-k of a dense teacher: logits, or (tail) log-probabilities at T=1."""
    g = torch.Generator().manual_seed(seed)
    values, indices = t.double().topk(k, -1)
    order = torch.rand(indices.shape, generator=g).argsort(-1)  # any order within a row
    indices, values = indices.gather(1, order), values.gather(1, order)
    if tail:
        values = values - torch.logsumexp(t.double(), -1, keepdim=True)
    if unused:
        indices[:, -unused:] = -1
    return SparseTeacher(indices.to(t.device), values.to(t.dtype).to(t.device), tail)


def _shape(backend, device):
    return (5, 40) if (backend, device) in INTERPRETED else (7, 300)


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("correction", CORRECTIONS)
def test_divergences_dense(backend, device, divergence, correction):
    N, C = _shape(backend, device)
    s, t, y = make_inputs(N, C, seed=21, device=device, ignored=(1,))
    _check(backend, s, t, y, divergence=divergence, correction=correction, jsd_beta=0.3,
           skew_alpha=0.2, temperature=2.0, wrong_kd_weight=0.4, ce_weight=0.2)


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_jsd_ends_are_the_two_kls(backend, device, beta):
    """TRL's convention: beta 0 is KL(q || p), beta 1 is KL(p || q)."""
    s, t, y = make_inputs(4, 30, seed=22, device=device)
    jsd = kdkernels.distillation_loss(s, t, y, divergence="jsd", jsd_beta=beta, backend=backend,
                                      reduction="none")
    kl = kdkernels.distillation_loss(s, t, y, divergence="kl" if beta == 0 else "reverse_kl",
                                     backend=backend, reduction="none")
    torch.testing.assert_close(jsd, kl)


def _trl_generalized_jsd(student_logits, teacher_logits, labels, beta, temperature):
    """TRL's generalized_jsd_loss as its documentation and code define it, restated here: the
    mixture's log-probabilities log(beta q + (1 - beta) p) by logsumexp, then
    beta KL(q || m) + (1 - beta) KL(p || m) with F.kl_div (target second); beta 0 and 1 the two
    KLs; summed over the vocabulary and averaged over the tokens whose label is not -100."""
    log_p = torch.log_softmax(student_logits / temperature, -1)
    log_q = torch.log_softmax(teacher_logits / temperature, -1)
    kl = torch.nn.functional.kl_div
    if beta == 0:
        per_class = kl(log_p, log_q, reduction="none", log_target=True)
    elif beta == 1:
        per_class = kl(log_q, log_p, reduction="none", log_target=True)
    else:
        b = torch.tensor(beta, dtype=log_p.dtype)
        log_m = torch.logsumexp(torch.stack([log_p + torch.log(1 - b), log_q + torch.log(b)]), 0)
        per_class = (b * kl(log_m, log_q, reduction="none", log_target=True)
                     + (1 - b) * kl(log_m, log_p, reduction="none", log_target=True))
    mask = labels != -100
    return per_class[mask].sum() / mask.sum()


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_jsd_matches_trls_generalized_jsd(backend, device, beta):
    s, t, y = make_inputs(6, 50, seed=29, dtype=torch.float64, device=device, ignored=(2,))
    ours = kdkernels.distillation_loss(s, t, y, divergence="jsd", jsd_beta=beta, temperature=2.0,
                                       kd_weight=1.0, ce_weight=0.0, t2_scale=False,
                                       backend=backend)
    trl = _trl_generalized_jsd(s.cpu(), t.cpu(), y.cpu(), beta, 2.0)
    tol = 1e-5 if backend == "triton" else 1e-10
    torch.testing.assert_close(ours.cpu(), trl, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("skew", ["skew_kl", "skew_reverse_kl"])
def test_skew_at_zero_is_the_plain_kl(backend, device, skew):
    """alpha = 0: KL(q || p) and KL(p || q); alpha = 1 compares a distribution with itself."""
    s, t, y = make_inputs(4, 30, seed=28, device=device)
    kw = dict(backend=backend, reduction="none", ce_weight=0.0)
    at_zero = kdkernels.distillation_loss(s, t, y, divergence=skew, skew_alpha=0.0, **kw)
    plain = kdkernels.distillation_loss(s, t, y, divergence=skew.replace("skew_", ""), **kw)
    torch.testing.assert_close(at_zero, plain, rtol=1e-5, atol=1e-6)
    at_one = kdkernels.distillation_loss(s, t, y, divergence=skew, skew_alpha=1.0, **kw)
    torch.testing.assert_close(at_one, torch.zeros_like(at_one), rtol=0, atol=2e-5)  # T^2 eps


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("tail", [False, True])
@pytest.mark.parametrize("correction", [None, "swap", "rectify"])
def test_sparse_teacher(backend, device, divergence, tail, correction):
    N, C = _shape(backend, device)
    s, t, y = make_inputs(N, C, seed=23, device=device, ignored=(2,))
    if not (divergence == "reverse_kl" and correction == "swap"):
        # a label outside the teacher's top-k (swap would leave the argmax no target mass:
        # an infinite reverse KL, tested below)
        y[0] = t[0].argmin()
    teacher = _sparse(t, 8, seed=23, tail=tail, unused=2)
    if divergence == "reverse_kl" and correction == "swap":  # labels among the top-k
        y = torch.where(y == -100, y, teacher.indices[:, 1])
    if divergence == "reverse_kl" and not tail:
        teacher = _sparse(t, 8, seed=23, tail=tail)  # p > 0 outside the k classes: KL(p||q) = inf
        loss = kdkernels.distillation_loss(s, teacher, y, divergence=divergence, backend=backend,
                                           reduction="none")
        assert torch.isinf(loss[y != -100]).all()
        return
    _check(backend, s, teacher, y, divergence=divergence, correction=correction, jsd_beta=0.3,
           skew_alpha=0.2, temperature=2.0, wrong_kd_weight=0.4, ce_weight=0.2)


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
def test_sparse_teacher_without_tail_is_the_dense_masked_teacher(backend, device):
    N, C = _shape(backend, device)
    s, t, y = make_inputs(N, C, seed=24, device=device)
    teacher = _sparse(t, 6, seed=24, tail=False, unused=1)
    dense = R.densify(teacher.indices.cpu(), teacher.values.cpu(), C).to(device)
    for correction in CORRECTIONS:
        kw = dict(correction=correction, temperature="cosine")
        sparse_loss, sparse_grad, _, _ = run(backend, s, teacher, y, **kw)
        dense_loss, dense_grad, _, _ = run(backend, s, dense, y, **kw)
        torch.testing.assert_close(sparse_loss, dense_loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sparse_grad, dense_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("temperature", ["max_prob", "cosine", "rows"])
def test_sparse_teacher_temperatures_and_smooth(backend, device, temperature):
    N, C = _shape(backend, device)
    s, t, y = make_inputs(N, C, seed=25, device=device, ignored=(0,))
    if temperature == "rows":
        temperature = (torch.rand(N, generator=torch.Generator().manual_seed(3)) + 0.5).to(device)
    else:
        temperature = DynamicTemperature(weighting=temperature, tau0=3.0, beta=0.5)
    for tail in (False, True):
        _check(backend, s, _sparse(t, 5, seed=25, tail=tail), y, temperature=temperature,
               correction="smooth", wrong_kd_weight=0.5)


@st.composite
def problems(draw, small):
    C = draw(st.sampled_from([2, 7, 33]) if small else st.sampled_from([2, 7, 100, 1000, 4097]))
    N = draw(st.integers(1, 5 if small else 12))
    return dict(N=N, C=C, seed=draw(st.integers(0, 2 ** 31 - 1)),
                masked=draw(st.booleans()),
                ignored=draw(st.lists(st.integers(0, N - 1), max_size=2)),
                sparse=draw(st.sampled_from([None, "plain", "tail"])),
                k=draw(st.integers(1, 6)),
                divergence=draw(st.sampled_from(DIVERGENCES)),
                correction=draw(st.sampled_from(CORRECTIONS)),
                beta=draw(st.floats(0.05, 0.95)), alpha=draw(st.floats(0.05, 0.9)),
                T=draw(st.sampled_from([0.5, 1.0, 3.0])),
                reduction=draw(st.sampled_from(["mean", "sum", "none"])),
                dtype=draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16])))


def _problem(backend, device, p):
    s, t, y = make_inputs(p["N"], p["C"], p["seed"], dtype=p["dtype"], device=device,
                          masked=p["masked"] and p["sparse"] is None, ignored=p["ignored"])
    teacher = t
    if p["sparse"]:
        teacher = _sparse(t, min(p["k"], p["C"]), p["seed"], tail=p["sparse"] == "tail")
        # infinite reverse KLs: no mass outside the k classes, on an argmax a swap emptied, or
        # (log-probs rounded to bf16) a tail left no mass
        if p["divergence"] == "reverse_kl" and (p["sparse"] == "plain" or p["correction"] == "swap"
                                                or p["dtype"] == torch.bfloat16):
            return
        if p["correction"] == "smooth" and p["divergence"] != "kl":
            return  # refused: tested on its own
    if p["divergence"] == "reverse_kl" and p["masked"]:
        return  # infinite where the teacher masks a class the student does not
    _check(backend, s, teacher, y, divergence=p["divergence"], correction=p["correction"],
           jsd_beta=p["beta"], skew_alpha=p["alpha"], temperature=p["T"],
           reduction=p["reduction"], wrong_kd_weight=0.5, ce_weight=0.1)


COMPILED = [(b, d) for b, d in BACKENDS if (b, d) not in INTERPRETED]


@pytest.mark.parametrize("backend,device", COMPILED, ids=[f"{b}-{d}" for b, d in COMPILED])
@settings(max_examples=int(os.environ.get("KDK_EXAMPLES", 50)))
@given(p=problems(small=False))
def test_random_problems(backend, device, p):
    _problem(backend, device, p)


@pytest.mark.parametrize("backend,device", INTERPRETED, ids=[f"{b}-{d}" for b, d in INTERPRETED])
@settings(max_examples=int(os.environ.get("KDK_EXAMPLES_INTERPRETED", 10)))
@given(p=problems(small=True))
def test_random_problems_interpreted(backend, device, p):
    _problem(backend, device, p)


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
def test_reverse_kl_is_infinite_where_the_target_has_no_mass(backend, device):
    """KL(p || r) = inf where r_j = 0 < p_j: a masked teacher class, or the argmax a swap
    emptied because the label was outside the sparse teacher's top-k."""
    N, C = _shape(backend, device)
    s, t, y = make_inputs(N, C, seed=27, device=device)
    teacher = _sparse(t, 4, seed=27, tail=True)
    y = teacher.indices[:, 1].clone()  # labels among the top-k: finite
    y[0] = t[0].argmin()  # outside
    loss = kdkernels.distillation_loss(s, teacher, y, divergence="reverse_kl", correction="swap",
                                       backend=backend, reduction="none")
    assert torch.isinf(loss[0]) and torch.isfinite(loss[1:]).all()
    masked = t.clone()
    masked[:, 1] = float("-inf")
    loss = kdkernels.distillation_loss(s, masked, y, divergence="reverse_kl", backend=backend,
                                       reduction="none")
    assert torch.isinf(loss).all()


def test_bad_sparse_teachers_are_refused():
    s, t, y = make_inputs(3, 10, seed=26)
    idx = torch.tensor([[0, 1], [2, 3], [4, 5]])
    vals = torch.zeros(3, 2)
    cases = [
        (SparseTeacher(idx.float(), vals), TypeError, "indices must be an integer"),
        (SparseTeacher(idx, vals.long()), TypeError, "values must be a floating"),
        (SparseTeacher(idx[:2], vals[:2]), ValueError, "indices must have shape"),
        (SparseTeacher(idx, vals[:, :1]), ValueError, "does not match its indices"),
        (SparseTeacher(idx + 9, vals), ValueError, "classes >= 10"),
        (SparseTeacher(torch.tensor([[1, 1], [2, 3], [4, 5]]), vals), ValueError, "repeats"),
        (SparseTeacher(idx, vals + 1.0, tail=True), ValueError, "log-probabilities"),
    ]
    for teacher, error, message in cases:
        with pytest.raises(error, match=message):
            kdkernels.distillation_loss(s, teacher, y)
    with pytest.raises(ValueError, match="smooth.*divergence='kl' only"):
        kdkernels.distillation_loss(s, SparseTeacher(idx, vals), y, correction="smooth",
                                    divergence="tv")
    with pytest.raises(ValueError, match="divergence must be one of"):
        kdkernels.distillation_loss(s, t, y, divergence="hellinger")
    with pytest.raises(ValueError, match="jsd_beta"):
        kdkernels.distillation_loss(s, t, y, divergence="jsd", jsd_beta=1.5)
