"""The public API: names and docs, the method losses against the reference methods, modules,
bad input, edge batches, gradcheck, torch.compile and the fallback when the extension is absent."""
import pytest
import torch
from helpers import BACKEND_IDS, BACKENDS, make_inputs

import kdkernels
import kdkernels.functional as F
import kdkernels.reference as R
from kdkernels.ops import cpp_distill
from kdkernels.reference.methods import METHODS

f64 = torch.float64
PUBLIC_FUNCTIONS = ["distillation_loss", "fused_linear_distillation_loss", "kd_loss",
                    "tfkd_reg_loss", "dtd_temperature", "preparing_lessons_loss",
                    "teacher_bias_loss", "top_score_difference_loss"]
PUBLIC_MODULES = ["DistillationLoss", "FusedLinearDistillationLoss", "KDLoss", "TfKDRegLoss",
                  "PreparingLessonsLoss", "TeacherBiasLoss", "TopScoreDifferenceLoss"]


def test_public_names_exist_and_are_documented():
    for name in PUBLIC_FUNCTIONS:
        fn = getattr(F, name)
        assert fn.__doc__ and len(fn.__doc__) > 80, name
    for name in PUBLIC_MODULES:
        cls = getattr(kdkernels.nn, name)
        assert cls is getattr(kdkernels, name)
        assert issubclass(cls, torch.nn.Module) and cls.__doc__, name
    assert kdkernels.DynamicTemperature.__doc__ and kdkernels.DistillStats.__doc__


def test_backends_report_reasons():
    info = kdkernels.backends()
    assert set(info) == {"triton", "cpp", "torch"}
    for name, (available, reason) in info.items():
        assert isinstance(available, bool) and reason, name


def _inputs(seed=0, N=10, C=13):
    s, t, y = make_inputs(N, C, seed, dtype=f64)
    y[3] = -100
    return s, t, y


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("method", list(METHODS))
def test_method_losses_match_reference_methods(backend, device, method):
    """Every method of the shared table (kdkernels.reference.methods): module against oracle."""
    entry = METHODS[method]
    s, t, y = _inputs()
    s1 = s.clone().to(device).requires_grad_()
    loss = entry.fused(backend)(s1, t.to(device), y.to(device))
    (g,) = torch.autograd.grad(loss, s1)
    s2 = s.clone().requires_grad_()
    ref_loss = entry.reference()(s2, t, y)
    (ref_g,) = torch.autograd.grad(ref_loss, s2)
    tol = 1e-5 if backend == "triton" else 1e-10  # Triton accumulates in float32
    torch.testing.assert_close(loss.cpu(), ref_loss, rtol=tol, atol=tol)
    torch.testing.assert_close(g.cpu(), ref_g, rtol=tol, atol=tol)


def test_dtd_temperature_matches_reference():
    s, t, y = _inputs()
    for weighting in ("cosine", "max_prob"):
        for center in (False, True):
            got = F.dtd_temperature(s, t, tau0=3.0, beta=0.7, weighting=weighting, center=center,
                                    target=y)
            want = R.dtd_temperature(s, t, 3.0, 0.7, weighting, center, 1.0, valid=y != -100)
            torch.testing.assert_close(got, want)


def test_top_score_difference_matches_reference_with_gradient():
    s, _, y = _inputs()
    for k in (1, 3, 5, 50):
        a, b = s.clone().requires_grad_(), s.clone().requires_grad_()
        got = F.top_score_difference_loss(a, y, eta=0.4, k=k)
        want = R.top_score_difference_loss(b, y, eta=0.4, k=k)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(torch.autograd.grad(got, a)[0], torch.autograd.grad(want, b)[0])
    module = kdkernels.TopScoreDifferenceLoss(eta=0.4, k=3, reduction="none")
    torch.testing.assert_close(module(s, y), R.top_score_difference_loss(s, y, 0.4, 3,
                                                                         reduction="none"))


def test_modules_match_functional():
    s, t, y = _inputs()
    pairs = [
        (kdkernels.KDLoss(temperature=2.0), F.kd_loss(s, t, y, temperature=2.0), (s, t, y)),
        (kdkernels.TfKDRegLoss(a=0.9), F.tfkd_reg_loss(s, y, a=0.9), (s, y)),
        (kdkernels.PreparingLessonsLoss("smooth", temperature="max_prob"),
         F.preparing_lessons_loss(s, t, y, correction="smooth", temperature="max_prob"), (s, t, y)),
        (kdkernels.TeacherBiasLoss(gamma=0.4), F.teacher_bias_loss(s, t, y, gamma=0.4), (s, t, y)),
        (kdkernels.DistillationLoss(correction="rectify", wrong_kd_weight=0.1),
         F.distillation_loss(s, t, y, correction="rectify", wrong_kd_weight=0.1), (s, t, y)),
    ]
    for module, expected, args in pairs:
        torch.testing.assert_close(module(*args), expected)
    assert "temperature=2.0" in repr(pairs[0][0])


def test_teacher_bias_schedule():
    loss = kdkernels.TeacherBiasLoss(total_epochs=4)
    assert loss.gamma == 0.0
    loss.set_epoch(3)
    assert loss.gamma == 0.75
    s, t, y = _inputs()
    torch.testing.assert_close(loss(s, t, y), R.teacher_bias_loss(s, t, y, 0.75))
    with pytest.raises(ValueError, match="epoch"):
        loss.set_epoch(5)
    with pytest.raises(ValueError, match="exactly one"):
        kdkernels.TeacherBiasLoss(gamma=0.1, total_epochs=3)
    with pytest.raises(RuntimeError, match="total_epochs"):
        kdkernels.TeacherBiasLoss(gamma=0.1).set_epoch(1)


def test_stats():
    s, t, y = _inputs()
    loss, stats = F.teacher_bias_loss(s, t, y, gamma=0.5, return_stats=True)
    _, ref = R.distillation_loss(s, t, y, 4.0, correction="rectify")
    assert torch.equal(stats.teacher_correct, ref["teacher_correct"])
    assert torch.equal(stats.still_wrong, ref["still_wrong"])
    assert stats.temperature.shape == y.shape and (stats.temperature == 4.0).all()
    _, no_labels = F.kd_loss(s, t, ce_weight=0.0, return_stats=True)
    assert no_labels.teacher_correct is None and no_labels.still_wrong is None


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch_gives_zero_loss_and_gradient(backend, device, reduction):
    s = torch.zeros(0, 7, device=device, requires_grad=True)
    t = torch.zeros(0, 7, device=device)
    y = torch.zeros(0, dtype=torch.long, device=device)
    loss, stats = F.kd_loss(s, t, y, reduction=reduction, backend=backend, return_stats=True)
    assert loss.shape == ((0,) if reduction == "none" else ())
    loss.sum().backward()
    assert s.grad is not None and s.grad.shape == (0, 7)
    assert stats.temperature.shape == (0,)


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
def test_all_ignored_gives_zero_not_nan(backend, device):
    s, t, _ = make_inputs(4, 9, 0, device=device)
    s.requires_grad_()
    y = torch.full((4,), -100, device=device)
    loss = F.preparing_lessons_loss(s, t, y, correction="swap", backend=backend)
    loss.backward()
    assert loss.item() == 0 and torch.all(s.grad == 0)


GRADCHECK = [b for b, d in BACKENDS if b != "triton" and d == "cpu"]


@pytest.mark.parametrize("backend", GRADCHECK)
@pytest.mark.parametrize("correction", [None, "swap", "smooth", "rectify"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_float64(backend, correction, reduction):
    s, t, y = make_inputs(4, 6, 11, dtype=f64, ignored=(2,))
    temps = torch.tensor([1.0, 2.0, 3.0, 0.7], dtype=f64)

    def fn(student):
        return F.distillation_loss(student, t, y, temperature=temps, correction=correction,
                                   wrong_kd_weight=0.3, reduction=reduction, backend=backend)

    assert torch.autograd.gradcheck(fn, (s.requires_grad_(),))


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_backward_through_a_retained_graph_three_times(backend, device, reduction):
    s, t, y = (x.to(device) for x in _inputs())
    s.requires_grad_()
    loss = F.kd_loss(s, t, y, reduction=reduction, backend=backend).sum()
    loss.backward(retain_graph=True)
    first = s.grad.clone()
    loss.backward(retain_graph=True)
    loss.backward()
    torch.testing.assert_close(s.grad, 3 * first)


def test_no_gradient_to_teacher_or_temperature():
    s, t, y = _inputs()
    s.requires_grad_()
    t.requires_grad_()
    temps = torch.full((10,), 2.0, dtype=f64, requires_grad=True)
    F.kd_loss(s, t, y, temperature=temps).backward()
    assert t.grad is None and temps.grad is None and s.grad is not None


@pytest.mark.skipif(not kdkernels.backends()["cpp"].available, reason="needs the C++ kernel")
@pytest.mark.parametrize("temperature,dynamic", [(2.0, False), ("cosine", False), (2.0, True)])
def test_torch_compile_fullgraph_with_cpp_backend(temperature, dynamic):
    s, t, y = make_inputs(16, 50, 3)
    torch.manual_seed(0)
    model = torch.nn.Linear(50, 50)

    def forward(x, t, y):
        return F.preparing_lessons_loss(model(x), t, y, temperature=temperature, backend="cpp")

    compiled = torch.compile(forward, fullgraph=True, dynamic=dynamic)
    eager_loss = forward(s, t, y)
    eager_loss.backward()
    eager_grad = model.weight.grad.clone()
    model.weight.grad = None
    compiled_loss = compiled(s, t, y)
    compiled_loss.backward()
    torch.testing.assert_close(compiled_loss, eager_loss)
    torch.testing.assert_close(model.weight.grad, eager_grad)


def test_fallback_when_extension_absent(monkeypatch):
    monkeypatch.setattr(cpp_distill, "_C", None)
    monkeypatch.setattr(cpp_distill, "_WHY_NOT", "simulated")
    info = kdkernels.backends()["cpp"]
    assert not info.available and "simulated" in info.reason
    s, t, y = _inputs()
    torch.testing.assert_close(F.kd_loss(s, t, y), R.kd_loss(s, t, y))  # auto -> torch
    with pytest.raises(RuntimeError, match="backend='cpp' is not available.*simulated"):
        F.kd_loss(s, t, y, backend="cpp")


def test_auto_picks_the_fused_kernel_for_the_device():
    from kdkernels.ops import resolve
    expected = "cpp" if kdkernels.backends()["cpp"].available else "torch"
    assert resolve("auto", torch.device("cpu")).NAME == expected
    assert resolve("auto", torch.device("meta")).NAME == "torch"


# ---- bad input: clear errors naming the argument ---------------------------------------------

def _bad_calls():
    s, t, y = _inputs()
    return [
        (lambda: F.kd_loss(s, t[:, :5], y), ValueError,
         "teacher_logits has 5 classes, fewer than the 13"),
        (lambda: F.kd_loss(s, t[:4], y), ValueError, "teacher_logits shape"),
        (lambda: F.kd_loss(s, t, y[:4]), ValueError, "target must have shape"),
        (lambda: F.kd_loss(s, t, y.float()), TypeError, "target must be an integer"),
        (lambda: F.kd_loss(s, t, torch.full_like(y, 13)), ValueError, r"outside \[0, 13\)"),
        (lambda: F.kd_loss(s, t, torch.full_like(y, -1)), ValueError, "outside"),
        (lambda: F.kd_loss(s, t, y, temperature=0.0), ValueError, "temperature must be > 0"),
        (lambda: F.kd_loss(s, t, y, temperature=-2), ValueError, "temperature must be > 0"),
        (lambda: F.kd_loss(s, t, y, temperature=float("nan")), ValueError, "temperature"),
        (lambda: F.kd_loss(s, t, y, temperature=torch.ones(3)), ValueError, "one value per row"),
        (lambda: F.kd_loss(s, t, y, temperature=torch.zeros(10)), ValueError, "temperature values"),
        (lambda: F.kd_loss(s, t, y, temperature=torch.ones(10, dtype=torch.long)), TypeError,
         "temperature tensor"),
        (lambda: F.kd_loss(s, t, y, reduction="batchmean"), ValueError, "reduction"),
        (lambda: F.kd_loss(s, t, y, backend="cuda"), ValueError, "backend"),
        (lambda: F.distillation_loss(s, t, y, correction="flip"), ValueError, "correction"),
        (lambda: F.distillation_loss(s, t, correction="swap", ce_weight=0), ValueError,
         "target labels are required by correction='swap'"),
        (lambda: F.kd_loss(s, t), ValueError, "target labels are required by ce_weight"),
        (lambda: F.distillation_loss(s, None, y), ValueError, "teacher_logits is required"),
        (lambda: F.distillation_loss(s, t, y, virtual_teacher=0.9), ValueError, "not both"),
        (lambda: F.tfkd_reg_loss(s, y, a=1.5), ValueError, "virtual_teacher must be <= 1"),
        (lambda: F.tfkd_reg_loss(s, y, a=0.0), ValueError, "virtual_teacher must be > 0"),
        (lambda: F.distillation_loss(s, t, y, smooth_eps=2.0), ValueError, "smooth_eps"),
        (lambda: F.kd_loss(s, t, y, kd_weight=float("inf")), ValueError, "kd_weight"),
        (lambda: F.kd_loss(s.long(), t, y), TypeError, "student_logits must be a floating"),
        (lambda: F.kd_loss(s, t.long(), y), TypeError, "teacher_logits must be a floating"),
        (lambda: F.kd_loss(torch.zeros(3, 0), torch.zeros(3, 0), None, ce_weight=0), ValueError,
         "C >= 1"),
        (lambda: F.preparing_lessons_loss(s, t, y, correction="rectify"), ValueError,
         "'swap', 'smooth' or None"),
        (lambda: F.preparing_lessons_loss(s, t, y, temperature="hot"), ValueError,
         "temperature as a string"),
        (lambda: kdkernels.DynamicTemperature(weighting="entropy"), ValueError, "weighting"),
        (lambda: kdkernels.DynamicTemperature(tau_min=0), ValueError, "tau_min"),
        (lambda: kdkernels.DynamicTemperature(beta=-1), ValueError, "beta"),
        (lambda: F.tfkd_reg_loss(s, y, temperature="cosine"), ValueError, "needs teacher_logits"),
        (lambda: F.teacher_bias_loss(s, t, y), ValueError, "give gamma"),
        (lambda: F.teacher_bias_loss(s, t, y, gamma=1.5), ValueError, "gamma must be"),
        (lambda: F.teacher_bias_loss(s, t, y, epoch=2, total_epochs=0), ValueError,
         "total_epochs"),
        (lambda: F.top_score_difference_loss(s, y, k=0), ValueError, "k must be"),
        (lambda: F.kd_loss(s, t, y, ignore_index=1.5), TypeError, "ignore_index"),
        (lambda: kdkernels.KDLoss(reduction="avg"), ValueError, "reduction"),
        (lambda: F.dtd_temperature(s, t[:, :3]), ValueError, "fewer than the 13"),
    ]


def _case_name(call, error, message):
    """What a bad-input case checks, from the error it expects."""
    words = "".join(c if c.isalnum() else " " for c in message).split()
    return f"{error.__name__}-{'_'.join(words[:5])}"


BAD_CALLS = _bad_calls()
BAD_IDS = [_case_name(*case) for case in BAD_CALLS]
BAD_IDS = [name if BAD_IDS.count(name) == 1 else f"{name}-{BAD_IDS[:i].count(name)}"
           for i, name in enumerate(BAD_IDS)]


@pytest.mark.parametrize("call,error,message", BAD_CALLS, ids=BAD_IDS)
def test_bad_input_raises_clear_error(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_ignored_labels_outside_range_are_fine():
    s, t, y = _inputs()
    y[:] = -100
    y[0] = 5
    F.kd_loss(s, t, y)  # -100 is not out of range: it is ignore_index
    with pytest.raises(ValueError, match="outside"):
        F.kd_loss(s, t, y, ignore_index=-1)


@pytest.mark.parametrize("build,error,message", [
    (lambda: kdkernels.KDLoss(temperature=0.0), ValueError, "temperature must be > 0"),
    (lambda: kdkernels.KDLoss(backend="gpu"), ValueError, "backend must be"),
    (lambda: kdkernels.KDLoss(kd_weight=float("nan")), ValueError, "kd_weight"),
    (lambda: kdkernels.KDLoss(t2_scale="yes"), TypeError, "t2_scale"),
    (lambda: kdkernels.DistillationLoss(correction="flip"), ValueError, "correction"),
    (lambda: kdkernels.DistillationLoss(smooth_eps=-0.1), ValueError, "smooth_eps"),
    (lambda: kdkernels.DistillationLoss(temperature="hot"), ValueError, "temperature as a string"),
    (lambda: kdkernels.TfKDRegLoss(a=1.5), ValueError, "virtual_teacher must be <= 1"),
    (lambda: kdkernels.PreparingLessonsLoss(correction="rectify"), ValueError, "'swap', 'smooth'"),
    (lambda: kdkernels.PreparingLessonsLoss(ignore_index=1.5), TypeError, "ignore_index"),
    (lambda: kdkernels.TeacherBiasLoss(gamma=2.0), ValueError, "gamma must be"),
    (lambda: kdkernels.TeacherBiasLoss(total_epochs=0), ValueError, "total_epochs"),
    (lambda: kdkernels.TopScoreDifferenceLoss(k=0), ValueError, "k must be"),
    (lambda: kdkernels.TopScoreDifferenceLoss(eta=3), ValueError, "eta must be"),
], ids=lambda x: x if isinstance(x, str) else "")
def test_modules_check_hyperparameters_at_construction(build, error, message):
    with pytest.raises(error, match=message):
        build()


def test_forgotten_teacher_is_named():
    s, t, y = _inputs()
    with pytest.raises(TypeError, match="teacher_logits is an integer tensor .*labels"):
        kdkernels.KDLoss()(s, y)


def test_teacher_bias_module_follows_its_schedule():
    loss = kdkernels.TeacherBiasLoss(total_epochs=4)
    loss.set_epoch(2)
    s, t, y = _inputs()
    torch.testing.assert_close(loss(s, t, y), R.teacher_bias_loss(s, t, y, 0.5))


def test_options_are_checked_once_per_distinct_set_and_every_bad_one_raises():
    """The option cache keys carry the values' types: a value equal to a good one (True == 1)
    is still checked, and a bad value never reaches the cache."""
    s, t, y = make_inputs(4, 9, seed=30)
    F.distillation_loss(s, t, y, kd_weight=1, t2_scale=True)  # good, now cached
    with pytest.raises(ValueError, match="kd_weight must be a finite number"):
        F.distillation_loss(s, t, y, kd_weight=True)
    with pytest.raises(TypeError, match="t2_scale must be a bool"):
        F.distillation_loss(s, t, y, t2_scale=1)
    for _ in range(2):  # a bad value raises every time, not only the first
        with pytest.raises(ValueError, match="temperature must be > 0"):
            F.distillation_loss(s, t, y, temperature=-1.0)
    # an unhashable value cannot be a cache key: the check still names it
    with pytest.raises(ValueError, match="kd_weight must be a finite number"):
        F.distillation_loss(s, t, y, kd_weight=[0.9])
    with pytest.raises((TypeError, ValueError), match="temperature"):
        F.distillation_loss(s, t, y, temperature=[4.0])


def test_options_are_checked_once_per_set(monkeypatch):
    """check_options runs on the first call with a set of options, not on the calls after it;
    a new set is checked again."""
    import kdkernels._core as core

    calls = []
    real = core.check_options
    monkeypatch.setattr(core, "check_options", lambda **kw: calls.append(1) or real(**kw))
    s, t, y = make_inputs(4, 9, seed=32)
    for _ in range(3):
        F.kd_loss(s, t, y, temperature=3.25, kd_weight=0.375)
    assert len(calls) == 1
    F.kd_loss(s, t, y, temperature=3.5, kd_weight=0.375)
    assert len(calls) == 2


@pytest.mark.skipif(cpp_distill._C is None, reason=f"no C++ kernel: {cpp_distill._WHY_NOT}")
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_host_work_per_call_is_a_few_ops(reduction):
    """A kd_loss forward + backward on the CPU dispatches the kernel and at most 4 other aten
    ops (the label check, autograd's seed, the upstream check or scaling, the gradient's
    accumulation): the mean and the sum are the kernel's own."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    s, t, y = make_inputs(8, 10, seed=31)
    s.requires_grad_()
    loss_fn = kdkernels.KDLoss(reduction=reduction)
    for _ in range(2):  # the second call meets the cached options
        s.grad = None
        loss = loss_fn(s, t, y)
        with Count() as counted:
            s.grad = None
            loss = loss_fn(s, t, y)
            loss.backward(torch.ones_like(loss) if reduction == "none" else None)
    kernels = [op for op in counted.ops if op.startswith("kdkernels.")]
    others = [op for op in counted.ops if not op.startswith("kdkernels.")]
    assert kernels == ["kdkernels.distill_cpu"]
    assert len(others) <= 4 + (reduction == "none"), others
    reference = R.kd_loss(s.detach().double(), t.double(), y, reduction=reduction)
    torch.testing.assert_close(loss.detach().double(), reference, rtol=2e-5, atol=2e-5)
