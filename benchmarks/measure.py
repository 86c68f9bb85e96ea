"""What the benchmarks measure and how: the inputs, the grid of cases, timing (CPU medians of
repetitions; triton.testing.do_bench on the GPU), peak memory (a child process per case on the
CPU, torch.cuda.max_memory_allocated on the GPU) and bandwidth against a measured copy.

`python -m benchmarks.measure SPEC` is the memory child that memory_cpu starts.
"""
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

from kdkernels.train.memory import MEASURING_ENV, peak_above_inputs_mib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (rows, classes): vision, then language-model vocabularies
GPU_SHAPES = [(256, 100), (1024, 1000), (4096, 32000), (8192, 128256)]
# on the CPU the language-model shapes are sized down (rows, not vocabularies) to fit the time
CPU_SHAPES = [(256, 100), (1024, 1000), (1024, 32000), (256, 128256), (4096, 1000), (8192, 100)]
CPU_QUICK_SHAPES = [(256, 100), (1024, 1000), (256, 32000), (64, 128256)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Each figure is the median of REPEATS repetitions (each the median of its calls); their spread,
# (max - min) / median, above BUSY_SPREAD says the machine was busy while it was measured.
REPEATS = 5
BUSY_SPREAD = 0.25


def summarize(medians):
    """(figure, spread) of the repetitions' medians."""
    figure = statistics.median(medians)
    return figure, (max(medians) - min(medians)) / figure if figure > 0 else 0.0


def make_inputs(N, C, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(N, C, generator=g) * 2).to(device=device, dtype=dtype)
    t = (torch.randn(N, C, generator=g) * 2).to(device=device, dtype=dtype)
    y = torch.randint(0, C, (N,), generator=g).to(device)
    return s, t, y


def step(fn, s, t, y, backward):
    if backward:
        s.grad = None
        fn(s, t, y).backward()
    else:
        with torch.no_grad():
            fn(s, t, y)


def time_cpu(fn, s, t, y, backward, min_reps, budget_s, repeats=REPEATS):
    """(median ms, calls, spread): `repeats` repetitions of at least `min_reps` calls each,
    budget_s seconds in all."""
    for _ in range(2):  # warm-up (compilation, caches)
        step(fn, s, t, y, backward)
    medians, calls = [], 0
    for _ in range(repeats):
        times, started = [], time.perf_counter()
        while len(times) < min_reps or (time.perf_counter() - started < budget_s / repeats
                                        and len(times) < 200 // repeats):
            t0 = time.perf_counter()
            step(fn, s, t, y, backward)
            times.append(time.perf_counter() - t0)
        medians.append(statistics.median(times) * 1e3)
        calls += len(times)
    figure, spread = summarize(medians)
    return figure, calls, spread


def time_cuda(fn, s, t, y, backward, repeats=REPEATS):
    """(median ms, None, spread) from triton.testing.do_bench's calls, split into `repeats`
    consecutive repetitions."""
    import triton
    times = triton.testing.do_bench(lambda: step(fn, s, t, y, backward), warmup=50, rep=300,
                                    return_mode="all")
    size = max(1, len(times) // repeats)
    medians = [statistics.median(times[i:i + size]) for i in range(0, size * repeats, size)
               if times[i:i + size]]
    figure, spread = summarize(medians)
    return figure, None, spread


def peak_cuda(fn, s, t, y, backward):
    s.grad = None  # a gradient left by the timing loop is not part of the baseline
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step(fn, s, t, y, backward)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def copy_bandwidth_cuda(nbytes):
    import triton
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def bytes_moved(N, C, dtype, method, backward):
    """The ideal traffic: read the student (and the teacher, unless it is virtual), write the
    gradient when training; per-row values are negligible."""
    elem = torch.tensor([], dtype=dtype).element_size()
    reads = 1 if method == "tfkd_reg" else 2
    return N * C * elem * (reads + (1 if backward else 0))


# ---- peak memory on the CPU, in a child process ---------------------------------------------

def memory_child(spec):
    """Runs in a child: peak resident memory above the inputs, per contender, fwd+bwd."""
    from benchmarks.contenders import contenders
    N, C, dtype_name, method = spec["N"], spec["C"], spec["dtype"], spec["method"]
    s, t, y = make_inputs(N, C, DTYPES[dtype_name], "cpu")
    s.requires_grad_()
    result = {}
    for name, fn in contenders(method, "cpu", compiled=spec["compiled"]).items():
        result[name] = peak_above_inputs_mib(lambda fn=fn: step(fn, s, t, y, True),
                                             reset=lambda: setattr(s, "grad", None))
    print(json.dumps(result))


def memory_cpu(N, C, dtype_name, method, compiled):
    spec = json.dumps(dict(N=N, C=C, dtype=dtype_name, method=method, compiled=compiled))
    # a fixed, small mmap threshold: every large block is mapped on allocation and returned on
    # free, so the resident high-water mark sees each contender's own temporaries
    env = dict(os.environ, **MEASURING_ENV)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-m", "benchmarks.measure", spec],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode != 0:
        print(done.stderr[-2000:], file=sys.stderr)
        return {}
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- the run ------------------------------------------------------------------------------

def device_name(device):
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} x{torch.get_num_threads()} threads"
    except OSError:
        pass
    return platform.processor() or "cpu"


def grid(args):
    if args.shapes:
        shapes = [tuple(int(v) for v in shape.split("x")) for shape in args.shapes.split(",")]
    elif args.device == "cuda":
        shapes = GPU_SHAPES
    else:
        shapes = CPU_QUICK_SHAPES if args.quick else CPU_SHAPES
    methods = args.methods.split(",")
    for method in methods:
        for (N, C) in shapes:
            for dtype_name in args.dtypes.split(","):
                # quick mode: the full dtype x mode grid for plain KD, fp32 fwd+bwd for the rest
                if args.quick and method != "kd" and dtype_name != "fp32":
                    continue
                for backward in (False, True):
                    if args.quick and method != "kd" and not backward:
                        continue
                    yield method, N, C, dtype_name, backward


def run(args):
    """Times every case of the grid; (meta, rows, skipped): the run's machine and versions, one
    row per (case, contender), and {contender: why it was not run}."""
    from benchmarks.contenders import contenders
    device = args.device
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    versions = f"torch {torch.__version__}"
    try:
        import triton
        versions += f", triton {triton.__version__}"
    except ImportError:
        pass
    meta = dict(date=stamp, machine=platform.node(), device=device_name(device), versions=versions)
    load_before = os.getloadavg()[0]  # other processes: a spread can miss them (time slices)
    print(f"# {meta['device']} | {versions} | {stamp}", flush=True)
    copy_gbps = None
    rows, skipped = [], {}
    for method, N, C, dtype_name, backward in grid(args):
        dtype = DTYPES[dtype_name]
        s, t, y = make_inputs(N, C, dtype, device)
        s.requires_grad_(backward)
        # a fresh compile per case: Dynamo caches on the function's code, and one cache shared
        # by every shape, dtype and grad mode hits its recompile limit and falls back to eager
        torch._dynamo.reset()
        candidates = contenders(method, device, compiled=not args.no_compile, skipped=skipped)
        timings = {}
        for name, fn in candidates.items():
            try:
                if device == "cuda":
                    timings[name] = time_cuda(fn, s, t, y, backward, args.repeats)
                else:
                    timings[name] = time_cpu(fn, s, t, y, backward, args.min_reps, args.budget,
                                             args.repeats)
            except Exception as error:  # a contender that cannot run this case is reported
                print(f"  {name}: failed ({type(error).__name__}: {error})", file=sys.stderr)
                continue
        memory = {}
        if backward and device == "cuda":
            memory = {name: peak_cuda(fn, s, t, y, True)
                      for name, fn in candidates.items() if name in timings}
        elif backward and device == "cpu" and (method == "kd" or not args.quick):
            memory = memory_cpu(N, C, dtype_name, method, compiled=not args.quick)
        nbytes = bytes_moved(N, C, dtype, method, backward)
        if device == "cuda" and copy_gbps is None:
            copy_gbps = copy_bandwidth_cuda(max(nbytes, 2 ** 28))
        eager = timings.get("eager-reference", (None,))[0]
        mode = "fwd+bwd" if backward else "fwd"
        for name, (ms, reps, spread) in timings.items():
            gbps = nbytes / (ms * 1e-3) / 1e9
            row = dict(meta, method=method, shape=f"{N}x{C}", dtype=dtype_name, mode=mode,
                       contender=name, median_ms=round(ms, 4), reps=reps,
                       spread=round(spread, 3), busy=spread > BUSY_SPREAD,
                       speedup_vs_eager=round(eager / ms, 3) if eager else None,
                       peak_extra_mib=round(memory[name], 1) if name in memory else None,
                       gbps=round(gbps, 1),
                       copy_fraction=round(gbps / copy_gbps, 3) if copy_gbps else None)
            rows.append(row)
        line = ", ".join(f"{n} {ms:.2f} ms ±{spread:.0%}" + (f" ({eager / ms:.1f}x)" if eager
                                                             else "")
                         + (" BUSY" if spread > BUSY_SPREAD else "")
                         for n, (ms, _, spread) in timings.items())
        print(f"{method} {N}x{C} {dtype_name} {mode}: {line}", flush=True)
    meta["load"] = round(max(load_before, os.getloadavg()[0]), 1)
    meta["cores"] = os.cpu_count()
    return meta, rows, skipped


if __name__ == "__main__":
    memory_child(json.loads(sys.argv[1]))
