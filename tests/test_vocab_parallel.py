"""Vocab-parallel distillation in 2 and 4 CPU processes (gloo): loss and each rank's gradient
against the unsharded float64 oracle, with uneven shards, ignored rows, -inf teacher logits,
labels on every rank; one collective per forward and none in the backward, counted."""
import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import kdkernels
import kdkernels.reference as R
from kdkernels import DynamicTemperature

V = 23
SPLITS = {2: [0, 9, 23], 4: [0, 5, 11, 18, 23]}  # uneven shards

CASES = [  # (name, loss options, expected collectives in the forward)
    ("kl", dict(), 1),
    ("kl-swap-rows-sum", dict(correction="swap", temperature="rows", reduction="sum"), 1),
    ("kl-rectify-none", dict(correction="rectify", wrong_kd_weight=0.3, reduction="none"), 1),
    ("kl-smooth-cosine", dict(correction="smooth", temperature=DynamicTemperature(
        tau0=3.0, beta=1.5)), 2),
    ("jsd-swap-maxprob-centred", dict(divergence="jsd", jsd_beta=0.3, correction="swap",
                                      temperature=DynamicTemperature(
                                          tau0=5.0, beta=0.1, weighting="max_prob", center=True),
                                      masked=False), 3),
    ("reverse-kl-rectify", dict(divergence="reverse_kl", correction="rectify", masked=False), 2),
    ("tv-smooth", dict(divergence="tv", correction="smooth"), 2),
    ("skew-kl-t2-off", dict(divergence="skew_kl", skew_alpha=0.2, t2_scale=False), 2),
    ("virtual", dict(virtual_teacher=0.9, temperature=3.0), 1),
    ("no-labels", dict(labels=False, ce_weight=0.0), 1),
    ("bf16-3d", dict(dtype=torch.bfloat16, shape=(2, 6), correction="swap"), 1),
]


def _inputs(options, seed):
    g = torch.Generator().manual_seed(seed)
    lead = options.get("shape", (12,))
    s = torch.randn(*lead, V, generator=g, dtype=torch.float64) * 3
    t = torch.randn(*lead, V, generator=g, dtype=torch.float64) * 3
    if options.get("masked", True):  # masked classes, never a whole row
        mask = torch.rand(*lead, V, generator=g) < 0.2
        mask[..., 0] = False
        t = t.masked_fill(mask, float("-inf"))
    y = torch.randint(0, V, lead, generator=g)
    flat = y.reshape(-1)
    for k, start in enumerate(SPLITS[4][:-1]):  # a label in every rank's shard
        flat[k] = start
    flat[-1] = -100  # an ignored row
    temp = (torch.rand(lead, generator=g, dtype=torch.float64) * 3 + 0.5)
    return s, t, y, temp


def _case_kwargs(options):
    kw = {k: v for k, v in options.items() if k not in ("masked", "dtype", "shape", "labels")}
    return kw


def _reference(s, t, y, temp, options):
    """The unsharded loss in float64 and its gradient, for an upstream gradient `up`."""
    kw = _case_kwargs(options)
    reduction = kw.pop("reduction", "mean")
    temperature = kw.pop("temperature", 4.0)
    virtual = kw.pop("virtual_teacher", None)
    C = s.shape[-1]
    s2 = s.reshape(-1, C).clone().requires_grad_()
    t2 = None if virtual is not None else t.reshape(-1, C)
    y2 = y.reshape(-1) if y is not None else None
    if isinstance(temperature, DynamicTemperature):
        d = temperature
        valid = y2 != -100 if y2 is not None else None
        temperature = R.dtd_temperature(s2, t2, d.tau0, d.beta, d.weighting, d.center, d.tau_min,
                                        valid=valid)
    elif isinstance(temperature, str):
        temperature = temp.reshape(-1)
    loss, stats = R.distillation_loss(s2, t2, y2, temperature, reduction=reduction,
                                      virtual_teacher=virtual, **kw)
    return s2, loss, stats, temperature


def _worker(rank, world, port, failures, backend):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    if backend == "triton":  # the Triton kernels' entry points, as CUDA tensors run them
        from kdkernels import ops
        from kdkernels.ops import triton_distill
        ops.resolve = lambda name, device: triton_distill
    import datetime
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=120))
    calls = {"n": 0}
    for name in ("all_gather", "all_reduce", "all_gather_into_tensor", "broadcast"):
        original = getattr(dist, name)

        def counted(*args, _original=original, **kwargs):
            calls["n"] += 1
            return _original(*args, **kwargs)
        setattr(dist, name, counted)
    start, end = SPLITS[world][rank], SPLITS[world][rank + 1]
    case = None
    try:
        for index, (case, options, expected) in enumerate(CASES):
            s, t, y, temp = _inputs(options, seed=index)
            if not options.get("labels", True):
                y = None
            dtype = options.get("dtype", torch.float64)
            kw = _case_kwargs(options)
            if kw.get("temperature") == "rows":
                kw["temperature"] = temp.to(dtype)
            teacher = None if "virtual_teacher" in kw else t[..., start:end].to(dtype)
            shard = s[..., start:end].to(dtype).clone().requires_grad_()
            calls["n"] = 0
            loss, stats = kdkernels.vocab_parallel_distillation_loss(
                shard, teacher, y, vocab_start=start, vocab_size=V, return_stats=True, **kw)
            forward_calls = calls["n"]
            up = torch.rand(loss.shape, generator=torch.Generator().manual_seed(5),
                            dtype=loss.dtype) + 0.5
            calls["n"] = 0
            (grad,) = torch.autograd.grad(loss, shard, up)
            backward_calls = calls["n"]
            s_ref, ref, ref_stats, _ = _reference(s, t, y, temp, options)
            (ref_grad,) = torch.autograd.grad(ref, s_ref, up.double().reshape(ref.shape))
            ref_grad = ref_grad.reshape(s.shape)[..., start:end]
            tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(
                rtol=1e-9, atol=1e-10)
            torch.testing.assert_close(loss.double().reshape(ref.shape), ref, **tol)
            torch.testing.assert_close(grad.double(), ref_grad, **tol)
            torch.testing.assert_close(stats.temperature.double().reshape(-1),
                                       ref_stats["temperature"].reshape(-1), rtol=1e-6, atol=1e-7)
            if y is not None:
                assert torch.equal(stats.teacher_correct.reshape(-1), ref_stats["teacher_correct"])
                assert torch.equal(stats.still_wrong.reshape(-1), ref_stats["still_wrong"])
            assert forward_calls == expected, f"{case}: {forward_calls} collectives in forward"
            assert backward_calls == 0, f"{case}: {backward_calls} collectives in backward"
        for divergence in ("kl", "jsd", "tv"):  # float32 logits up to T = 1e4
            for temperature in (100.0, 1e3, 1e4):
                case = f"{divergence}-fp32-T={temperature:g}"
                _high_temperature_case(divergence, temperature, start, end)
        for index, linear_case in enumerate(LINEAR_CASES):
            case, options, expected = linear_case  # `case` names the failure in the report
            _linear_case(options, expected, start, end, index, calls)
        # shards that do not tile the vocabulary are refused, on every rank alike
        s, t, y, _ = _inputs({}, seed=99)
        with_gap = end - (1 if rank == 0 else 0)
        try:
            kdkernels.vocab_parallel_distillation_loss(s[:, start:with_gap], t[:, start:with_gap],
                                                       y, vocab_start=start, vocab_size=V)
            raise AssertionError("a gap between shards was accepted")
        except ValueError as error:
            assert "do not tile" in str(error)
    except Exception:  # noqa: BLE001 -- reported by the parent with the rank
        failures.put(f"rank {rank}/{world}, case {case!r}:\n{traceback.format_exc()}")
    finally:
        dist.destroy_process_group()


def _high_temperature_case(divergence, temperature, start, end):
    """float32 logits at a high temperature, where a KL merged from per-shard float32 sums
    lost its digits (7.2e-5 relative at T = 100): the loss within float32 rounding of the
    float64 oracle of the same values, the gradient too."""
    g = torch.Generator().manual_seed(int(temperature))
    s = (torch.randn(12, V, generator=g) * 2).double()
    t = (torch.randn(12, V, generator=g) * 2).float().double()
    y = torch.randint(0, V, (12,), generator=g)
    s32 = s.float().double().requires_grad_()
    ref = R.distillation_loss(s32, t, y, temperature, divergence=divergence)[0]
    (ref_grad,) = torch.autograd.grad(ref, s32)
    shard = s32.detach()[:, start:end].float().requires_grad_()
    loss = kdkernels.vocab_parallel_distillation_loss(
        shard, t[:, start:end].float(), y, vocab_start=start, vocab_size=V,
        temperature=temperature, divergence=divergence)
    (grad,) = torch.autograd.grad(loss, shard)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=0)
    scale = ref_grad.abs().max()
    torch.testing.assert_close(grad.double() / scale, ref_grad[:, start:end] / scale, rtol=0,
                               atol=1e-6)


LINEAR_CASES = [  # the fused linear form: hidden states and each rank's rows of the lm_head
    ("linear-kl-hidden", dict(teacher="hidden", chunk_size=5), 1),
    ("linear-swap-none-logits", dict(teacher="logits", correction="swap", reduction="none",
                                     chunk_size=4), 1),
    ("linear-jsd-centred", dict(teacher="hidden", divergence="jsd", temperature=DynamicTemperature(
        tau0=3.0, beta=2.0, center=True)), 3),
]


def _linear_case(options, expected, start, end, seed, calls):
    g = torch.Generator().manual_seed(100 + seed)
    N, H, Ht = 12, 6, 5
    h = torch.randn(N, H, generator=g, dtype=torch.float64)
    W = torch.randn(V, H, generator=g, dtype=torch.float64)
    b = torch.randn(V, generator=g, dtype=torch.float64)
    ht = torch.randn(N, Ht, generator=g, dtype=torch.float64)
    Wt = torch.randn(V, Ht, generator=g, dtype=torch.float64)
    y = torch.randint(0, V, (N,), generator=g)
    y[0] = -100
    kw = {k: v for k, v in options.items() if k != "teacher"}
    leaves = [x.clone().requires_grad_() for x in (h, W[start:end], b[start:end])]
    if options["teacher"] == "hidden":
        teacher = dict(teacher=ht, teacher_weight=Wt[start:end])
    else:
        teacher = dict(teacher=(ht @ Wt.t())[:, start:end])
    calls["n"] = 0
    loss = kdkernels.vocab_parallel_fused_linear_distillation_loss(
        leaves[0], leaves[1], target=y, student_bias=leaves[2], vocab_start=start, vocab_size=V,
        **teacher, **kw)
    assert calls["n"] == expected, f"{calls['n']} collectives in the forward"
    up = torch.rand(loss.shape, generator=torch.Generator().manual_seed(6),
                    dtype=loss.dtype) + 0.5
    calls["n"] = 0
    grads = torch.autograd.grad(loss, leaves, up)
    assert calls["n"] == 0, f"{calls['n']} collectives in the backward"
    full = [x.clone().requires_grad_() for x in (h, W, b)]
    reduction = kw.pop("reduction", "mean")
    temperature = kw.pop("temperature", 4.0)
    kw.pop("chunk_size", None)
    logits = full[0] @ full[1].t() + full[2]
    t_full = ht @ Wt.t()
    if isinstance(temperature, DynamicTemperature):
        d = temperature
        temperature = R.dtd_temperature(logits, t_full, d.tau0, d.beta, d.weighting, d.center,
                                        d.tau_min, valid=y != -100)
    ref = R.distillation_loss(logits, t_full, y, temperature, reduction=reduction, **kw)[0]
    ref_grads = torch.autograd.grad(ref, full, up)
    torch.testing.assert_close(loss, ref, rtol=1e-9, atol=1e-10)
    grad_h = grads[0].clone()
    dist.all_reduce(grad_h)  # each rank's part of the hidden states' gradient: their sum
    torch.testing.assert_close(grad_h, ref_grads[0], rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(grads[1], ref_grads[1][start:end], rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(grads[2], ref_grads[2][start:end], rtol=1e-9, atol=1e-10)


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("world,backend", [(2, "cpp"), (4, "cpp"), (2, "triton")])
def test_sharded_loss_and_gradients_match_the_unsharded_oracle(world, backend):
    """The C++ kernel's shard entry points (CPU tensors), and Triton's (CUDA tensors; here
    under the interpreter)."""
    if not kdkernels.backends()[backend].available:
        pytest.skip(f"{backend}: {kdkernels.backends()[backend].reason}")
    context = mp.get_context("spawn")
    failures = context.SimpleQueue()
    # the workers load the Triton kernels only where they run them (the interpreter is slow)
    env_interpret = None if backend == "triton" else os.environ.pop("TRITON_INTERPRET", None)
    try:
        mp.start_processes(_worker, args=(world, _free_port(), failures, backend), nprocs=world,
                           start_method="spawn")
    finally:
        if env_interpret is not None:
            os.environ["TRITON_INTERPRET"] = env_interpret
    errors = []
    while not failures.empty():
        errors.append(failures.get())
    assert not errors, "\n".join(errors)


def test_the_fused_form_budgets_its_chunks_for_the_kernels_overwriting_their_logits(
        monkeypatch):
    """Under one memory budget the C++ kernel, which writes each chunk's gradient over its
    logits, gets chunks of twice the rows the torch backend (a new gradient tensor) gets, and
    its gradients are those of the torch backend."""
    from kdkernels import _vocab_parallel, ops
    from kdkernels.ops import cpp_distill, torch_distill
    if not kdkernels.backends()["cpp"].available:
        pytest.skip(f"cpp: {kdkernels.backends()['cpp'].reason}")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0,
                            world_size=1)
    try:
        g = torch.Generator().manual_seed(5)
        h = torch.randn(40, 16, generator=g, dtype=torch.float64, requires_grad=True)
        W = torch.randn(50, 16, generator=g, dtype=torch.float64, requires_grad=True)
        t = torch.randn(40, 50, generator=g, dtype=torch.float64)
        y = torch.randint(0, 50, (40,), generator=g)
        results = {}
        for backend in (cpp_distill, torch_distill):
            widths, original = [], backend.shard_pass

            def counting(student, *args, _original=original, _widths=widths, **kwargs):
                _widths.append(student.shape[0])
                return _original(student, *args, **kwargs)
            monkeypatch.setattr(backend, "shard_pass", counting)
            monkeypatch.setattr(_vocab_parallel.ops, "resolve", lambda name, device, b=backend: b)
            loss = kdkernels.vocab_parallel_fused_linear_distillation_loss(
                h, W, t, y, vocab_start=0, vocab_size=50, memory_budget=8 * 50 * 2 * 5)
            grads = torch.autograd.grad(loss, (h, W))
            results[backend.__name__] = (widths, loss, grads)
        monkeypatch.setattr(_vocab_parallel.ops, "resolve", ops.resolve)
        cpp_widths, cpp_loss, cpp_grads = results[cpp_distill.__name__]
        torch_widths, torch_loss, torch_grads = results[torch_distill.__name__]
        assert max(cpp_widths) == 10 and max(torch_widths) == 5  # 2 buffers of 8 x 50 per row
        torch.testing.assert_close(cpp_loss, torch_loss, rtol=1e-12, atol=1e-12)
        for a, b in zip(cpp_grads, torch_grads):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    finally:
        dist.destroy_process_group()


def test_bad_input_is_refused_before_any_collective():
    s = torch.zeros(3, 5)
    y = torch.tensor([0, 4, 9])
    F = kdkernels.vocab_parallel_distillation_loss
    cases = [
        (dict(vocab_start=8, vocab_size=10), "shard \\[8, 13\\) is not inside"),
        (dict(vocab_start=0.5, vocab_size=10), "vocab_start must be an int"),
        (dict(vocab_start=0, vocab_size=10, teacher=torch.zeros(3, 4)), "fewer than the 5"),
        (dict(vocab_start=0, vocab_size=10, teacher=torch.zeros(2, 5)), "does not match"),
        (dict(vocab_start=0, vocab_size=10,
              teacher=kdkernels.SparseTeacher(torch.zeros(3, 2, dtype=torch.long),
                                              torch.zeros(3, 2))), "SparseTeacher is not"),
        (dict(vocab_start=0, vocab_size=10, target=torch.tensor([0, 4, 10])),
         "outside \\[0, 10\\)"),
        (dict(vocab_start=0, vocab_size=10, divergence="hellinger"), "divergence must be"),
        (dict(vocab_start=0, vocab_size=10), "torch.distributed"),
    ]
    for kwargs, message in cases:
        teacher = kwargs.pop("teacher", torch.zeros(3, 5))
        target = kwargs.pop("target", y)
        with pytest.raises((TypeError, ValueError, RuntimeError), match=message):
            F(s, teacher, target, **kwargs)


MISMATCHES = [  # (name, rank 0's changes, rank 1's changes, what the error names)
    ("temperature", dict(), dict(temperature=3.0), "temperature"),
    ("labels", dict(), dict(label_shift=1), "labels checksum"),
    ("divergence", dict(), dict(divergence="jsd"), "options"),
    ("row-count", dict(), dict(rows=13), "row count"),
    ("row-count-above-first-rows", dict(rows=300), dict(), "row count"),
    ("no-rows-on-one-rank", dict(rows=0), dict(), "row count"),
    ("dtd-on-one-rank", dict(temperature=DynamicTemperature()), dict(), "options"),
    ("row-temperatures", dict(temperature="rows"), dict(temperature="rows", temp_shift=0.5),
     "temperature checksum"),
    ("linear-temperature", dict(linear=True), dict(linear=True, temperature=2.0),
     "temperature"),
    ("int-and-float-agree", dict(temperature=4, kd_weight=1), dict(temperature=4.0, kd_weight=1.0),
     None),
]


def _mismatch_worker(rank, world, port, results):
    import datetime
    import time
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    start, end = SPLITS[world][rank], SPLITS[world][rank + 1]
    try:
        for name, *changes, _ in MISMATCHES + [("agreeing", {}, {}, None)]:
            kw = dict(changes[min(rank, 1)])
            N = kw.pop("rows", 12)
            g = torch.Generator().manual_seed(7)
            s = torch.randn(N, V, generator=g, dtype=torch.float64)
            t = torch.randn(N, V, generator=g, dtype=torch.float64)
            y = torch.randint(0, V, (N,), generator=g)
            if kw.pop("label_shift", 0) and N:
                y[N // 2] = (y[N // 2] + 1) % V
            temp_shift = kw.pop("temp_shift", 0.0)
            if kw.get("temperature") == "rows":
                kw["temperature"] = torch.linspace(1, 3, N, dtype=torch.float64) + temp_shift
            began = time.monotonic()
            try:
                if kw.pop("linear", False):
                    W = torch.randn(V, 4, generator=g, dtype=torch.float64)
                    h = torch.randn(N, 4, generator=g, dtype=torch.float64)
                    kdkernels.vocab_parallel_fused_linear_distillation_loss(
                        h, W[start:end], t[:, start:end], y, vocab_start=start, vocab_size=V,
                        **kw)
                else:
                    kdkernels.vocab_parallel_distillation_loss(
                        s[:, start:end].requires_grad_(), t[:, start:end], y, vocab_start=start,
                        vocab_size=V, **kw)
                outcome = "no error"
            except ValueError as error:
                outcome = str(error)
            results.put((name, rank, outcome, time.monotonic() - began))
        _deferred_check(rank, start, end, results)
    except Exception:  # noqa: BLE001 -- reported by the parent with the rank
        results.put(("crash", rank, traceback.format_exc(), 0.0))
    finally:
        dist.destroy_process_group()


def _deferred_check(rank, start, end, results):
    """The device path (the header not read on the host at the call): rank 1 passes another
    temperature; that call's loss is NaN without an error, the next call raises on every rank,
    the one after runs."""
    from kdkernels import _vocab_parallel
    g = torch.Generator().manual_seed(8)
    s = torch.randn(12, V, generator=g, dtype=torch.float64)
    t = torch.randn(12, V, generator=g, dtype=torch.float64)
    y = torch.randint(0, V, (12,), generator=g)
    on_host = _vocab_parallel._host_scalars
    _vocab_parallel._host_scalars = lambda tensor: False
    try:
        for step, temperature in enumerate([4.0 if rank == 0 else 3.0, 4.0, 4.0]):
            try:
                loss = kdkernels.vocab_parallel_distillation_loss(
                    s[:, start:end], t[:, start:end], y, vocab_start=start, vocab_size=V,
                    temperature=temperature)
                outcome = f"loss {float(loss)}"
            except ValueError as error:
                outcome = str(error)
            results.put((f"deferred-{step}", rank, outcome, 0.0))
    finally:
        _vocab_parallel._host_scalars = on_host


def test_ranks_that_disagree_raise_the_same_error_on_every_rank():
    """Different temperature, labels, divergence, row count (also 0 rows, and above the rows
    that ride in the first collective), DTD on one rank only, different per-row temperatures:
    every rank raises the same ValueError within seconds, and the group stays usable."""
    world = 2
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    mp.start_processes(_mismatch_worker, args=(world, _free_port(), results), nprocs=world,
                       start_method="spawn")
    got = {}
    while not results.empty():
        name, rank, outcome, seconds = results.get()
        assert name != "crash", outcome
        got.setdefault(name, {})[rank] = (outcome, seconds)
    for name, _, _, names in MISMATCHES:
        (first, t0), (second, t1) = got[name][0], got[name][1]
        assert first == second, f"{name}: rank 0 said {first!r}, rank 1 {second!r}"
        if names is None:  # the same options, spelt differently
            assert first == "no error", f"{name}: {first!r}"
            continue
        assert "disagree on" in first and names in first, f"{name}: {first!r}"
        assert max(t0, t1) < 10, f"{name}: took {max(t0, t1):.1f} s"
    assert got["agreeing"][0][0] == got["agreeing"][1][0] == "no error"
    # the device path: NaN at the call, the error on every rank at the next, then back to work
    outcomes = [(got[f"deferred-{k}"][0][0], got[f"deferred-{k}"][1][0]) for k in range(3)]
    assert outcomes[0] == ("loss nan", "loss nan"), outcomes[0]
    assert outcomes[1][0] == outcomes[1][1], outcomes[1]
    assert "disagree on temperature" in outcomes[1][0] and "previous call" in outcomes[1][0]
    assert outcomes[2][0] == outcomes[2][1] and outcomes[2][0].startswith("loss ") \
        and outcomes[2][0] != "loss nan", outcomes[2]
