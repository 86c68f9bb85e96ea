"""Shared test machinery: backends to test, input makers, and the float64 oracle comparison."""
import torch

import kdkernels
import kdkernels.reference as reference

CUDA = torch.cuda.is_available()


def available_backends():
    """Every backend that can run in this process, with the device it runs on."""
    found = []
    for name, info in kdkernels.backends().items():
        if not info.available:
            continue
        if name == "triton":
            found.append((name, "cuda" if CUDA else "cpu"))
        else:
            found.append((name, "cpu"))
    if CUDA:
        found.append(("torch", "cuda"))
    return found


BACKENDS = available_backends()
BACKEND_IDS = [f"{name}-{device}" for name, device in BACKENDS]
INTERPRETED = [(n, d) for n, d in BACKENDS if n == "triton" and d == "cpu"]


def make_inputs(N, C, seed, dtype=torch.float32, device="cpu", masked=False, ignored=(),
                teacher_dtype=None, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(N, C, generator=g, dtype=torch.float64) * scale
    t = torch.randn(N, C, generator=g, dtype=torch.float64) * scale
    y = torch.randint(0, C, (N,), generator=g)
    if masked and C > 1:  # -inf teacher logits (masked classes), never the whole row
        mask = torch.rand(N, C, generator=g) < 0.3
        mask[:, 0] = False
        t = t.masked_fill(mask, float("-inf"))
    for i in ignored:
        if i < N:
            y[i] = -100
    s = s.to(dtype)
    t = t.to(teacher_dtype or dtype)
    return s.to(device), t.to(device), y.to(device)


def tolerances(dtype):
    """(rtol, atol) for a backend fed `dtype` against the float64 oracle on the same inputs."""
    return {torch.float64: (1e-9, 1e-10), torch.float32: (2e-5, 2e-5),
            torch.bfloat16: (2e-2, 2e-3), torch.float16: (4e-3, 4e-4)}[dtype]


def run(backend, s, t, y, reduction="none", **kw):
    """Loss, gradient (wrt the student, for a random upstream gradient when reduction='none')
    and stats of one backend."""
    s = s.detach().clone().requires_grad_()
    loss, stats = kdkernels.distillation_loss(s, t, y, reduction=reduction, return_stats=True,
                                              backend=backend, **kw)
    upstream = (torch.rand(loss.shape, generator=torch.Generator().manual_seed(1),
                           dtype=loss.dtype).to(loss.device) + 0.5)
    (grad,) = torch.autograd.grad(loss, s, upstream)
    return loss.detach(), grad, stats, upstream


def oracle(s, t, y, upstream, reduction="none", temperature=4.0, **kw):
    """The reference in float64 on the same (already rounded) inputs; t may be a
    SparseTeacher."""
    s64 = s.detach().double().cpu().requires_grad_()
    if isinstance(t, kdkernels.SparseTeacher):
        t64 = kdkernels.SparseTeacher(t.indices.cpu(), t.values.detach().double().cpu(), t.tail)
        dense = reference.densify(t64.indices, t64.values, s.shape[-1])  # for DTD's weights
    else:
        t64 = dense = None if t is None else t.detach().double().cpu()
    y64 = None if y is None else y.cpu()
    if isinstance(temperature, kdkernels.DynamicTemperature):
        d = temperature
        valid = None if y64 is None else y64 != kw.get("ignore_index", -100)
        temperature = reference.dtd_temperature(s64, dense, d.tau0, d.beta, d.weighting,
                                                d.center, d.tau_min, valid=valid)
    elif isinstance(temperature, torch.Tensor):
        temperature = temperature.double().cpu()
    loss, stats = reference.distillation_loss(s64, t64, y64, temperature, reduction=reduction, **kw)
    (grad,) = torch.autograd.grad(loss, s64, upstream.double().cpu())
    return loss.detach(), grad, stats


def assert_matches(backend, s, t, y, reduction="none", **kw):
    loss, grad, stats, upstream = run(backend, s, t, y, reduction=reduction, **kw)
    ref_loss, ref_grad, ref_stats = oracle(s, t, y, upstream, reduction=reduction, **kw)
    dtype = s.dtype
    if backend == "triton" and dtype == torch.float64:
        dtype = torch.float32  # Triton accumulates in float32
    rtol, atol = tolerances(dtype)
    # the loss scales with T^2 and the logits; the gradient with T
    loss_scale = 1 + ref_loss.abs().max().item()
    grad_scale = 1 + ref_grad.abs().max().item()
    torch.testing.assert_close(loss.double().cpu(), ref_loss, rtol=rtol, atol=atol * loss_scale)
    assert grad.dtype == s.dtype and grad.shape == s.shape
    torch.testing.assert_close(grad.double().cpu(), ref_grad, rtol=rtol, atol=atol * grad_scale)
    torch.testing.assert_close(stats.temperature.double().cpu(), ref_stats["temperature"],
                               rtol=1e-5 if dtype != torch.float64 else 1e-9, atol=1e-6)
    if y is not None:
        assert torch.equal(stats.teacher_correct.cpu(), ref_stats["teacher_correct"])
        assert torch.equal(stats.still_wrong.cpu(), ref_stats["still_wrong"])
    return loss, grad, stats
