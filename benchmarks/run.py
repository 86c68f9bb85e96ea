"""The benchmark runner: speed and memory of the distillation losses, side by side in one run.

    python -m benchmarks.run --quick            # under five minutes on 2 CPU cores
    python -m benchmarks.run --device cuda      # the full grid on a GPU
    python -m benchmarks.run --quick --write-results   # also refresh benchmarks/RESULTS.md

Each run appends rows to benchmarks/out/results.csv (with machine, device, versions, date) and
writes benchmarks/out/latest.md and benchmarks/out/speedup.png. Times are medians of many
repetitions; ratios are against the eager reference measured in the same run. On the CPU every
contender runs under the same allocator settings (large mmap and trim thresholds: fresh large
allocations are page-fault bound on these VMs), and peak memory is measured in a child process
per shape with a small fixed mmap threshold (the high-water mark of resident memory above the
inputs: every large block is then mapped when allocated and returned when freed).
On the GPU: triton.testing.do_bench, torch.cuda.max_memory_allocated, and the bandwidth from an
explicit bytes formula against a measured device-to-device copy.
"""
import argparse
import csv
import datetime
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "benchmarks", "out")
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "4294967296"}

# (rows, classes): vision, then language-model vocabularies
GPU_SHAPES = [(256, 100), (1024, 1000), (4096, 32000), (8192, 128256)]
# on the CPU the language-model shapes are sized down (rows, not vocabularies) to fit the time
CPU_SHAPES = [(256, 100), (1024, 1000), (1024, 32000), (256, 128256), (4096, 1000), (8192, 100)]
CPU_QUICK_SHAPES = [(256, 100), (1024, 1000), (256, 32000), (64, 128256)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


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


def time_cpu(fn, s, t, y, backward, min_reps, budget_s):
    for _ in range(2):  # warm-up (compilation, caches)
        step(fn, s, t, y, backward)
    times, started = [], time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - started < budget_s and len(times) < 200):
        t0 = time.perf_counter()
        step(fn, s, t, y, backward)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, len(times)


def time_cuda(fn, s, t, y, backward):
    import triton
    ms = triton.testing.do_bench(lambda: step(fn, s, t, y, backward), warmup=50, rep=300)
    return ms, None


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

def _hwm_kib():
    return int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1))


def _rss_kib():
    return int(re.search(r"VmRSS:\s+(\d+)", open("/proc/self/status").read()).group(1))


def memory_child(spec):
    """Runs in a child: peak resident memory above the inputs, per contender, fwd+bwd."""
    from benchmarks.contenders import contenders
    N, C, dtype_name, method = spec["N"], spec["C"], spec["dtype"], spec["method"]
    s, t, y = make_inputs(N, C, DTYPES[dtype_name], "cpu")
    s.requires_grad_()
    result = {}
    for name, fn in contenders(method, "cpu", compiled=spec["compiled"]).items():
        step(fn, s, t, y, True)  # warm-up, then measure from the current resident set
        s.grad = None
        import gc
        gc.collect()
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # resets the high-water mark to the current resident set
        base = _rss_kib()
        step(fn, s, t, y, True)
        result[name] = (_hwm_kib() - base) / 1024
        s.grad = None
    print(json.dumps(result))


def memory_cpu(N, C, dtype_name, method, compiled):
    spec = json.dumps(dict(N=N, C=C, dtype=dtype_name, method=method, compiled=compiled))
    # a fixed, small mmap threshold: every large block is mapped on allocation and returned on
    # free, so the resident high-water mark sees each contender's own temporaries
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-m", "benchmarks.run", "--memory-child", spec],
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
    print(f"# {meta['device']} | {versions} | {stamp}", flush=True)
    copy_gbps = None
    rows = []
    for method, N, C, dtype_name, backward in grid(args):
        dtype = DTYPES[dtype_name]
        s, t, y = make_inputs(N, C, dtype, device)
        s.requires_grad_(backward)
        # a fresh compile per case: Dynamo caches on the function's code, and one cache shared
        # by every shape, dtype and grad mode hits its recompile limit and falls back to eager
        torch._dynamo.reset()
        candidates = contenders(method, device, compiled=not args.no_compile)
        timings = {}
        for name, fn in candidates.items():
            try:
                if device == "cuda":
                    ms, reps = time_cuda(fn, s, t, y, backward)
                else:
                    ms, reps = time_cpu(fn, s, t, y, backward, args.min_reps, args.budget)
            except Exception as error:  # a contender that cannot run this case is reported
                print(f"  {name}: failed ({type(error).__name__}: {error})", file=sys.stderr)
                continue
            timings[name] = (ms, reps)
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
        for name, (ms, reps) in timings.items():
            gbps = nbytes / (ms * 1e-3) / 1e9
            row = dict(meta, method=method, shape=f"{N}x{C}", dtype=dtype_name, mode=mode,
                       contender=name, median_ms=round(ms, 4), reps=reps,
                       speedup_vs_eager=round(eager / ms, 3) if eager else None,
                       peak_extra_mib=round(memory[name], 1) if name in memory else None,
                       gbps=round(gbps, 1),
                       copy_fraction=round(gbps / copy_gbps, 3) if copy_gbps else None)
            rows.append(row)
        line = ", ".join(f"{n} {ms:.2f} ms" + (f" ({eager / ms:.1f}x)" if eager else "")
                         for n, (ms, _) in timings.items())
        print(f"{method} {N}x{C} {dtype_name} {mode}: {line}", flush=True)
    return meta, rows


def markdown(meta, rows):
    lines = [f"{meta['device']} | {meta['versions']} | {meta['date']}", "",
             "| method | shape | dtype | mode | contender | median ms | vs eager | peak extra MiB |"
             + (" GB/s | of copy |" if rows and rows[0]["copy_fraction"] is not None else ""),
             "|---|---|---|---|---|---|---|---|"
             + ("---|---|" if rows and rows[0]["copy_fraction"] is not None else "")]
    for r in rows:
        extra = (f" {r['gbps']} | {r['copy_fraction']:.0%} |" if r["copy_fraction"] is not None
                 else "")
        ratio = "-" if r["speedup_vs_eager"] is None else f"{r['speedup_vs_eager']:.2f}x"
        peak = "-" if r["peak_extra_mib"] is None else r["peak_extra_mib"]
        lines.append(f"| {r['method']} | {r['shape']} | {r['dtype']} | {r['mode']} | "
                     f"{r['contender']} | {r['median_ms']:.3f} | {ratio} | {peak} |{extra}")
    return "\n".join(lines)


def plot(rows, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    picked = [r for r in rows if r["mode"] == "fwd+bwd" and r["speedup_vs_eager"]]
    methods = list(dict.fromkeys(r["method"] for r in picked))
    fig, axes = plt.subplots(1, len(methods), figsize=(4.5 * len(methods), 4), squeeze=False)
    for ax, method in zip(axes[0], methods):
        mine = [r for r in picked if r["method"] == method]
        cases = list(dict.fromkeys(f"{r['shape']}\n{r['dtype']}" for r in mine))
        names = list(dict.fromkeys(r["contender"] for r in mine))
        width = 0.8 / len(names)
        for k, name in enumerate(names):
            values = [next((r["speedup_vs_eager"] for r in mine if r["contender"] == name
                            and f"{r['shape']}\n{r['dtype']}" == case), 0) for case in cases]
            ax.bar([i + k * width for i in range(len(cases))], values, width, label=name)
        ax.axhline(1, color="grey", lw=0.8)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))], cases, fontsize=7,
                      rotation=35, ha="right")
        ax.set_title(f"{method}, fwd+bwd")
        ax.set_ylabel("speed-up vs eager reference")
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(meta, table, title):
    """Replaces the section `title` of benchmarks/RESULTS.md with the latest table."""
    path = os.path.join(ROOT, "benchmarks", "RESULTS.md")
    text = open(path).read() if os.path.exists(path) else "# Benchmark results\n"
    header = f"## {title}"
    sections = re.split(r"(?m)^(?=## )", text)
    kept = [sec for sec in sections if not sec.startswith(header)]
    kept.append(f"{header}\n\nMeasured {meta['date']} with `python -m benchmarks.run "
                f"{shlex.join(sys.argv[1:])}`.\n\n{table}\n\n")
    with open(path, "w") as handle:
        handle.write("".join(kept).rstrip() + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a reduced grid: minutes on 2 CPU cores")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   choices=["cpu", "cuda"])
    p.add_argument("--methods", default="kd,lessons_swap_dtd,teacher_bias,tfkd_reg")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--shapes", help="comma-separated NxC, e.g. 512x32000 (default: per device)")
    p.add_argument("--min-reps", type=int, default=5)
    p.add_argument("--budget", type=float, default=None, help="seconds of repetitions per case")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile contenders")
    p.add_argument("--write-results", nargs="?", const="{device}", metavar="TITLE",
                   help="replace the section TITLE (default: the device) of benchmarks/RESULTS.md")
    p.add_argument("--out", default=OUT, help="folder for results.csv, latest.md, speedup.png")
    p.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_child:
        return memory_child(json.loads(args.memory_child))
    if args.device == "cpu" and any(os.environ.get(k) != v for k, v in ALLOCATOR_ENV.items()):
        os.execve(sys.executable, [sys.executable, "-m", "benchmarks.run"] + sys.argv[1:],
                  dict(os.environ, **ALLOCATOR_ENV))  # the same allocator for every contender
    if args.budget is None:
        args.budget = 0.5 if args.quick else 2.0
    if args.quick:
        args.min_reps = min(args.min_reps, 3)
    meta, rows = run(args)
    out = args.out
    os.makedirs(out, exist_ok=True)
    csv_path = os.path.join(out, "results.csv")
    new = not os.path.exists(csv_path)
    with open(csv_path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        if new:
            writer.writeheader()
        writer.writerows(rows)
    table = markdown(meta, rows)
    with open(os.path.join(out, "latest.md"), "w") as handle:
        handle.write(table + "\n")
    plot(rows, os.path.join(out, "speedup.png"), f"{meta['device']} | {meta['versions']}")
    if args.write_results:
        write_results(meta, table, args.write_results.format(device=meta["device"]))
    print(f"\nwrote {csv_path}, {out}/latest.md, {out}/speedup.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
