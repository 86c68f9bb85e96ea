"""Mismatched vocabularies (docs/METHODS.md, "Mismatched vocabularies"): a teacher wider than the
student by vocabulary padding, with ``padded_teacher=True``, on every path, against the float64
oracle applied to the teacher cut to the student's width; the errors without the keyword, for a
narrower teacher, and for a width that is no padding."""
from dataclasses import replace

import pytest
import torch
from helpers import BACKEND_IDS, BACKENDS, INTERPRETED, oracle, run, tolerances
from hypothesis import given, settings
from hypothesis import strategies as st

import kdkernels
from kdkernels import DynamicTemperature, SparseTeacher
from kdkernels.ops import triton_distill

C, V_PADDED = 37, 40  # the student's width, and the teacher's padded to a multiple of 8


@pytest.fixture(autouse=True)
def small_triton_blocks(monkeypatch):
    """Under the interpreter, 16-class blocks reach the multi-block path at small C."""
    if INTERPRETED:
        monkeypatch.setattr(triton_distill, "MAX_BLOCK", 16)


def _padded_problem(lead, seed, dtype=torch.float32, device="cpu"):
    """(student logits [..., C], teacher logits [..., V_PADDED], labels): the teacher's padding
    columns hold large logits and some -inf, so that reading them would change every row."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(*lead, C, generator=g, dtype=torch.float64) * 3
    t = torch.randn(*lead, V_PADDED, generator=g, dtype=torch.float64) * 3
    t[..., C:] = 30.0
    t[..., -1] = float("-inf")
    t[..., :C].masked_fill_(torch.rand(*lead, C, generator=g) < 0.2, float("-inf"))
    t[..., 0] = t[..., 0].clamp(min=-5.0)  # never a whole row masked
    y = torch.randint(0, C, lead, generator=g)
    y.view(-1)[1] = -100
    return s.to(dtype).to(device), t.to(dtype).to(device), y.to(device)


def _compare(backend, s, teacher, cut, y, **kw):
    """The fused loss with padded_teacher=True on `teacher` against the oracle on `cut`."""
    loss, grad, stats, upstream = run(backend, s, teacher, y, padded_teacher=True, **kw)
    ref_loss, ref_grad, ref_stats = oracle(s.reshape(-1, C), cut, y.reshape(-1),
                                           upstream.reshape(-1), **kw)
    rtol, atol = tolerances(torch.float32 if backend == "triton" else s.dtype)
    torch.testing.assert_close(loss.double().cpu().reshape(-1), ref_loss, rtol=rtol,
                               atol=atol * (1 + ref_loss.abs().max().item()))
    torch.testing.assert_close(grad.double().cpu().reshape(-1, C), ref_grad, rtol=rtol,
                               atol=atol * (1 + ref_grad.abs().max().item()))
    assert torch.equal(stats.teacher_correct.cpu().reshape(-1), ref_stats["teacher_correct"])


DENSE_CASES = {
    "kl-3d": dict(lead=(2, 6)),
    "jsd-swap-dtd": dict(lead=(10,), divergence="jsd", correction="swap",
                         temperature=DynamicTemperature(tau0=3.0, beta=2.0)),
    "reverse-kl-rectify-fp64": dict(lead=(9,), divergence="reverse_kl", correction="rectify",
                                    dtype=torch.float64, masked_free=True),
}


@pytest.mark.parametrize("case", list(DENSE_CASES))
@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
def test_padded_dense_teacher_is_the_teacher_cut_to_the_student(backend, device, case):
    options = dict(DENSE_CASES[case])
    lead, dtype = options.pop("lead"), options.pop("dtype", torch.float32)
    s, t, y = _padded_problem(lead, seed=len(case), dtype=dtype, device=device)
    if options.pop("masked_free", False):  # the reverse KL is infinite on masked classes
        t[..., :C] = t[..., :C].nan_to_num(neginf=-3.0)
    _compare(backend, s, t, t[..., :C].reshape(-1, C), y, **options)


def _sparse_padded(tail, seed, k=6):
    """A top-k teacher over the padded vocabulary: some of its k classes are padding (>= C)."""
    s, t, y = _padded_problem((10,), seed)
    t = t.nan_to_num(neginf=-40.0)
    t[:, C:] = torch.randn(10, V_PADDED - C, generator=torch.Generator().manual_seed(seed)) + 4
    t[0, C:] = -40.0  # a row whose top k holds no padding
    values, indices = t.topk(k, -1)
    indices[2, 1] = -1  # an unused slot besides the padding ones
    if tail:
        values = values - torch.logsumexp(t, -1, keepdim=True)
    assert bool((indices >= C).any()) and bool((indices >= C).any(-1).logical_not().any())
    cut = SparseTeacher(indices.masked_fill(indices >= C, -1), values, tail)
    return s, SparseTeacher(indices, values, tail, vocab_size=V_PADDED), cut, y


@pytest.mark.parametrize("tail", [False, True], ids=["no-tail", "tail"])
@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
def test_padded_sparse_teacher_drops_its_padding_slots(backend, device, tail):
    """Slots at classes >= C are unused (with a tail their mass joins the tail)."""
    s, teacher, cut, y = _sparse_padded(tail, seed=3)
    for options in (dict(), dict(divergence="jsd", correction="swap")):
        _compare(backend, s.to(device), _to(teacher, device), cut, y.to(device), **options)


def _to(teacher, device):
    return replace(teacher, indices=teacher.indices.to(device), values=teacher.values.to(device))


def test_padded_teacher_of_the_student_width_changes_nothing():
    s, t, y = _padded_problem((8,), seed=1)
    t = t[:, :C].contiguous()
    plain = kdkernels.distillation_loss(s, t, y, reduction="none")
    assert torch.equal(kdkernels.distillation_loss(s, t, y, reduction="none",
                                                   padded_teacher=True), plain)


def test_the_backend_reads_the_padded_teacher_in_place(monkeypatch):
    """A view of the teacher's first C columns reaches the kernel: no copy of N x V."""
    s, t, y = _padded_problem((8,), seed=2)
    module = kdkernels.ops.resolve("auto", s.device)
    seen = []
    original = module.forward

    def spy(student, teacher, *args, **kwargs):
        seen.append(teacher)
        return original(student, teacher, *args, **kwargs)
    monkeypatch.setattr(module, "forward", spy)
    kdkernels.distillation_loss(s.requires_grad_(), t, y, padded_teacher=True)
    (teacher,) = seen
    assert teacher.shape == (8, C) and teacher.data_ptr() == t.data_ptr()
    assert teacher.stride() == (V_PADDED, 1)


def test_methods_and_modules_take_padded_teacher():
    s, t, y = _padded_problem((8,), seed=4)
    cut = t[:, :C]
    F = kdkernels.functional
    pairs = [
        (F.kd_loss(s, t, y, padded_teacher=True), F.kd_loss(s, cut, y)),
        (F.preparing_lessons_loss(s, t, y, padded_teacher=True),
         F.preparing_lessons_loss(s, cut, y)),
        (F.teacher_bias_loss(s, t, y, gamma=0.3, padded_teacher=True),
         F.teacher_bias_loss(s, cut, y, gamma=0.3)),
        (F.dtd_temperature(s, t, padded_teacher=True), F.dtd_temperature(s, cut)),
        (kdkernels.DistillationLoss(padded_teacher=True)(s, t, y),
         kdkernels.DistillationLoss()(s, cut, y)),
        (kdkernels.KDLoss(padded_teacher=True)(s, t, y), kdkernels.KDLoss()(s, cut, y)),
        (kdkernels.PreparingLessonsLoss(padded_teacher=True)(s, t, y),
         kdkernels.PreparingLessonsLoss()(s, cut, y)),
        (kdkernels.TeacherBiasLoss(gamma=0.5, padded_teacher=True)(s, t, y),
         kdkernels.TeacherBiasLoss(gamma=0.5)(s, cut, y)),
    ]
    for padded, plain in pairs:
        assert torch.equal(padded, plain)
    module = kdkernels.TeacherBiasLoss(total_epochs=4, padded_teacher=True)
    module.set_epoch(2)  # the schedule keeps the keyword
    assert torch.equal(module(s, t, y), kdkernels.TeacherBiasLoss(gamma=0.5)(s, cut, y))
    assert module.primitive_options()["padded_teacher"] is True


@pytest.mark.parametrize("call,error,message", [
    (lambda: kdkernels.distillation_loss(torch.zeros(2, 37), torch.zeros(2, 40)), ValueError,
     r"teacher_logits has 40 classes but student_logits has 37: .*padded_teacher=True"),
    (lambda: kdkernels.distillation_loss(torch.zeros(2, 37), torch.zeros(2, 32),
                                         padded_teacher=True), ValueError,
     r"teacher_logits has 32 classes, fewer than the 37 of student_logits"),
    (lambda: kdkernels.distillation_loss(torch.zeros(2, 37), torch.zeros(2, 32)), ValueError,
     r"fewer than the 37"),
    (lambda: kdkernels.distillation_loss(torch.zeros(2, 32000), torch.zeros(2, 32001),
                                         padded_teacher=True), ValueError,
     r"32001 classes \(student_logits: 32000\), not a multiple of 8"),
    (lambda: kdkernels.distillation_loss(torch.zeros(2, 37), torch.zeros(2, 40),
                                         padded_teacher=1), TypeError,
     "padded_teacher must be a bool"),
    (lambda: kdkernels.distillation_loss(torch.zeros(2, 37), torch.zeros(3, 40),
                                         padded_teacher=True), ValueError,
     r"teacher_logits shape \(3, 37\) does not match"),
    (lambda: kdkernels.distillation_loss(
        torch.zeros(2, 37), SparseTeacher(torch.tensor([[1, 38], [2, 3]]), torch.zeros(2, 2))),
     ValueError, r"classes >= 37, the student's width: e.g. 38; .*padded_teacher=True"),
    (lambda: kdkernels.KDLoss(padded_teacher="yes"), TypeError, "padded_teacher must be a bool"),
])
def test_mismatches_are_refused_with_both_widths_named(call, error, message):
    with pytest.raises(error, match=message):
        call()


# ---- fused lm_head ----------------------------------------------------------------------------

def _linear_problem(seed, N=7, H=5, Ht=6):
    """Student leaves (hidden, weight [C, H], bias [C]) and a teacher with a padded lm_head
    (weight [V_PADDED, Ht], bias [V_PADDED]) whose padding rows give large logits."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g)
    W = torch.randn(C, H, generator=g) / H ** 0.5 * 2
    b = torch.randn(C, generator=g) * 0.5
    ht = torch.randn(N, Ht, generator=g)
    Wt = torch.randn(V_PADDED, Ht, generator=g)
    bt = torch.randn(V_PADDED, generator=g)
    Wt[C:], bt[C:] = 0.0, 40.0
    y = torch.randint(0, C, (N,), generator=g)
    y[1] = -100
    return [h, W, b], ht, Wt, bt, y


def _linear_oracle(student, teacher_cut, y, upstream, reduction, **kw):
    """The unfused float64 loss: logits h W^T + b, the teacher already cut to C."""
    leaves = [x.detach().double().requires_grad_() for x in student]
    logits = leaves[0] @ leaves[1].t() + leaves[2]
    if isinstance(teacher_cut, SparseTeacher):
        teacher_cut = SparseTeacher(teacher_cut.indices, teacher_cut.values.double(),
                                    teacher_cut.tail)
    else:
        teacher_cut = teacher_cut.double()
    loss = kdkernels.reference.distillation_loss(logits, teacher_cut, y, reduction=reduction,
                                                 **kw)[0]
    return loss, torch.autograd.grad(loss, leaves, upstream.double())


@pytest.mark.parametrize("teacher_kind", ["hidden", "logits", "sparse_tail"])
@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
def test_fused_linear_with_a_padded_teacher(backend, device, teacher_kind):
    student, ht, Wt, bt, y = _linear_problem(seed=11)
    logits_t = ht @ Wt.t() + bt
    if teacher_kind == "hidden":
        teacher = dict(teacher=ht, teacher_weight=Wt, teacher_bias=bt)
        cut, reduction, options = logits_t[:, :C], "mean", dict(correction="swap")
    elif teacher_kind == "logits":
        teacher = dict(teacher=logits_t)
        cut, reduction, options = logits_t[:, :C], "none", dict(divergence="jsd")
    else:
        logits_t[:, C:] = torch.randn(7, V_PADDED - C, generator=torch.Generator().manual_seed(
            1)) + logits_t[:, :C].max(-1, keepdim=True).values  # in every row's top k
        values, indices = logits_t.topk(6, -1)
        values = values - torch.logsumexp(logits_t, -1, keepdim=True)
        assert bool((indices >= C).any(-1).all())
        teacher = dict(teacher=SparseTeacher(indices.to(device), values.to(device), True,
                                             vocab_size=V_PADDED))
        cut = SparseTeacher(indices.masked_fill(indices >= C, -1), values, True)
        reduction, options = "sum", dict(correction="rectify")
    leaves = [x.to(device).requires_grad_() for x in student]
    teacher = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in teacher.items()}
    loss = kdkernels.fused_linear_distillation_loss(
        leaves[0], leaves[1], target=y.to(device), student_bias=leaves[2], **teacher,
        reduction=reduction, backend=backend, chunk_size=3, padded_teacher=True, **options)
    upstream = torch.rand(loss.shape, generator=torch.Generator().manual_seed(2)) + 0.5
    grads = torch.autograd.grad(loss, leaves, upstream.to(device))
    ref_loss, ref_grads = _linear_oracle(student, cut, y, upstream, reduction, **options)
    rtol, atol = tolerances(torch.float32)
    torch.testing.assert_close(loss.double().cpu(), ref_loss.detach(), rtol=rtol,
                               atol=atol * (1 + ref_loss.abs().max().item()))
    for grad, ref in zip(grads, ref_grads):
        torch.testing.assert_close(grad.double().cpu(), ref, rtol=rtol,
                                   atol=atol * (1 + ref.abs().max().item()))


def test_fused_linear_mismatches_are_refused():
    student, ht, Wt, bt, y = _linear_problem(seed=12)
    h, W, b = student
    F = kdkernels.fused_linear_distillation_loss
    cases = [
        (dict(teacher=ht, teacher_weight=Wt, teacher_bias=bt),
         r"teacher_weight has 40 classes but student_weight has 37: .*padded_teacher=True"),
        (dict(teacher=ht, teacher_weight=Wt[:41 - 8], padded_teacher=True),
         r"teacher_weight has 33 classes, fewer than the 37"),
        (dict(teacher=ht, teacher_weight=torch.randn(41, 6), padded_teacher=True),
         r"41 classes \(student_weight: 37\), not a multiple of 8"),
        (dict(teacher=ht, teacher_weight=Wt, teacher_bias=bt[:C], padded_teacher=True),
         r"teacher_bias must be \[40\]"),
        (dict(teacher=ht @ Wt.t()), r"teacher has 40 classes but student_weight has 37"),
        (dict(teacher=SparseTeacher(torch.tensor([[38]] * 7), torch.zeros(7, 1))),
         r"classes >= 37, the student's width"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            F(h, W, target=y, student_bias=b, **kwargs)
    module = kdkernels.FusedLinearDistillationLoss(padded_teacher=True, chunk_size=3)
    assert torch.equal(module(h, W, ht, y, teacher_weight=Wt, teacher_bias=bt),
                       F(h, W, ht, y, teacher_weight=Wt[:C], teacher_bias=bt[:C], chunk_size=3))


# ---- vocab-parallel ---------------------------------------------------------------------------

SHARDS = [0, 20, C]  # the student's shards; the last rank's teacher shard runs to V_PADDED


def _vp_worker(rank, world, port, failures):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    start, end = SHARDS[rank], SHARDS[rank + 1]
    t_end = V_PADDED if end == C else end
    try:
        # dense logits: the oracle on the teacher cut to C
        s, t, y = _padded_problem((12,), seed=21, dtype=torch.float64)
        for options in (dict(correction="swap", reduction="mean"),
                        dict(divergence="jsd", reduction="none")):
            shard = s[:, start:end].clone().requires_grad_()
            loss = kdkernels.vocab_parallel_distillation_loss(
                shard, t[:, start:t_end], y, vocab_start=start, vocab_size=C,
                padded_teacher=True, **options)
            up = torch.rand(loss.shape, generator=torch.Generator().manual_seed(3),
                            dtype=loss.dtype) + 0.5
            (grad,) = torch.autograd.grad(loss, shard, up)
            ref_loss, ref_grad, _ = oracle(s, t[:, :C], y, up, **options)
            torch.testing.assert_close(loss, ref_loss, rtol=1e-9, atol=1e-10)
            torch.testing.assert_close(grad, ref_grad[:, start:end], rtol=1e-9, atol=1e-10)
        # hidden states and this rank's rows of the lm_heads, the teacher's padded
        student, ht, Wt, bt, y = _linear_problem(seed=22)
        student = [x.double() for x in student]
        h, W, b = student
        leaves = [h.clone().requires_grad_(), W[start:end].clone().requires_grad_(),
                  b[start:end].clone().requires_grad_()]
        loss = kdkernels.vocab_parallel_fused_linear_distillation_loss(
            leaves[0], leaves[1], ht.double(), y, vocab_start=start, vocab_size=C,
            student_bias=leaves[2], teacher_weight=Wt[start:t_end].double(),
            teacher_bias=bt[start:t_end].double(), chunk_size=5, padded_teacher=True)
        grads = torch.autograd.grad(loss, leaves)
        cut = ht.double() @ Wt[:C].double().t() + bt[:C].double()
        ref_loss, ref_grads = _linear_oracle(student, cut, y, torch.ones(()), "mean")
        torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-9, atol=1e-10)
        grad_h = grads[0].clone()
        dist.all_reduce(grad_h)  # each rank's part of the hidden states' gradient
        torch.testing.assert_close(grad_h, ref_grads[0], rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(grads[1], ref_grads[1][start:end], rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(grads[2], ref_grads[2][start:end], rtol=1e-9, atol=1e-10)
    except Exception:  # noqa: BLE001 -- reported by the parent with the rank
        import traceback
        failures.put(f"rank {rank}/{world}:\n{traceback.format_exc()}")
    finally:
        dist.destroy_process_group()


def test_vocab_parallel_with_the_padding_on_the_last_shard():
    import os

    import torch.multiprocessing as mp
    from test_vocab_parallel import _free_port
    context = mp.get_context("spawn")
    failures = context.SimpleQueue()
    env_interpret = os.environ.pop("TRITON_INTERPRET", None)  # not needed in the workers
    try:
        mp.start_processes(_vp_worker, args=(2, _free_port(), failures), nprocs=2,
                           start_method="spawn")
    finally:
        if env_interpret is not None:
            os.environ["TRITON_INTERPRET"] = env_interpret
    errors = []
    while not failures.empty():
        errors.append(failures.get())
    assert not errors, "\n".join(errors)


def test_vocab_parallel_mismatches_are_refused_before_any_collective():
    s, t, y = _padded_problem((4,), seed=23)
    F = kdkernels.vocab_parallel_distillation_loss
    FL = kdkernels.vocab_parallel_fused_linear_distillation_loss
    h, Wt = torch.randn(4, 3), torch.randn(V_PADDED, 3)
    cases = [  # (call, message); the last shard is [20, 37)
        (lambda: F(s[:, 20:], t[:, 20:], y, vocab_start=20, vocab_size=C),
         r"has 40 classes but the student \(vocab_size\) has 37: .*padded_teacher=True"),
        (lambda: F(s[:, 20:], torch.zeros(4, 21), y, vocab_start=20, vocab_size=C,
                   padded_teacher=True), r"ends at 41\) has 41 classes .*not a multiple of 8"),
        (lambda: F(s[:, :20], t[:, :23], y, vocab_start=0, vocab_size=C, padded_teacher=True),
         r"padding may lie only at the end of the last shard"),
        (lambda: F(s[:, :20], t[:, :23], y, vocab_start=0, vocab_size=C),
         r"teacher_logits shard has 23 classes but this rank's student shard has 20"),
        (lambda: F(s[:, 20:], t[:, 20:30], y, vocab_start=20, vocab_size=C,
                   padded_teacher=True), r"has 10 classes, fewer than the 17"),
        (lambda: FL(h, torch.randn(17, 3), h, y, vocab_start=20, vocab_size=C,
                    teacher_weight=Wt[20:]),
         r"teacher_weight \(its last shard ends at 40\) has 40 classes but the student "
         r"\(vocab_size\) has 37"),
        (lambda: FL(h, torch.randn(20, 3), h, y, vocab_start=0, vocab_size=C,
                    teacher_weight=Wt[:24], padded_teacher=True),
         r"teacher_weight shard has 24 classes.*only at the end of the last shard"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    # accepted checks lead to the collective, which needs torch.distributed
    with pytest.raises(RuntimeError, match="torch.distributed"):
        F(s[:, 20:], t[:, 20:], y, vocab_start=20, vocab_size=C, padded_teacher=True)


# ---- random problems, torch.compile -----------------------------------------------------------

@settings(max_examples=25)
@given(N=st.integers(1, 9), C=st.integers(1, 70), pad=st.integers(0, 3), seed=st.integers(0, 99),
       tail=st.booleans(), backend=st.sampled_from(["cpp", "torch"]))
def test_random_padded_teachers_match_the_oracle_on_the_cut_teacher(N, C, pad, seed, tail,
                                                                    backend):
    if not kdkernels.backends()[backend].available:
        return
    V = -(-C // 8) * 8 + 8 * pad  # C rounded up to a multiple of 8, plus whole padding blocks
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(N, C, generator=g, dtype=torch.float64) * 3
    t = torch.randn(N, V, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, C, (N,), generator=g)
    loss, grad, _, upstream = run(backend, s, t, y, padded_teacher=True, correction="swap")
    ref_loss, ref_grad, _ = oracle(s, t[:, :C], y, upstream, correction="swap")
    torch.testing.assert_close(loss, ref_loss, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-10)
    k = min(4, V)  # a top-k over the padded vocabulary
    values, indices = t.topk(k, -1)
    if tail:
        values = values - torch.logsumexp(t, -1, keepdim=True)
    sparse = SparseTeacher(indices, values, tail, vocab_size=V)
    cut = SparseTeacher(indices.masked_fill(indices >= C, -1), values, tail)
    loss, grad, _, upstream = run(backend, s, sparse, y, padded_teacher=True)
    ref_loss, ref_grad, _ = oracle(s, cut, y, upstream)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-10)


@pytest.mark.skipif(not kdkernels.backends()["cpp"].available, reason="needs the C++ kernel")
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_torch_compile_fullgraph_with_a_padded_teacher(sparse):
    s, t, y = _padded_problem((8,), seed=5)
    t = t.nan_to_num(neginf=-30.0)
    if sparse:
        values, indices = t.topk(5, -1)
        t = SparseTeacher(indices, values, vocab_size=V_PADDED)
    model = torch.nn.Linear(C, C, dtype=torch.float32)

    def forward(x, teacher, y):
        return kdkernels.distillation_loss(model(x), teacher, y, padded_teacher=True,
                                           backend="cpp")

    compiled = torch.compile(forward, fullgraph=True)
    eager = forward(s, t, y)
    torch.testing.assert_close(compiled(s, t, y), eager)


def test_without_the_keyword_a_device_tensor_s_padding_slot_counts_as_unused(monkeypatch):
    """Where the index check would cost a device sync (CUDA; simulated here on the torch
    backend), an index >= C is not checked and counts as an unused slot, as documented."""
    s, teacher, cut, y = _sparse_padded(tail=False, seed=8)
    monkeypatch.setattr(kdkernels._core, "_host_scalars", lambda tensor: False)
    unchecked = kdkernels.distillation_loss(s, replace(teacher, vocab_size=None), y,
                                            backend="torch", reduction="none")
    padded = kdkernels.distillation_loss(s, teacher, y, backend="torch", reduction="none",
                                         padded_teacher=True)
    torch.testing.assert_close(unchecked, padded)
    torch.testing.assert_close(padded, kdkernels.distillation_loss(s, cut, y, backend="torch",
                                                                   reduction="none"))
    # the same with an index past the vocab_size: not checked there (no sync), and unused
    beyond = teacher.indices.clone()
    beyond[4, 0] = 100000
    beyond_cut = cut.indices.clone()
    beyond_cut[4, 0] = -1
    torch.testing.assert_close(
        kdkernels.distillation_loss(s, replace(teacher, indices=beyond), y, backend="torch",
                                    reduction="none", padded_teacher=True),
        kdkernels.distillation_loss(s, replace(cut, indices=beyond_cut), y, backend="torch",
                                    reduction="none"))


# ---- a sparse teacher's width ------------------------------------------------------------------

def _sparse_loss(path, teacher, **kw):
    """The loss of `teacher` by the primitive or by the fused lm_head (the same student)."""
    student, _, _, _, y = _linear_problem(seed=31)
    h, W, b = student
    if path == "primitive":
        return kdkernels.distillation_loss(h @ W.t() + b, teacher, y, **kw)
    return kdkernels.fused_linear_distillation_loss(h, W, teacher, y, student_bias=b,
                                                    chunk_size=3, **kw)


def _sparse_over(width, seed=32):
    """A top-6 teacher (log-probabilities, with a tail) over a vocabulary of `width`, for the
    7 rows of _linear_problem; every row holds a class >= C when width > C."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(7, width, generator=g)
    logits[:, C:] += 3.0
    values, indices = logits.topk(6, -1)
    return indices, values - torch.logsumexp(logits, -1, keepdim=True)


@pytest.mark.parametrize("path", ["primitive", "fused_linear"])
def test_sparse_teacher_of_a_padded_width_is_the_teacher_cut_to_the_student(path):
    indices, values = _sparse_over(V_PADDED)
    assert bool((indices >= C).any(-1).all())
    padded = _sparse_loss(path, SparseTeacher(indices, values, True, vocab_size=V_PADDED),
                          padded_teacher=True, reduction="none")
    cut = SparseTeacher(indices.masked_fill(indices >= C, -1), values, True)
    torch.testing.assert_close(padded, _sparse_loss(path, cut, reduction="none"))
    # the student's own width: nothing to cut, with or without the keyword
    indices, values = _sparse_over(C)
    plain = _sparse_loss(path, SparseTeacher(indices, values, True), reduction="none")
    for padded_teacher in (False, True):
        assert torch.equal(_sparse_loss(path, SparseTeacher(indices, values, True, vocab_size=C),
                                        padded_teacher=padded_teacher, reduction="none"), plain)


@pytest.mark.parametrize("path", ["primitive", "fused_linear"])
def test_sparse_teacher_widths_that_are_no_padding_are_refused(path):
    """Never a silent truncation: padding needs the width; a width that is not padding, an index
    past the width (checked on CPU: 100000 against a student of 37) are errors."""
    student = "student_logits" if path == "primitive" else "student_weight"
    indices, values = _sparse_over(V_PADDED)
    far = indices.clone()
    far[3, 2] = 100000
    own, own_values = _sparse_over(C)  # the student's width, one index far past it
    own[3, 2] = 100000
    cases = [
        (SparseTeacher(indices, values, True), dict(padded_teacher=True), ValueError,
         r"padded_teacher=True with a SparseTeacher needs its vocab_size.*cannot be told from "
         r"padding"),
        (SparseTeacher(far, values, True), dict(padded_teacher=True), ValueError,
         r"needs its vocab_size"),
        (SparseTeacher(far, values, True, vocab_size=V_PADDED), dict(padded_teacher=True),
         ValueError, r"SparseTeacher.indices holds classes >= its vocab_size 40: e.g. 100000"),
        (SparseTeacher(own, own_values, True, vocab_size=C), dict(), ValueError,
         r"classes >= its vocab_size 37: e.g. 100000"),
        (SparseTeacher(indices, values, True, vocab_size=V_PADDED), dict(), ValueError,
         rf"SparseTeacher.vocab_size has 40 classes but {student} has 37: .*padded_teacher=True"),
        (SparseTeacher(indices, values, True, vocab_size=41), dict(padded_teacher=True),
         ValueError, rf"41 classes \({student}: 37\), not a multiple of 8"),
        (SparseTeacher(indices, values, True, vocab_size=32), dict(padded_teacher=True),
         ValueError, r"SparseTeacher.vocab_size has 32 classes, fewer than the 37"),
        (SparseTeacher(indices, values, True, vocab_size=40.0), dict(padded_teacher=True),
         TypeError, r"SparseTeacher.vocab_size must be an int >= 1"),
        (SparseTeacher(indices, values, True, vocab_size=True), dict(), TypeError,
         r"SparseTeacher.vocab_size must be an int >= 1"),
    ]
    for teacher, options, error, message in cases:
        with pytest.raises(error, match=message):
            _sparse_loss(path, teacher, **options)
