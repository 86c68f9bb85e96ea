"""Mismatched vocabularies (docs/METHODS.md, "Mismatched vocabularies"): a teacher wider than the
student by vocabulary padding, with ``padded_teacher=True``, on every path, against the float64
oracle applied to the teacher cut to the student's width; the errors without the keyword, for a
narrower teacher, and for a width that is no padding."""
import pytest
import torch
from helpers import BACKEND_IDS, BACKENDS, INTERPRETED, oracle, run, tolerances

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
    return s, SparseTeacher(indices, values, tail), cut, y


@pytest.mark.parametrize("tail", [False, True], ids=["no-tail", "tail"])
@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
def test_padded_sparse_teacher_drops_its_padding_slots(backend, device, tail):
    """Slots at classes >= C are unused (with a tail their mass joins the tail)."""
    s, teacher, cut, y = _sparse_padded(tail, seed=3)
    for options in (dict(), dict(divergence="jsd", correction="swap")):
        _compare(backend, s.to(device), _to(teacher, device), cut, y.to(device), **options)


def _to(teacher, device):
    return SparseTeacher(teacher.indices.to(device), teacher.values.to(device), teacher.tail)


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
