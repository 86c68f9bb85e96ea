"""Every backend against the float64 reference: every method and option, odd shapes, dtypes,
-inf teacher logits, ignored rows, reductions, gradients and per-row stats."""
import pytest
import torch
from helpers import BACKEND_IDS, BACKENDS, INTERPRETED, assert_matches, make_inputs, run
from hypothesis import given, settings
from hypothesis import strategies as st

import kdkernels
from kdkernels import DynamicTemperature
from kdkernels.ops import triton_distill

CORRECTIONS = [None, "swap", "smooth", "rectify"]
TEMPERATURES = {
    "scalar": 2.5,
    "rows": "rows",
    "cosine": DynamicTemperature(tau0=4.0, beta=1.5, weighting="cosine"),
    "max_prob": DynamicTemperature(tau0=6.0, beta=0.05, weighting="max_prob", tau_min=0.5),
    "centred": DynamicTemperature(tau0=4.0, beta=2.0, weighting="cosine", center=True),
}


@pytest.fixture(autouse=True)
def small_triton_blocks(monkeypatch):
    """Under the interpreter, 32-class blocks reach the multi-block (online softmax) path at
    small C; on a GPU the real block sizes are used."""
    if INTERPRETED:
        monkeypatch.setattr(triton_distill, "MAX_BLOCK", 32)


def _temperature(kind, N, device, seed=0):
    value = TEMPERATURES[kind]
    if value == "rows":
        g = torch.Generator().manual_seed(seed)
        return (torch.rand(N, generator=g, dtype=torch.float64) * 4 + 0.5).float().to(device)
    return value


def _shapes(backend, device):
    if backend == "triton" and device == "cpu":  # the interpreter runs each row in numpy
        return [(5, 1), (6, 7), (4, 100)]
    return [(7, 1), (9, 7), (8, 100), (5, 1000), (3, 4099)]


CASES = [(b, d, N, C) for (b, d) in BACKENDS for (N, C) in _shapes(b, d)]
CASE_IDS = [f"{b}-{d}-{N}x{C}" for b, d, N, C in CASES]


@pytest.mark.parametrize("backend,device,N,C", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("correction", CORRECTIONS)
@pytest.mark.parametrize("temp", list(TEMPERATURES))
def test_every_option_float32(backend, device, N, C, correction, temp):
    s, t, y = make_inputs(N, C, seed=N * C, device=device, masked=True, ignored=(1,))
    assert_matches(backend, s, t, y, temperature=_temperature(temp, N, device),
                   correction=correction, kd_weight=0.7, wrong_kd_weight=0.4, ce_weight=0.3)


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("dtype,teacher_dtype", [
    (torch.float64, torch.float64), (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16), (torch.bfloat16, torch.float32),
    (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("correction", CORRECTIONS)
def test_dtypes(backend, device, dtype, teacher_dtype, correction):
    C = 100 if (backend, device) in INTERPRETED else 1000
    s, t, y = make_inputs(6, C, seed=3, dtype=dtype, teacher_dtype=teacher_dtype, device=device,
                          masked=True, ignored=(2,))
    assert_matches(backend, s, t, y, temperature=3.0, correction=correction,
                   wrong_kd_weight=0.2)


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("a", [0.9, 0.99, 1.0])
def test_virtual_teacher(backend, device, a):
    C = 100 if (backend, device) in INTERPRETED else 1000
    s, _, y = make_inputs(6, C, seed=4, device=device, ignored=(0,))
    assert_matches(backend, s, None, y, temperature=20.0, virtual_teacher=a)


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("labels", ["some_ignored", "none_given", "all_ignored"])
def test_reductions_and_ignore_index(backend, device, reduction, labels):
    N, C = 6, 33
    s, t, y = make_inputs(N, C, seed=5, device=device,
                          ignored=range(N) if labels == "all_ignored" else (0, 3))
    kw = dict(temperature=2.0, reduction=reduction, ignore_index=-100)
    if labels == "none_given":
        y = None
        kw["ce_weight"] = 0.0
    loss, grad, _ = assert_matches(backend, s, t, y, **kw)
    if labels == "all_ignored":
        assert torch.all(loss == 0) and torch.all(grad == 0) and not torch.isnan(loss).any()
    if y is not None and labels == "some_ignored":
        assert torch.all(grad[y == -100] == 0)


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
def test_t2_scale_off_and_other_ignore_index(backend, device):
    s, t, y = make_inputs(5, 40, seed=6, device=device)
    y[2] = 7
    assert_matches(backend, s, t, y, temperature=3.0, t2_scale=False, ignore_index=7,
                   correction="swap")


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
def test_masked_vocabulary(backend, device):
    """Language-model padding: the same classes are -inf for student and teacher."""
    s, t, y = make_inputs(6, 50, seed=7, device=device)
    y = y % 40  # labels are real tokens
    s[:, 40:] = float("-inf")
    t[:, 40:] = float("-inf")
    loss, grad, _ = assert_matches(backend, s, t, y, temperature=2.0, correction="rectify")
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert torch.all(grad[:, 40:] == 0)


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
def test_nan_poisons_only_its_row(backend, device):
    s, t, y = make_inputs(5, 30, seed=8, device=device)
    s[1, 3] = float("nan")
    loss, grad, _, _ = run(backend, s, t, y, temperature=2.0)
    assert torch.isnan(loss[1])
    assert torch.isfinite(loss[[0, 2, 3, 4]]).all()
    assert torch.isfinite(grad[[0, 2, 3, 4]]).all()


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
def test_row_strided_and_batched_inputs(backend, device):
    """Rows with a stride (a slice of a wider buffer) and [B, L, C] logits, without copies."""
    base_s, base_t, _ = make_inputs(6, 80, seed=9, device=device)
    s, t = base_s[:, :50], base_t[:, 10:60]
    assert s.stride(0) == 80 and not s.is_contiguous()
    y = torch.randint(0, 50, (6,)).to(device)
    assert_matches(backend, s, t, y, temperature=2.0, correction="swap")
    s3, t3 = s.reshape(2, 3, 50), t.reshape(2, 3, 50)
    loss = kdkernels.distillation_loss(s3, t3, y.reshape(2, 3), reduction="none", backend=backend,
                                       temperature=2.0)
    flat = kdkernels.distillation_loss(s, t, y, reduction="none", backend=backend, temperature=2.0)
    assert loss.shape == (2, 3)
    torch.testing.assert_close(loss.reshape(-1), flat)


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
def test_bad_values_poison_rows_inside_the_op(backend, device):
    """The kernels' own guard (what CUDA users get, where the Python check would need a sync):
    a label out of range or a temperature <= 0 makes that row NaN, never a wild memory access."""
    from kdkernels._options import TEMP_ROWS, FusedOptions
    from kdkernels.ops import resolve
    s, t, y = make_inputs(4, 20, seed=10, device=device)
    y[1] = 25
    temps = torch.tensor([1.0, 1.0, -1.0, 2.0], device=device)
    module = resolve(backend, torch.device(device))
    loss, grad, _, _ = module.forward(s, t, y, temps, FusedOptions(temp_mode=TEMP_ROWS))
    assert torch.isnan(loss[1]) and torch.isnan(loss[2])
    assert torch.isfinite(loss[[0, 3]]).all() and torch.isfinite(grad[[0, 3]]).all()


@st.composite
def problems(draw, small):
    C = draw(st.sampled_from([1, 2, 7, 33, 64, 100]) if small else
             st.one_of(st.sampled_from([1, 7, 100, 1000, 4097]), st.integers(1, 300)))
    N = draw(st.integers(1, 6 if small else 16))
    return dict(
        N=N, C=C, seed=draw(st.integers(0, 2 ** 31 - 1)),
        masked=draw(st.booleans()),
        ignored=draw(st.lists(st.integers(0, N - 1), max_size=2)),
        correction=draw(st.sampled_from(CORRECTIONS)),
        temp=draw(st.sampled_from(list(TEMPERATURES))),
        kd_weight=draw(st.floats(0, 2)), ce_weight=draw(st.floats(0, 1)),
        wrong_kd_weight=draw(st.floats(0, 2)),
        smooth_eps=draw(st.floats(0, 1)),
        scale=draw(st.sampled_from([0.1, 1.0, 5.0, 20.0])),
        reduction=draw(st.sampled_from(["mean", "sum", "none"])),
        dtype=draw(st.sampled_from([torch.float32, torch.float64])))


def _check_problem(backend, device, p):
    s, t, y = make_inputs(p["N"], p["C"], p["seed"], dtype=p["dtype"], device=device,
                          masked=p["masked"], ignored=p["ignored"], scale=p["scale"])
    assert_matches(backend, s, t, y, temperature=_temperature(p["temp"], p["N"], device),
                   correction=p["correction"], kd_weight=p["kd_weight"], ce_weight=p["ce_weight"],
                   wrong_kd_weight=p["wrong_kd_weight"], smooth_eps=p["smooth_eps"],
                   reduction=p["reduction"])


COMPILED = [(b, d) for b, d in BACKENDS if (b, d) not in INTERPRETED]


@pytest.mark.parametrize("backend,device", COMPILED, ids=[f"{b}-{d}" for b, d in COMPILED])
@settings(max_examples=60)
@given(p=problems(small=False))
def test_random_problems(backend, device, p):
    _check_problem(backend, device, p)


@pytest.mark.parametrize("backend,device", INTERPRETED, ids=[f"{b}-{d}" for b, d in INTERPRETED])
@settings(max_examples=12)
@given(p=problems(small=True))
def test_random_problems_interpreted(backend, device, p):
    triton_distill.MAX_BLOCK = 32
    _check_problem(backend, device, p)


def test_every_backend_is_tested_here():
    """The C++ kernel is built by the README's install; the suite must not pass without it."""
    names = {name for name, _ in BACKENDS}
    assert {"torch", "cpp", "triton"} <= names, kdkernels.backends()



@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("correction", CORRECTIONS)
def test_forward_only_skips_the_gradient_and_keeps_the_loss(backend, device, correction):
    from kdkernels._options import FusedOptions
    from kdkernels.ops import resolve
    s, t, y = make_inputs(5, 40, seed=12, device=device, ignored=(0,))
    kw = dict(temperature="cosine", correction=correction, reduction="none", backend=backend)
    with_grad = kdkernels.distillation_loss(s.clone().requires_grad_(), t, y, **kw)
    with torch.no_grad():
        without = kdkernels.distillation_loss(s.clone().requires_grad_(), t, y, **kw)
    assert not without.requires_grad
    torch.testing.assert_close(without, with_grad.detach())
    module = resolve(backend, torch.device(device))
    _, grad, _, _ = module.forward(s, t, y, None, FusedOptions(compute_grad=False))
    assert grad.numel() == 0


LARGEST = [(b, d) for b, d in BACKENDS if b in ("triton", "cpp")]


@pytest.mark.parametrize("backend,device", LARGEST, ids=[f"{b}-{d}" for b, d in LARGEST])
@pytest.mark.parametrize("correction", [None, "rectify"])
def test_largest_vocabulary(backend, device, correction, monkeypatch):
    """C = 262144 with the kernels' real block size (Triton: 32 blocks of 8192 per row)."""
    monkeypatch.setattr(triton_distill, "MAX_BLOCK", 8192)
    s, t, y = make_inputs(2, 262144, seed=13, dtype=torch.bfloat16, device=device, masked=True)
    assert_matches(backend, s, t, y, temperature=DynamicTemperature(), correction=correction,
                   wrong_kd_weight=0.5)


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("layout", ["column_of_pairs", "expanded", "every_other"])
def test_strided_labels_and_temperatures(backend, device, layout):
    """Labels and per-row temperatures are read through their strides: a column of a [N, 2]
    tensor, one value expanded to N rows, every other element of a longer tensor."""
    N, C = 6, 40
    s, t, _ = make_inputs(N, C, seed=14, device=device)
    g = torch.Generator().manual_seed(14)
    if layout == "column_of_pairs":
        y = torch.randint(0, C, (N, 2), generator=g).to(device)[:, 0]
        temps = (torch.rand(N, 2, generator=g) * 3 + 0.5).to(device)[:, 1]
    elif layout == "expanded":
        y = torch.tensor(3, device=device).expand(N)
        temps = torch.tensor(2.5, device=device).expand(N)
    else:
        y = torch.randint(0, C, (2 * N,), generator=g).to(device)[::2]
        temps = (torch.rand(2 * N, generator=g) * 3 + 0.5).to(device)[1::2]
    assert not y.is_contiguous() and not temps.is_contiguous()
    assert_matches(backend, s, t, y, temperature=temps, correction="swap", ce_weight=0.3)
    # the op itself, called with the strided tensors (no copies made by the Python layer)
    from kdkernels._options import CORRECTION_SWAP, TEMP_ROWS, FusedOptions
    from kdkernels.ops import resolve
    module = resolve(backend, torch.device(device))
    options = FusedOptions(temp_mode=TEMP_ROWS, correction=CORRECTION_SWAP)
    strided = module.forward(s, t, y, temps.float(), options)
    dense = module.forward(s, t, y.contiguous(), temps.float().contiguous(), options)
    torch.testing.assert_close(strided[0], dense[0])
    torch.testing.assert_close(strided[1], dense[1])


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("correction", CORRECTIONS)
@pytest.mark.parametrize("temp", ["scalar", "cosine"])
def test_teacher_row_entirely_masked(backend, device, correction, temp):
    """A teacher row of -inf only has no distribution: no KD term there (CE still counts), and
    no NaN anywhere."""
    s, t, y = make_inputs(5, 37, seed=15, device=device)
    t[2] = float("-inf")
    loss, grad, _ = assert_matches(backend, s, t, y, temperature=_temperature(temp, 5, device),
                                   correction=correction, ce_weight=0.3)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    ce_only, ce_grad, _ = assert_matches(backend, s[2:3], t[2:3], y[2:3], kd_weight=0.0,
                                         ce_weight=0.3, temperature=2.0)
    torch.testing.assert_close(loss[2:3], ce_only)


TRITON = [(b, d) for b, d in BACKENDS if b == "triton"]


@pytest.mark.parametrize("backend,device", TRITON, ids=[f"{b}-{d}" for b, d in TRITON])
@pytest.mark.parametrize("path", ["small_rows", "two_kernels"])
@pytest.mark.parametrize("case", [
    dict(N=9, C=7, temperature=2.5, reduction="mean"),
    dict(N=17, C=100, temperature="rows", kd_weight=0.7, wrong_kd_weight=0.3, ce_weight=0.3,
         reduction="none"),
    dict(N=5, C=33, temperature=20.0, virtual_teacher=0.9, reduction="sum"),
    dict(N=6, C=1, temperature=1.0, reduction="mean"),
    dict(N=6, C=100, temperature=1.0, ce_weight=0.0, labels=False, t2_scale=False,
         reduction="mean")], ids=["mean", "rows-none", "virtual-sum", "C1", "no-labels"])
def test_small_rows_kernel_and_two_kernels_agree_with_the_oracle(backend, device, path, case,
                                                                 monkeypatch):
    """Rows that fit one block run several per program with the gradient written in the forward
    (small_rows); the two-kernel path must give the same. Each case checks which one ran."""
    import torch.utils._python_dispatch as dispatch
    if path == "two_kernels":
        monkeypatch.setattr(triton_distill, "SMALL_ROWS_MAX", 0)
    else:  # the autouse fixture's 32-class blocks would send C = 33 and 100 to two kernels
        monkeypatch.setattr(triton_distill, "MAX_BLOCK", 8192)
    case = dict(case)
    N, C = case.pop("N"), case.pop("C")
    labels = case.pop("labels", True)
    s, t, y = make_inputs(N, C, seed=N * C, device=device, masked=True, ignored=(1, 4))
    if case["temperature"] == "rows":
        case["temperature"] = _temperature("rows", N, device)
    if case.get("virtual_teacher"):
        t = None
    seen = set()

    class Ops(dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.add(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    with Ops():
        assert_matches(backend, s, t, y if labels else None, **case)
    expected = ("kdkernels.distill_triton_rows" if path == "small_rows"
                else "kdkernels.distill_triton")
    assert expected in seen, seen
