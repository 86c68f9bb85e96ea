"""What only real hardware can show: the Triton kernels compiled for the GPU at language-model
sizes, int64 offsets past 2^31 elements, torch.compile over the Triton op, no host syncs, and
training steps captured in CUDA graphs (torch.cuda.graphs, torch.compile "reduce-overhead").
The same math runs under the Triton interpreter in test_backends.py; these need CUDA."""
import pytest
import torch
from helpers import oracle, tolerances

import kdkernels
import kdkernels.functional as F
from kdkernels import DynamicTemperature

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _lm_inputs(N, C, dtype, seed, masked=False):
    """Random logits made on the GPU (the CPU generator is too slow at these sizes)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    s = (torch.randn(N, C, generator=g, device="cuda") * 3).to(dtype)
    t = (torch.randn(N, C, generator=g, device="cuda") * 3).to(dtype)
    y = torch.randint(0, C, (N,), generator=g, device="cuda")
    y[::7] = -100
    if masked:
        t[:, C - 1000:] = float("-inf")  # padded vocabulary
    return s, t, y


def _check_rows(rows, s, t, y, loss, grad, upstream, **kw):
    """The fused result on `rows` against the float64 oracle on those rows alone."""
    rtol, atol = tolerances(torch.float32 if s.dtype == torch.float64 else s.dtype)
    ref_loss, ref_grad, _ = oracle(s[rows], t[rows], y[rows], upstream[rows], **kw)
    loss_scale = 1 + ref_loss.abs().max().item()
    grad_scale = 1 + ref_grad.abs().max().item()
    torch.testing.assert_close(loss[rows].double().cpu(), ref_loss, rtol=rtol,
                               atol=atol * loss_scale)
    torch.testing.assert_close(grad[rows].double().cpu(), ref_grad, rtol=rtol,
                               atol=atol * grad_scale)


def _fused(s, t, y, **kw):
    student = s.detach().clone().requires_grad_()
    loss = kdkernels.distillation_loss(student, t, y, reduction="none", backend="triton", **kw)
    upstream = torch.rand(loss.shape, device="cuda", dtype=loss.dtype) + 0.5
    (grad,) = torch.autograd.grad(loss, student, upstream)
    return loss.detach(), grad, upstream


@pytest.mark.parametrize("N,C,dtype", [(4096, 32000, torch.bfloat16), (4096, 32000, torch.float32),
                                       (8192, 128256, torch.bfloat16)])
@pytest.mark.parametrize("correction,temperature", [(None, 4.0), ("swap", "cosine"),
                                                    ("rectify", 2.0)])
def test_language_model_shapes(N, C, dtype, correction, temperature):
    s, t, y = _lm_inputs(N, C, dtype, seed=N + C, masked=correction == "rectify")
    kw = dict(temperature=temperature, correction=correction, wrong_kd_weight=0.5)
    loss, grad, upstream = _fused(s, t, y, **kw)
    rows = torch.cat([torch.arange(64), torch.randint(0, N, (64,)), torch.arange(N - 64, N)])
    if temperature == "cosine":
        kw["temperature"] = DynamicTemperature()
    _check_rows(rows.cuda(), s, t, y, loss, grad, upstream, **kw)


def test_int64_offsets_past_2_31_elements():
    """16800 x 128256 bf16 holds 2.15e9 elements: the last rows start past 2^31."""
    N, C = 16800, 128256
    assert N * C > 2 ** 31
    s, t, y = _lm_inputs(N, C, torch.bfloat16, seed=1)
    loss, grad, upstream = _fused(s, t, y, temperature=2.0, correction="swap")
    first_past = 2 ** 31 // C + 1
    rows = torch.cat([torch.arange(first_past - 2, first_past + 30), torch.arange(N - 16, N)])
    _check_rows(rows.cuda(), s, t, y, loss, grad, upstream, temperature=2.0, correction="swap")


@pytest.mark.parametrize("dynamic", [False, True])
def test_torch_compile_fullgraph_training_step(dynamic):
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 1000).cuda()
    x = torch.randn(32, 64, device="cuda")
    t = torch.randn(32, 1000, device="cuda")
    y = torch.randint(0, 1000, (32,), device="cuda")

    def step(x, t, y):
        return F.preparing_lessons_loss(model(x), t, y, temperature="cosine", backend="triton")

    eager = step(x, t, y)
    eager.backward()
    eager_grad = model.weight.grad.clone()
    model.weight.grad = None
    compiled = torch.compile(step, fullgraph=True, dynamic=dynamic)
    loss = compiled(x, t, y)
    loss.backward()
    torch.testing.assert_close(loss, eager)
    torch.testing.assert_close(model.weight.grad, eager_grad)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("path", ["two_kernels", "small_rows"])
def test_no_host_sync_in_forward_and_backward(reduction, path):
    """rectify runs the two-kernel path; plain KD at 1000 classes the small-rows kernel (with
    the kernels' own mean or sum)."""
    s, t, y = _lm_inputs(256, 1000, torch.float32, seed=3)
    s.requires_grad_()
    temps = torch.rand(256, device="cuda") + 1
    correction = "rectify" if path == "two_kernels" else None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = F.distillation_loss(s, t, y, temperature=temps, correction=correction,
                                   reduction=reduction)
        loss.backward(torch.ones_like(loss))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert s.grad is not None and torch.isfinite(s.grad).all()


def _sparse_rows_oracle(s, teacher, y, upstream, rows, **kw):
    """The float64 oracle on `rows` of a sparse teacher (test_divergences does it at small C)."""
    import kdkernels.reference as R
    s64 = s[rows].double().cpu().requires_grad_()
    t64 = kdkernels.SparseTeacher(teacher.indices[rows].cpu(),
                                  teacher.values[rows].double().cpu(), teacher.tail)
    loss, _ = R.distillation_loss(s64, t64, y[rows].cpu(), kw.pop("temperature", 4.0),
                                  reduction="none", **kw)
    (grad,) = torch.autograd.grad(loss, s64, upstream[rows].double().cpu())
    return loss.detach(), grad


@pytest.mark.parametrize("k,tail,correction,divergence", [
    (128, True, "rectify", "kl"), (64, False, "swap", "kl"), (128, True, None, "jsd")])
def test_sparse_teachers_and_divergences_at_language_model_shapes(k, tail, correction,
                                                                  divergence):
    N, C = 4096, 32000
    s, t, y = _lm_inputs(N, C, torch.bfloat16, seed=k)
    values, indices = torch.log_softmax(t.float(), -1).topk(k, -1)
    teacher = kdkernels.SparseTeacher(indices, (values if tail else t.float().gather(1, indices)
                                                ).to(torch.bfloat16), tail)
    kw = dict(temperature=2.0, correction=correction, divergence=divergence)
    loss, grad, upstream = _fused(s, teacher, y, **kw)
    rows = torch.cat([torch.arange(64), torch.arange(N - 64, N)]).cuda()
    ref_loss, ref_grad = _sparse_rows_oracle(s, teacher, y, upstream, rows, **kw)
    rtol, atol = tolerances(torch.bfloat16)
    torch.testing.assert_close(loss[rows].double().cpu(), ref_loss, rtol=rtol,
                               atol=atol * (1 + ref_loss.abs().max().item()))
    torch.testing.assert_close(grad[rows].double().cpu(), ref_grad, rtol=rtol,
                               atol=atol * (1 + ref_grad.abs().max().item()))


def test_fused_linear_matches_full_logits_and_holds_less_memory():
    torch.manual_seed(0)
    N, H, V = 4096, 1024, 32000
    h = torch.randn(N, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    W = (torch.randn(V, H, device="cuda") / 16).to(torch.bfloat16).requires_grad_()
    ht = torch.randn(N, H, device="cuda", dtype=torch.bfloat16)
    Wt = (torch.randn(V, H, device="cuda") / 16).to(torch.bfloat16)
    y = torch.randint(0, V, (N,), device="cuda")

    def peak(fn):
        h.grad = W.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss = fn()
        loss.backward()
        torch.cuda.synchronize()
        used = torch.cuda.max_memory_allocated() - base
        return loss.detach(), h.grad.clone(), W.grad.clone(), used

    fused = peak(lambda: kdkernels.fused_linear_distillation_loss(h, W, ht, y, teacher_weight=Wt,
                                                                  correction="swap"))
    full = peak(lambda: kdkernels.distillation_loss(h @ W.t(), ht @ Wt.t(), y, correction="swap"))
    torch.testing.assert_close(fused[0], full[0], rtol=1e-3, atol=1e-3)
    for a, b in zip(fused[1:3], full[1:3]):
        torch.testing.assert_close(a.float(), b.float(), rtol=5e-2, atol=5e-3)
    assert fused[3] < 0.6 * full[3], (fused[3], full[3])


def test_no_host_sync_for_sparse_teachers_and_fused_linear():
    s, t, y = _lm_inputs(256, 1000, torch.float32, seed=4)
    s.requires_grad_()
    values, indices = torch.log_softmax(t, -1).topk(32, -1)
    W = torch.randn(1000, 64, device="cuda", requires_grad=True)
    h = torch.randn(256, 64, device="cuda", requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = F.distillation_loss(s, kdkernels.SparseTeacher(indices, values, tail=True), y,
                                   correction="swap", divergence="jsd")
        loss.backward()
        loss = F.fused_linear_distillation_loss(h, W, t, y, chunk_size=100)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(s.grad).all() and torch.isfinite(W.grad).all()


def _training_step(model, loss_fn):
    """One SGD step on a small classifier distilled from fixed teacher logits; returns the loss."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def step(x, t, y):
        optimizer.zero_grad(set_to_none=False)  # graphs replay into the same gradient buffers
        loss = loss_fn(model(x), t, y)
        loss.backward()
        optimizer.step()
        return loss
    return step


def _graph_inputs(seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(256, 64, generator=g, device="cuda")
    t = torch.randn(256, 100, generator=g, device="cuda") * 3
    y = torch.randint(0, 100, (256,), generator=g, device="cuda")
    y[::9] = -100
    return x, t, y


@pytest.mark.parametrize("loss_fn", [
    kdkernels.KDLoss(temperature=4.0),
    kdkernels.DistillationLoss(temperature="cosine", correction="swap", reduction="sum"),
    kdkernels.TeacherBiasLoss(gamma=0.3)], ids=["kd", "lessons-dtd-sum", "teacher-bias"])
def test_cuda_graph_capture_replays_a_training_step(loss_fn):
    """torch.cuda.graphs: the step captured once and replayed on new inputs copied into the
    static ones gives the losses and weights of the same steps run eagerly."""
    torch.manual_seed(0)
    eager_model = torch.nn.Linear(64, 100).cuda()
    graph_model = torch.nn.Linear(64, 100).cuda()
    graph_model.load_state_dict(eager_model.state_dict())
    eager_step = _training_step(eager_model, loss_fn)
    graph_step = _training_step(graph_model, loss_fn)
    static = [x.clone() for x in _graph_inputs(0)]
    side = torch.cuda.Stream()  # warm-up on a side stream, as the CUDA graphs docs ask
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            graph_step(*static)
    torch.cuda.current_stream().wait_stream(side)
    for _ in range(3):  # the eager model takes the same three warm-up steps
        eager_step(*static)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = graph_step(*static)
    for seed in range(1, 4):
        inputs = _graph_inputs(seed)
        for buffer, value in zip(static, inputs):
            buffer.copy_(value)
        graph.replay()
        eager_loss = eager_step(*inputs)
        torch.testing.assert_close(static_loss, eager_loss)
        torch.testing.assert_close(graph_model.weight, eager_model.weight)


def test_compile_reduce_overhead_replays_a_training_step():
    """torch.compile(mode="reduce-overhead") (CUDA graphs under inductor) of the loss, with its
    backward: the same losses and gradients as eager on every call, and no step left out of
    the CUDA graphs."""
    from torch._dynamo.utils import counters
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 100).cuda()
    loss_fn = kdkernels.KDLoss(temperature=4.0, backend="triton")
    compiled = torch.compile(lambda x, t, y: loss_fn(model(x), t, y), mode="reduce-overhead",
                             fullgraph=True)
    counters.clear()
    for seed in range(5):
        inputs = _graph_inputs(seed)
        model.zero_grad(set_to_none=True)
        eager = loss_fn(model(inputs[0]), *inputs[1:])
        eager.backward()
        eager_grad = model.weight.grad.clone()
        model.zero_grad(set_to_none=True)
        loss = compiled(*inputs)
        loss.backward()
        torch.testing.assert_close(loss.detach().clone(), eager.detach())
        torch.testing.assert_close(model.weight.grad, eager_grad)
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])


@pytest.fixture
def one_rank_group():
    """A one-rank nccl group (vocab-parallel over one GPU: the whole vocabulary one shard)."""
    import socket

    import torch.distributed as dist
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("options", [dict(), dict(correction="swap", divergence="jsd"),
                                     dict(temperature=1e3)])
def test_vocab_parallel_on_the_triton_shard_kernels(one_rank_group, dtype, options):
    """CUDA tensors run the Triton shard entry points (the whole vocabulary one rank's
    shard): loss and gradient against the float64 oracle, no host sync in the forward and the
    backward (the ranks' header is not read on the host there)."""
    s, t, y = _lm_inputs(512, 32000, dtype, seed=7)
    student = s.detach().clone().requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = kdkernels.vocab_parallel_distillation_loss(student, t, y, vocab_start=0,
                                                          vocab_size=32000, reduction="none",
                                                          **options)
        upstream = torch.rand(loss.shape, device="cuda", dtype=loss.dtype) + 0.5
        (grad,) = torch.autograd.grad(loss, student, upstream)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    temperature = options.pop("temperature", 4.0)
    _check_rows(slice(0, 64), s, t, y, loss.detach(), grad, upstream, temperature=temperature,
                **options)


def test_vocab_parallel_ranks_checked_one_call_late_on_the_gpu(one_rank_group):
    """On CUDA tensors the ranks' header is not read at the call (that would sync): a
    disagreement (here one rank whose shard does not cover the vocabulary) makes that call's
    loss NaN, and the next call raises; the header's copy to the host costs no sync."""
    s, t, y = _lm_inputs(64, 1000, torch.float32, seed=3)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = kdkernels.vocab_parallel_distillation_loss(
            s[:, :999], t[:, :999], y.clamp(max=998), vocab_start=0, vocab_size=1000)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isnan(loss).item()
    with pytest.raises(ValueError, match="do not tile.*previous call"):
        kdkernels.vocab_parallel_distillation_loss(s, t, y, vocab_start=0, vocab_size=1000)
    loss = kdkernels.vocab_parallel_distillation_loss(s, t, y, vocab_start=0, vocab_size=1000)
    assert torch.isfinite(loss).item()
