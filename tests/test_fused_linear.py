"""Fused linear distillation (hidden states and an lm_head, in chunks of rows) against the unfused
float64 oracle, on every backend: every kind of teacher, reductions, corrections, divergences,
random problems, gradcheck, chunking, bad input."""
import os

import pytest
import torch
from helpers import BACKEND_IDS, BACKENDS, INTERPRETED, tolerances
from hypothesis import given, settings
from hypothesis import strategies as st

import kdkernels
import kdkernels.reference as R
from kdkernels import SparseTeacher
from kdkernels.ops import torch_distill

TEACHERS = ["hidden", "logits", "sparse", "sparse_tail", "virtual"]
COMPILED = [(b, d) for b, d in BACKENDS if (b, d) not in INTERPRETED]


def _problem(N, H, V, seed, teacher_kind, dtype=torch.float32, device="cpu", bias=True, k=5,
             ignored=(1,)):
    """(student args, teacher kwargs, labels): the student's hidden states, weight and bias
    (leaves), and the teacher in the form `teacher_kind`."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g, dtype=torch.float64)
    W = torch.randn(V, H, generator=g, dtype=torch.float64) / H ** 0.5 * 2
    b = torch.randn(V, generator=g, dtype=torch.float64) * 0.5 if bias else None
    y = torch.randint(0, V, (N,), generator=g)
    for i in ignored:
        if i < N:
            y[i] = -100
    ht = torch.randn(N, 6, generator=g, dtype=torch.float64)
    Wt = torch.randn(V, 6, generator=g, dtype=torch.float64)
    teacher = {}
    if teacher_kind == "hidden":
        teacher = dict(teacher=ht, teacher_weight=Wt, teacher_bias=torch.randn(V, generator=g,
                                                                               dtype=torch.float64))
    elif teacher_kind == "logits":
        teacher = dict(teacher=ht @ Wt.t())
    elif teacher_kind.startswith("sparse"):
        tail = teacher_kind == "sparse_tail"
        logits = ht @ Wt.t()
        values, indices = logits.topk(min(k, V), -1)
        if tail:
            values = values - torch.logsumexp(logits, -1, keepdim=True)
        teacher = dict(teacher=SparseTeacher(indices, values, tail))
    else:
        teacher = dict(virtual_teacher=0.9)

    def cast(x):
        return None if x is None else x.to(dtype=dtype, device=device)
    student = [cast(x) for x in (h, W, b)]
    for x in student:
        if x is not None:
            x.requires_grad_()
    for name, x in list(teacher.items()):
        if isinstance(x, torch.Tensor):
            teacher[name] = cast(x)
        elif isinstance(x, SparseTeacher):
            teacher[name] = SparseTeacher(x.indices.to(device), cast(x.values), x.tail)
    return student, teacher, y.to(device)


def _fused(student, teacher, y, **kw):
    h, W, b = student
    return kdkernels.fused_linear_distillation_loss(h, W, target=y, student_bias=b, **teacher,
                                                    **kw)


def _capped(logits, cap):
    return logits if cap is None else cap * torch.tanh(logits / cap)


def _oracle(student, teacher, y, upstream, reduction, logit_softcap=None,
            teacher_logit_softcap=None, **kw):
    """The unfused loss in float64: logits = h W^T + b (soft-capped: cap tanh(logits / cap)),
    then the reference primitive."""
    leaves = [None if x is None else x.detach().double().cpu().requires_grad_() for x in student]
    h, W, b = leaves
    logits = _capped(h @ W.t() + (b if b is not None else 0), logit_softcap)
    t = teacher.get("teacher")
    if "teacher_weight" in teacher:
        t = t.detach().double().cpu() @ teacher["teacher_weight"].double().cpu().t()
        t = _capped(t + teacher["teacher_bias"].double().cpu(), teacher_logit_softcap)
    elif isinstance(t, SparseTeacher):
        t = SparseTeacher(t.indices.cpu(), t.values.detach().double().cpu(), t.tail)
    elif t is not None:
        t = t.detach().double().cpu()
    temperature = kw.pop("temperature", 4.0)
    if isinstance(temperature, torch.Tensor):
        temperature = temperature.double().cpu()
    loss, stats = R.distillation_loss(logits, t, y.cpu(), temperature, reduction=reduction,
                                      virtual_teacher=teacher.get("virtual_teacher"), **kw)
    wanted = [x for x in leaves if x is not None]
    grads = torch.autograd.grad(loss, wanted, upstream.double().cpu())
    return loss.detach(), grads, stats


def _check(backend, student, teacher, y, reduction="mean", dtype=torch.float32, **kw):
    loss, stats = _fused(student, teacher, y, reduction=reduction, backend=backend,
                         return_stats=True, **kw)
    upstream = (torch.rand(loss.shape, generator=torch.Generator().manual_seed(2),
                           dtype=loss.dtype) + 0.5).to(loss.device)
    leaves = [x for x in student if x is not None]
    grads = torch.autograd.grad(loss, leaves, upstream)
    kw.pop("chunk_size", None)
    kw.pop("memory_budget", None)
    ref_loss, ref_grads, ref_stats = _oracle(student, teacher, y, upstream, reduction, **kw)
    rtol, atol = tolerances(torch.float32 if backend == "triton" and dtype == torch.float64
                            else dtype)
    if dtype in (torch.bfloat16, torch.float16):  # the logits themselves are rounded
        rtol, atol = rtol * 2, atol * 10
    torch.testing.assert_close(loss.double().cpu(), ref_loss, rtol=rtol,
                               atol=atol * _scale(ref_loss))
    rows = student[0].reshape(-1, student[0].shape[-1]).shape[0]
    for k, (grad, ref) in enumerate(zip(grads, ref_grads)):
        assert grad.dtype == dtype
        # the weight's and the bias's gradients sum a rounded 16-bit gradient row per row:
        # those roundings add up as a random walk over the rows
        walk = rows ** 0.5 if k > 0 and dtype in (torch.bfloat16, torch.float16) else 1.0
        torch.testing.assert_close(grad.double().cpu(), ref, rtol=rtol,
                                   atol=atol * walk * _scale(ref))
    if y is not None and y.numel():
        assert torch.equal(stats.teacher_correct.cpu(), ref_stats["teacher_correct"])
    return loss


def _scale(x):
    return 1 + (x.abs().max().item() if x.numel() else 0)


def _size(backend, device):
    return (7, 5, 20) if (backend, device) in INTERPRETED else (10, 8, 60)


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("teacher_kind", TEACHERS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_the_unfused_oracle(backend, device, teacher_kind, reduction):
    N, H, V = _size(backend, device)
    student, teacher, y = _problem(N, H, V, seed=31, teacher_kind=teacher_kind, device=device)
    options = {"hidden": dict(correction="swap", divergence="jsd", jsd_beta=0.3),
               "logits": dict(correction="rectify", wrong_kd_weight=0.3),
               "sparse": dict(correction="swap", divergence="skew_kl", skew_alpha=0.2),
               "sparse_tail": dict(correction="rectify", divergence="tv"),
               "virtual": dict(temperature=2.0)}[teacher_kind]
    _check(backend, student, teacher, y, reduction=reduction, chunk_size=3, **options)


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_dtypes(backend, device, dtype):
    N, H, V = _size(backend, device)
    student, teacher, y = _problem(N, H, V, seed=32, teacher_kind="hidden", dtype=dtype,
                                   device=device)
    _check(backend, student, teacher, y, dtype=dtype, chunk_size=4, correction="smooth")


@pytest.mark.parametrize("backend,device", COMPILED, ids=[f"{b}-{d}" for b, d in COMPILED])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck(backend, device, reduction):
    student, teacher, y = _problem(5, 3, 9, seed=33, teacher_kind="hidden", dtype=torch.float64)

    def fn(h, W, b):
        return _fused((h, W, b), teacher, y, backend=backend, reduction=reduction, chunk_size=2,
                      correction="rectify", temperature=2.0)
    assert torch.autograd.gradcheck(fn, tuple(student))


@st.composite
def problems(draw, small):
    V = draw(st.sampled_from([1, 2, 7, 33] if small else [1, 2, 7, 100, 1000]))
    N = draw(st.integers(0, 6 if small else 20))
    return dict(N=N, H=draw(st.integers(1, 9)), V=V, seed=draw(st.integers(0, 2 ** 31 - 1)),
                teacher=draw(st.sampled_from(TEACHERS)), k=draw(st.integers(1, 6)),
                chunk=draw(st.integers(1, N + 2)), bias=draw(st.booleans()),
                divergence=draw(st.sampled_from(["kl", "jsd", "skew_reverse_kl", "tv"])),
                correction=draw(st.sampled_from([None, "swap", "rectify"])),
                reduction=draw(st.sampled_from(["mean", "sum", "none"])),
                dtype=draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16])),
                ignored=draw(st.lists(st.integers(0, max(N - 1, 0)), max_size=2)))


def _random(backend, device, p):
    if p["divergence"] == "tv" and p["dtype"] == torch.bfloat16:
        p = dict(p, divergence="kl")  # logits rounded to bf16 flip TV's sign(p - r) near p = r
    if p["dtype"] == torch.bfloat16:
        # the teacher's bf16 logits (F.linear rounds them) and the oracle's exact ones can put
        # the arg-max on different classes when the top two are within a rounding (found by
        # hypothesis: seed 181916, V = 1000, swap): a correction then moves other values.
        # Corrections in bf16 are tested on fixed inputs (test_dtypes)
        p = dict(p, correction=None)
    student, teacher, y = _problem(p["N"], p["H"], p["V"], p["seed"], p["teacher"], p["dtype"],
                                   device, p["bias"], p["k"], p["ignored"])
    _check(backend, student, teacher, y, reduction=p["reduction"], dtype=p["dtype"],
           chunk_size=p["chunk"], divergence=p["divergence"], correction=p["correction"])


@pytest.mark.parametrize("backend,device", COMPILED, ids=[f"{b}-{d}" for b, d in COMPILED])
@settings(max_examples=int(os.environ.get("KDK_EXAMPLES", 40)))
@given(p=problems(small=False))
def test_random_problems(backend, device, p):
    _random(backend, device, p)


@pytest.mark.parametrize("backend,device", INTERPRETED, ids=[f"{b}-{d}" for b, d in INTERPRETED])
@settings(max_examples=int(os.environ.get("KDK_EXAMPLES_INTERPRETED", 6)))
@given(p=problems(small=True))
def test_random_problems_interpreted(backend, device, p):
    _random(backend, device, p)


def test_one_chunk_of_logits_at_a_time(monkeypatch):
    """The kernel sees chunk_size rows at most; by default the memory budget sets the rows."""
    seen = []
    forward = torch_distill.forward

    def spy(student, *args, **kwargs):
        seen.append(tuple(student.shape))
        return forward(student, *args, **kwargs)
    monkeypatch.setattr(torch_distill, "forward", spy)
    student, teacher, y = _problem(23, 4, 50, seed=34, teacher_kind="hidden")
    _fused(student, teacher, y, backend="torch", chunk_size=5).backward()
    assert seen == [(5, 50)] * 4 + [(3, 50)]
    seen.clear()
    row_bytes = 50 * 4 * 3  # fp32 logits, their gradient, the teacher's logits
    _fused(student, teacher, y, backend="torch", memory_budget=7 * row_bytes)
    assert seen == [(7, 50)] * 3 + [(2, 50)]


KERNEL_LAUNCHES = [(b, d, two) for b, d in BACKENDS if b != "torch"
                   for two in ((False, True) if b == "triton" else (False,))]


@pytest.mark.parametrize("teacher_kind", ["hidden", "sparse_tail", "virtual"])
@pytest.mark.parametrize("backend,device,two_kernels", KERNEL_LAUNCHES,
                         ids=[f"{b}-{d}" + ("-two-kernels" if two else "")
                              for b, d, two in KERNEL_LAUNCHES])
def test_the_kernels_write_the_chunk_gradient_over_its_logits(monkeypatch, backend, device,
                                                              teacher_kind, two_kernels):
    """One [rows, V] buffer per chunk, not two: the gradient the kernel returns is the chunk's
    logits' storage, so a memory budget holds twice the rows it holds on the torch backend
    (which keeps two); the gradients are the torch backend's. Triton: its small-rows kernel
    and (two_kernels) its forward and gradient kernels."""
    if two_kernels:
        from kdkernels.ops import triton_distill
        monkeypatch.setattr(triton_distill, "SMALL_ROWS_MAX", 0)
    module = kdkernels.ops.resolve(backend, torch.device(device))
    forward, seen = module.forward, []

    def spy(student, *args, **kwargs):
        result = forward(student, *args, **kwargs)
        seen.append((tuple(student.shape), result[1].data_ptr() == student.data_ptr()))
        return result
    monkeypatch.setattr(module, "forward", spy)
    student, teacher, y = _problem(23, 4, 50, seed=36, teacher_kind=teacher_kind, device=device)
    teacher_bytes = 50 * 4 if teacher_kind == "hidden" else 0
    budget = 7 * (50 * 4 + teacher_bytes)  # 7 rows of fp32 logits (and teacher logits)
    loss = _fused(student, teacher, y, backend=backend, memory_budget=budget)
    assert seen == [((7, 50), True)] * 3 + [((2, 50), True)]
    want = _fused(student, teacher, y, backend="torch", chunk_size=7) if device == "cpu" else None
    if want is not None:
        torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
        for got, ref in zip(torch.autograd.grad(loss, student), torch.autograd.grad(want, student)):
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_backward_only_scales_for_mean_and_sum_and_may_repeat():
    student, teacher, y = _problem(9, 4, 30, seed=35, teacher_kind="logits", dtype=torch.float64)
    loss = _fused(student, teacher, y, backend="torch", chunk_size=4)
    first = torch.autograd.grad(loss, student, retain_graph=True)
    again = torch.autograd.grad(loss * 3, student, retain_graph=True)
    for a, b in zip(first, again):
        torch.testing.assert_close(3 * a, b)
    loss_sum = _fused(student, teacher, y, backend="torch", reduction="sum", chunk_size=4)
    count = (y != -100).sum()
    for a, b in zip(first, torch.autograd.grad(loss_sum, student)):
        torch.testing.assert_close(a * count, b)


def test_no_grad_empty_batch_stats_and_module():
    student, teacher, y = _problem(8, 4, 30, seed=36, teacher_kind="sparse_tail")
    with torch.no_grad():
        evaluated = _fused(student, teacher, y, backend="torch")
    assert not evaluated.requires_grad
    loss, stats = _fused(student, teacher, y, backend="torch", return_stats=True,
                         temperature=torch.full((8,), 3.0))
    torch.testing.assert_close(loss.detach(), evaluated.detach() * 0 + loss.detach())
    assert stats.temperature.shape == (8,) and (stats.temperature == 3.0).all()
    module = kdkernels.FusedLinearDistillationLoss(temperature=4.0, chunk_size=3,
                                                   backend="torch")
    h, W, b = student
    torch.testing.assert_close(module(h, W, teacher["teacher"], y, student_bias=b), evaluated)
    empty, _, y0 = _problem(0, 4, 30, seed=37, teacher_kind="logits", ignored=())
    for reduction in ("mean", "none"):
        out = kdkernels.fused_linear_distillation_loss(
            empty[0], empty[1], torch.zeros(0, 30), y0, reduction=reduction)
        out.sum().backward()
        assert out.shape == ((0,) if reduction == "none" else ()) and empty[1].grad.abs().sum() == 0


def test_strided_hidden_states_and_leading_dimensions():
    student, teacher, y = _problem(12, 4, 30, seed=38, teacher_kind="logits")
    h, W, b = student
    wide = torch.randn(3, 4, 9)[:, :, 2:6]  # [3, 4, 4] non-contiguous rows
    wide.requires_grad_()
    t3 = teacher["teacher"].reshape(3, 4, 30)
    loss = kdkernels.fused_linear_distillation_loss(wide, W, t3, y.reshape(3, 4),
                                                    student_bias=b, chunk_size=5,
                                                    reduction="none")
    assert loss.shape == (3, 4)
    loss.sum().backward()
    flat = wide.detach().reshape(12, 4).clone().requires_grad_()
    ref = R.distillation_loss(flat.double() @ W.detach().double().t() + b.detach().double(),
                              t3.reshape(12, 30).double(), y, 4.0, reduction="none")[0]
    ref.sum().backward()
    torch.testing.assert_close(wide.grad.reshape(12, 4), flat.grad.float(), rtol=1e-4, atol=1e-5)


def test_bad_input_is_refused_with_the_argument_named():
    student, teacher, y = _problem(4, 3, 10, seed=39, teacher_kind="hidden")
    h, W, b = student
    ht, Wt = teacher["teacher"], teacher["teacher_weight"]
    F = kdkernels.fused_linear_distillation_loss
    cases = [
        (dict(student_hidden=h, student_weight=W[:, :2], teacher=ht, teacher_weight=Wt),
         "weight \\[V, H\\]"),
        (dict(student_hidden=h, student_weight=W.double(), teacher=ht, teacher_weight=Wt),
         "student_weight is torch.float64"),
        (dict(student_hidden=h, student_weight=W, student_bias=b[:3], teacher=ht,
              teacher_weight=Wt), "student_bias must be \\[10\\]"),
        (dict(student_hidden=h, student_weight=W, teacher=ht, teacher_weight=Wt[:5]),
         "teacher_weight has 5 classes, fewer than the 10"),
        (dict(student_hidden=h, student_weight=W, teacher=ht[:2], teacher_weight=Wt),
         "do not give logits"),
        (dict(student_hidden=h, student_weight=W, teacher=ht, teacher_bias=b), "teacher_bias"),
        (dict(student_hidden=h, student_weight=W, teacher=torch.zeros(4, 11)),
         "teacher has 11 classes but student_weight has 10"),
        (dict(student_hidden=h, student_weight=W, teacher=torch.zeros(3, 10)), "does not match"),
        (dict(student_hidden=h, student_weight=W, teacher=ht, teacher_weight=Wt,
              temperature=kdkernels.DynamicTemperature(center=True)), "center=True"),
        (dict(student_hidden=h, student_weight=W, teacher=ht, teacher_weight=Wt, chunk_size=0),
         "chunk_size"),
        (dict(student_hidden=h, student_weight=W, teacher=ht, teacher_weight=Wt,
              chunk_size=2, memory_budget=10), "not both"),
        (dict(student_hidden=h, student_weight=W, teacher=ht, teacher_weight=Wt,
              virtual_teacher=0.9), "not both"),
        (dict(student_hidden=h, student_weight=W, teacher=ht, teacher_weight=Wt,
              target=y[:2]), "target must have shape"),
    ]
    for kwargs, message in cases:
        kwargs.setdefault("target", y)
        with pytest.raises((TypeError, ValueError), match=message):
            F(**kwargs)
    with pytest.raises(ValueError, match="chunk_size"):
        kdkernels.FusedLinearDistillationLoss(chunk_size=-1)


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("chunk_size", [1, 3, 64])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_soft_capped_logits_match_the_oracle(backend, device, chunk_size, reduction):
    """Gemma 2's final logit soft-cap, each model its own: the full-logits oracle on
    cap * tanh(h W^T / cap) in float64; loss and the gradients of h, W and the bias."""
    N, H, V = _size(backend, device)
    student, teacher, y = _problem(N, H, V, seed=42, teacher_kind="hidden", dtype=torch.float64,
                                   device=device)
    caps = dict(logit_softcap=1.5, teacher_logit_softcap=2.5)  # small: the tanh bends them
    options = dict(divergence="jsd", jsd_beta=0.3, ce_weight=0.3, correction="swap")
    loss = _check(backend, student, teacher, y, reduction=reduction, dtype=torch.float64,
                  chunk_size=chunk_size, **caps, **options)
    for cap in caps:  # each cap changes the loss: neither is ignored
        other = _fused(student, teacher, y, reduction=reduction, backend=backend,
                       chunk_size=chunk_size, **dict(caps, **{cap: None}), **options)
        assert (other - loss).abs().max() > 1e-3, cap


@pytest.mark.parametrize("teacher_kind", ["logits", "sparse_tail", "virtual"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_soft_capped_student_with_every_teacher(teacher_kind, dtype):
    """The student's cap with a teacher given as logits (used as given), sparse or virtual; in
    16-bit the chunk's logits are rounded by the matmul, then capped in float32."""
    student, teacher, y = _problem(11, 6, 40, seed=43, teacher_kind=teacher_kind, dtype=dtype)
    _check("cpp" if kdkernels.backends()["cpp"].available else "torch", student, teacher, y,
           dtype=dtype, chunk_size=4, logit_softcap=2.0)


@pytest.mark.parametrize("backend,device", COMPILED, ids=[f"{b}-{d}" for b, d in COMPILED])
def test_soft_capped_gradcheck(backend, device):
    student, teacher, y = _problem(5, 3, 9, seed=44, teacher_kind="hidden", dtype=torch.float64)

    def fn(h, W, b):
        return _fused((h, W, b), teacher, y, backend=backend, reduction="none", chunk_size=2,
                      logit_softcap=0.8, teacher_logit_softcap=1.2, temperature=2.0)
    assert torch.autograd.gradcheck(fn, tuple(student))


def test_soft_caps_are_checked_with_the_argument_named():
    student, teacher, y = _problem(4, 3, 10, seed=45, teacher_kind="hidden")
    for name in ("logit_softcap", "teacher_logit_softcap"):
        for bad in (0, -30.0, float("inf"), float("nan"), True, "30"):
            with pytest.raises(ValueError, match=f"^{name} must be a finite number > 0"):
                _fused(student, teacher, y, **{name: bad})
            with pytest.raises(ValueError, match=f"^{name} must be"):
                kdkernels.FusedLinearDistillationLoss(**{name: bad})
    logits = dict(teacher=teacher["teacher"] @ teacher["teacher_weight"].t())
    with pytest.raises(ValueError, match="teacher_logit_softcap caps the teacher logits computed"):
        _fused(student, logits, y, teacher_logit_softcap=30.0)
    # the vocab-parallel fused form has no soft-cap: the keyword is refused by name
    h, W, _ = student
    with pytest.raises(TypeError, match="logit_softcap"):
        kdkernels.vocab_parallel_fused_linear_distillation_loss(
            h, W, logits["teacher"], y, vocab_start=0, vocab_size=10, logit_softcap=30.0)


def test_soft_capped_module_equals_the_function():
    student, teacher, y = _problem(9, 4, 30, seed=46, teacher_kind="hidden")
    h, W, b = student
    caps = dict(logit_softcap=3.0, teacher_logit_softcap=5.0)
    module = kdkernels.FusedLinearDistillationLoss(temperature=2.0, chunk_size=4, **caps)
    assert "logit_softcap=3.0" in repr(module)
    got = module(h, W, teacher["teacher"], y, student_bias=b,
                 teacher_weight=teacher["teacher_weight"], teacher_bias=teacher["teacher_bias"])
    want = _fused(student, teacher, y, temperature=2.0, chunk_size=4, **caps)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_chunk_logits_are_computed_as_f_linear_computes_them(monkeypatch, dtype):
    """The student's and the teacher's chunk logits, bias included, are F.linear's bit for bit
    (one rounding in 16-bit dtypes, not a matmul then `+= bias`)."""
    student, teacher, y = _problem(64, 48, 300, seed=5, teacher_kind="hidden", dtype=dtype)
    h, W, b = student
    module = kdkernels.ops.resolve("cpp", h.device)
    seen = []
    original = module.forward

    def spy(logits, teacher_logits, *args, **kwargs):
        seen.append((logits.clone(), teacher_logits.clone()))
        return original(logits, teacher_logits, *args, **kwargs)
    monkeypatch.setattr(module, "forward", spy)
    _fused(student, teacher, y, backend="cpp", chunk_size=24)
    assert len(seen) == 3
    F = torch.nn.functional
    for k, (logits, teacher_logits) in enumerate(seen):
        rows = slice(24 * k, 24 * (k + 1))
        assert torch.equal(logits, F.linear(h[rows].detach(), W.detach(), b.detach()))
        assert torch.equal(teacher_logits, F.linear(teacher["teacher"][rows],
                                                    teacher["teacher_weight"],
                                                    teacher["teacher_bias"]))


def test_vocab_parallel_chunk_logits_are_f_linear_s():
    from kdkernels._vocab_parallel import _LinearRows
    student, teacher, y = _problem(20, 48, 300, seed=6, teacher_kind="hidden",
                                   dtype=torch.bfloat16)
    h, W, b = (x.detach() for x in student)
    ht, Wt, bt = teacher["teacher"], teacher["teacher_weight"], teacher["teacher_bias"]
    rows = _LinearRows(h, W, b, ht, Wt, bt, y, 4.0, 0, 300, None, 8)
    F = torch.nn.functional
    assert torch.equal(rows.student_rows(8, 16), F.linear(h[8:16], W, b))
    assert torch.equal(rows.teacher_rows(8, 16), F.linear(ht[8:16], Wt, bt))


def test_bf16_weight_gradient_does_not_degrade_with_the_chunk_count():
    """The weight's gradient accumulates over the chunks in float32: its error against float64
    stays near the one-chunk error (accumulated in bf16 it was 1.5x at 8 chunks, 3.7x at 64).
    A "mean"'s 1 / count is taken by the float32 sum before its one rounding: its error is the
    sum's (scaling the rounded bf16 gradient by a bf16 1 / 501 made it 1.28-1.34x)."""
    g = torch.Generator().manual_seed(0)
    N, H, V = 512, 64, 1000
    h = torch.randn(N, H, generator=g, dtype=torch.float64).bfloat16()
    W = (torch.randn(V, H, generator=g, dtype=torch.float64) / H ** 0.5 * 2).bfloat16()
    t = torch.randn(N, V, generator=g) * 3
    y = torch.randint(0, V, (N,), generator=g)
    y[::47] = -100  # 501 rows count: 1 / 501 is not a bf16 number
    errors = {}
    for reduction in ("sum", "mean"):
        h64, W64 = h.double().requires_grad_(), W.double().requires_grad_()
        ref = R.distillation_loss(h64 @ W64.t(), t.double(), y, 4.0, reduction=reduction)[0]
        ref_gw = torch.autograd.grad(ref, W64)[0]
        for chunks in (1, 8, 64):
            leaves = [h.clone().requires_grad_(), W.clone().requires_grad_()]
            loss = kdkernels.fused_linear_distillation_loss(*leaves, t, y, reduction=reduction,
                                                            chunk_size=N // chunks)
            gw = torch.autograd.grad(loss, leaves[1])[0]
            assert gw.dtype == torch.bfloat16
            errors[reduction, chunks] = ((gw.double() - ref_gw).norm() / ref_gw.norm()).item()
    one = errors["sum", 1]
    assert one < 4e-3 and max(errors.values()) < 1.3 * one, errors


@pytest.mark.skipif(not kdkernels.backends()["cpp"].available, reason="needs the C++ kernel")
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_torch_compile_fullgraph_matches_eager(reduction):
    """torch.compile(fullgraph=True) of the fused lm_head loss (it failed on the skipped
    keep-graph query in the backward): the loss and the three gradients equal eager's."""
    student, teacher, y = _problem(13, 8, 37, seed=41, teacher_kind="hidden")

    def run(h, W, b):
        loss = kdkernels.fused_linear_distillation_loss(
            h, W, target=y, student_bias=b, backend="cpp", chunk_size=5, reduction=reduction,
            **teacher)
        return loss if reduction != "none" else (loss * torch.linspace(0.5, 2, len(loss))).sum()

    compiled = torch.compile(run, fullgraph=True)
    results = []
    for fn in (run, compiled):
        leaves = [x.detach().clone().requires_grad_() for x in student]
        loss = fn(*leaves)
        results.append((loss, *torch.autograd.grad(loss, leaves)))
    for eager, got in zip(*results):
        torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-6)
