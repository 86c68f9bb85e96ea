"""The backends' shard entry points (kdkernels/_options.py, SHARD_STATS / SHARD_ROWS): the C++
and Triton kernels' shard_statistics and shard_pass against the torch backend's on random
ranges of rows,
every correction and divergence, CE on and off, a virtual teacher, -inf teacher logits, labels
inside and outside the range, ignored and bad rows, float64 / float32 / bfloat16, strided rows.
(The vocab-parallel tests check the composition against the float64 oracle.)"""
import math

import pytest
import torch
from helpers import BACKENDS

import kdkernels
from kdkernels._core import fused_options
from kdkernels._options import CORRECTION_RECTIFY, SHARD_ROWS, SHARD_STATS, TEMP_ROWS
from kdkernels.ops import cpp_distill, torch_distill, triton_distill

KERNELS = {"cpp": cpp_distill, "triton": triton_distill}
SHARD_BACKENDS = [(name, device) for name, device in BACKENDS if name in KERNELS]
SHARD_IDS = [f"{name}-{device}" for name, device in SHARD_BACKENDS]

HYPER = dict(kd_weight=0.9, ce_weight=0.1, wrong_kd_weight=0.3, correction=None, smooth_eps=0.1,
             virtual_teacher=None, t2_scale=True, divergence="kl", jsd_beta=0.5, skew_alpha=0.2,
             ignore_index=-100)
CASES = [
    dict(),
    dict(correction="swap"),
    dict(correction="rectify", ce_weight=0.0),
    dict(correction="smooth"),
    dict(divergence="jsd", correction="swap"),
    dict(divergence="reverse_kl", correction="rectify"),
    dict(divergence="tv", correction="smooth"),
    dict(divergence="skew_reverse_kl"),
    dict(divergence="skew_kl", virtual_teacher=0.9),
]


def _options(case):
    return fused_options(dict(HYPER, **case), (TEMP_ROWS, 0.0, None, None), True, 1.0, False)


def _shard(seed, dtype, wide=False, n=11):
    """Rows of a range of 17 columns, or (wide) of 700: several of the C++ kernel's chunks
    (256 or 128 columns), with maxima that move from chunk to chunk, a teacher tied across
    chunks, a teacher with no finite logit before the third chunk and a label in the last."""
    V, start, width = (1000, 130, 700) if wide else (40, 13, 17)
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(n, V, generator=g, dtype=torch.float64) * 3)
    t = (torch.randn(n, V, generator=g, dtype=torch.float64) * 3)
    t = t.masked_fill(torch.rand(n, V, generator=g) < 0.2, -math.inf)
    t[0] = -math.inf  # a row without a teacher in this range
    y = torch.randint(0, V, (n,), generator=g)
    y[1], y[2], y[3], y[4] = start, start + width - 1, -100, start - 1  # edges, ignored, outside
    if wide:
        ramp = torch.linspace(-6, 6, width, dtype=torch.float64)
        s[8, start:start + width] += ramp  # maxima that move in every chunk
        t[8, start:start + width] += ramp
        y[8] = start + 650
        t[9, start:start + 300] = -math.inf
        t[10, start + 40] = t[10, start + 600] = 20.0  # the first maximum is the one to find
    s, t = s.to(dtype), t.to(dtype)
    temps = torch.rand(n, generator=g, dtype=torch.float64) * 5 + 0.5
    temps[7:10] = torch.tensor([1.0, 4.0, 8.0], dtype=torch.float64)  # CE from exp(./T)^T
    return s[:, start:start + width], t[:, start:start + width], y, temps, start, V


def _rows(stats, temps, y, start, seed):
    """Merged values of the shape shard_pass reads, from one range's statistics."""
    g = torch.Generator().manual_seed(seed)
    n = stats.shape[0]
    col = dict(zip(SHARD_STATS, stats.unbind(1)))
    has_teacher = col["mt"] > -math.inf
    values = dict(
        T=temps, ms=col["ms"], log_zs=torch.log(col["zs"]) + 0.3,
        mt=torch.where(has_teacher, col["mt"], 0.0), log_zt=torch.log(col["zt"]) + 0.2,
        z1=col["z1"] + 1.0, kd_grad=torch.where(has_teacher, 0.9 * temps, 0.0),
        b=col["b"], lr_y=torch.full((n,), -1.5, dtype=torch.float64),
        lr_b=torch.full((n,), -0.7, dtype=torch.float64),
        g_mean=torch.rand(n, generator=g, dtype=torch.float64),
        scale=torch.rand(n, generator=g, dtype=torch.float64) + 0.5,
        fix_y=(torch.arange(n) % 2 == 0).double(), fix_b=(torch.arange(n) % 3 == 0).double(),
        smoothed=(torch.arange(n) % 4 == 1).double(), has_teacher=has_teacher.double())
    values["scale"][5] = 0.0  # a row that does not count
    values["scale"][6] = math.nan  # a bad row
    return torch.stack([values[name] for name in SHARD_ROWS], -1)


@pytest.mark.parametrize("high_t", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("wide", [False, True], ids=["17", "700"])
@pytest.mark.parametrize("backend,device", SHARD_BACKENDS, ids=SHARD_IDS)
def test_kernel_shard_entry_points_match_the_torch_backend(backend, device, wide, case, dtype,
                                                           high_t):
    """float64 math (float64 inputs, or a temperature above 8) matches to 1e-12; float math
    (16/32-bit inputs, every temperature <= 8) to float32 rounding. Triton runs float math
    per row (the row at T = 50 in float64, the others in float32); C++ per call."""
    o = _options(CASES[case])
    kernel = KERNELS[backend]
    s, t, y, temps, start, V = (x.to(device) if isinstance(x, torch.Tensor) else x
                                for x in _shard(case, dtype, wide))
    if high_t:
        temps[10] = 50.0
    exact = dtype == torch.float64 or (high_t and backend == "cpp")
    tight = dict(rtol=1e-12, atol=1e-12) if exact else dict(rtol=2e-6, atol=2e-6)
    teacher = None if CASES[case].get("virtual_teacher") else t
    args = (s, teacher, y)
    want = torch_distill.shard_statistics(*args, temps, start, V, o)
    got = kernel.shard_statistics(*args, temps, start, V, o)
    assert got.dtype == torch.float64 and got.shape == (s.shape[0], len(SHARD_STATS))
    idx1, tx1, tx2 = (SHARD_STATS.index(name) for name in ("idx1", "tx1", "tx2"))
    unset = want[:, tx1] == -math.inf  # no finite value: any column id serves
    got[unset, idx1] = want[unset, idx1]
    tied = ~unset & (want[:, tx1] == want[:, tx2])  # any column that holds the largest
    if o.correction == CORRECTION_RECTIFY and tied.any():
        rows_tied = tied.nonzero()[:, 0]
        held = t[rows_tied, got[rows_tied, idx1].long() - start].double()
        torch.testing.assert_close(held, want[rows_tied, tx1], rtol=0, atol=0)
        got[tied, idx1] = want[tied, idx1]
    if not exact:  # a sum of logits: float rounding of the sum of their magnitudes
        col = SHARD_STATS.index("s_sum")
        bound = 2e-6 * s.double().abs().sum(1).clamp(min=1)
        assert ((got[:, col] - want[:, col]).abs() <= bound).all()
        got[:, col] = want[:, col]
    torch.testing.assert_close(got, want, **tight, equal_nan=True)
    rows = _rows(want.cpu(), temps.cpu(), y, start, case).to(device)
    for grad in (True, False) if o.divergence != 0 else (True,):  # sums: not for the KL
        want = torch_distill.shard_pass(*args, rows, start, V, o, grad)
        got = kernel.shard_pass(*args, rows, start, V, o, grad)
        assert got.dtype == want.dtype and got.shape == want.shape
        if grad:
            assert got.dtype == dtype and torch.isnan(got[6]).all() and (got[5] == 0).all()
        if grad:  # written over the logits (the lm_head's chunks)
            logits = s.clone()
            over = kernel.shard_pass(logits, teacher, y, rows, start, V, o, overwrite=True)
            assert over.data_ptr() == logits.data_ptr()
            torch.testing.assert_close(over, got, rtol=0, atol=0, equal_nan=True)
        if not grad:  # sum p G of a row without a teacher: unread (its KD weight is 0)
            no_teacher = rows[:, SHARD_ROWS.index("has_teacher")] == 0
            got[no_teacher, 1] = want[no_teacher, 1] = 0.0
        tol = tight if got.dtype != torch.bfloat16 else {}
        torch.testing.assert_close(got, want, **tol, equal_nan=True)


def test_vocab_parallel_on_the_torch_backend_in_chunks_matches_the_oracle(monkeypatch):
    """The composition as CUDA tensors run it (the torch backend's entry points), in chunks of
    7 rows, on a one-rank group: loss and gradient against the float64 oracle."""
    import socket

    import torch.distributed as dist

    import kdkernels.reference as R
    from kdkernels import _vocab_parallel
    monkeypatch.setattr(_vocab_parallel.ops, "resolve", lambda name, device: torch_distill)
    monkeypatch.setattr(_vocab_parallel._Rows, "chunks",
                        lambda self: [(i, min(i + 7, self.N)) for i in range(0, self.N, 7)])
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        for options in (dict(correction="rectify"), dict(divergence="jsd", reduction="sum")):
            g = torch.Generator().manual_seed(3)
            s = torch.randn(20, 31, generator=g, dtype=torch.float64, requires_grad=True)
            t = torch.randn(20, 31, generator=g, dtype=torch.float64)
            y = torch.randint(0, 31, (20,), generator=g)
            y[4] = -100
            loss = kdkernels.vocab_parallel_distillation_loss(s, t, y, vocab_start=0,
                                                              vocab_size=31, **options)
            ref = R.distillation_loss(s, t, y, 4.0, **options)[0]
            torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
            for got, want in zip(torch.autograd.grad(loss, s), torch.autograd.grad(ref, s)):
                torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    finally:
        dist.destroy_process_group()
