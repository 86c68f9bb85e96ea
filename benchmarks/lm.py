"""Language-model-scale benchmarks, side by side in one run:

- fused linear distillation (hidden states and lm_head in chunks, no full logits) against the
  unfused path (materialised student and teacher logits, then the loss: the eager reference,
  torch.compile of it, and the kdkernels kernel on the full logits); the teacher is given as
  hidden states and its own lm_head;
- sparse (top-k, with a tail) teachers against the dense teacher, kdkernels both.

    python -m benchmarks.lm                  # CPU: 1024 tokens x 1024 hidden x 32000 vocab
    python -m benchmarks.lm --device cuda    # GPU: 8192 x 4096 x 128256 (Liger's shape) too

Time: median of repetitions of fwd+bwd (CPU: perf_counter; GPU: do_bench). Memory: the peak
above the inputs during one fwd+bwd, gradients included (CPU: resident high-water mark in a child
process per contender; GPU: max_memory_allocated). Prints a table with the ratios against the
unfused contenders (and dense), appends OUT/lm-results.csv, writes OUT/lm-latest.md
(OUT: --out, default benchmarks/out); --write-results refreshes a section of RESULTS.md.
"""
import argparse
import datetime
import gc
import json
import os
import platform
import subprocess
import sys
import time

import torch

from benchmarks import measure, report
from kdkernels.train.memory import MEASURING_ENV, peak_above_inputs_mib

OUT = os.path.join(measure.ROOT, "benchmarks", "out")
T = 4.0
SHAPES = {"cpu": {"fused": [(1024, 1024, 32000)], "sparse": [(1024, 32000)]},
          "cuda": {"fused": [(4096, 4096, 32000), (8192, 4096, 128256)],
                   "sparse": [(8192, 128256)]}}
SPARSE_K = (64, 128)


def fused_inputs(N, H, V, dtype, device):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, H, generator=g).to(device, dtype)
    W = (torch.randn(V, H, generator=g) / H ** 0.5 * 2).to(device, dtype)
    ht = torch.randn(N, H, generator=g).to(device, dtype)
    Wt = (torch.randn(V, H, generator=g) / H ** 0.5 * 2).to(device, dtype)
    y = torch.randint(0, V, (N,), generator=g).to(device)
    return h.requires_grad_(), W.requires_grad_(), ht, Wt, y


def fused_contenders(divergence, compiled=True, skipped=None):
    """{name: fn(h, W, ht, Wt, y) -> loss}: the same loss, fused or through full logits."""
    import kdkernels
    import kdkernels.reference as R
    skipped = {} if skipped is None else skipped
    kw = dict(temperature=T, kd_weight=0.9, ce_weight=0.1, divergence=divergence)

    def fused(h, W, ht, Wt, y):
        return kdkernels.fused_linear_distillation_loss(h, W, ht, y, teacher_weight=Wt, **kw)

    def unfused_kdkernels(h, W, ht, Wt, y):
        with torch.no_grad():
            t = ht @ Wt.t()
        return kdkernels.distillation_loss(h @ W.t(), t, y, **kw)

    def unfused_reference(h, W, ht, Wt, y):
        with torch.no_grad():
            t = ht @ Wt.t()
        return R.distillation_loss(h @ W.t(), t, y, T, 0.9, 0.1, divergence=divergence)[0]

    found = {"kdkernels-fused-linear": fused, "kdkernels-unfused": unfused_kdkernels,
             "eager-reference": unfused_reference}
    if compiled:
        found["compile-reference"] = torch.compile(unfused_reference, dynamic=False)
    else:
        skipped["compile-reference"] = "--no-compile"
    try:
        from liger_kernel.transformers import LigerFusedLinearJSD
        if divergence == "jsd":  # Liger's loss has no CE term: compared for its JSD alone
            liger = LigerFusedLinearJSD(jsd_beta=0.5, temperature=T)
            found["liger-fused-linear-jsd"] = lambda h, W, ht, Wt, y: liger(h, W, ht, Wt, y)
        else:
            skipped["liger-fused-linear-jsd"] = "run with --divergence jsd"
    except ImportError as error:
        skipped["liger-fused-linear-jsd"] = ("Liger-Kernel not installed"
                                             if error.name == "liger_kernel" else str(error))
    return found


def sparse_inputs(N, V, dtype, device):
    from kdkernels import SparseTeacher
    s, t, y = measure.make_inputs(N, V, dtype, device)
    log_q = torch.log_softmax(t.float(), -1)
    teachers = {"dense": t}
    for k in SPARSE_K:  # stored log-probabilities, the tail's mass implied
        values, indices = log_q.topk(min(k, V), -1)
        teachers[f"top-{k}"] = SparseTeacher(indices, values.to(dtype), tail=True)
    return s.requires_grad_(), teachers, y


def sparse_contenders():
    import kdkernels

    def loss(s, teacher, y):
        return kdkernels.distillation_loss(s, teacher, y, temperature=T)
    return loss


def _teacher_mib(args):
    teacher = args[1]
    parts = [teacher] if isinstance(teacher, torch.Tensor) else [teacher.indices, teacher.values]
    return round(sum(x.numel() * x.element_size() for x in parts) / 2 ** 20, 2)


def _step(fn, args, leaves):
    for x in leaves:
        x.grad = None
    fn(*args).backward()


def _time(fn, args, leaves, device, min_reps, budget):
    if device == "cuda":
        import triton
        return triton.testing.do_bench(lambda: _step(fn, args, leaves), warmup=25, rep=200)
    for _ in range(2):
        _step(fn, args, leaves)
    times, started = [], time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - started < budget and len(times) < 50):
        t0 = time.perf_counter()
        _step(fn, args, leaves)
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2] * 1e3


def _peak_cuda(fn, args, leaves):
    for x in leaves:
        x.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn(*args).backward()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def _case(spec):
    """(fn, args, leaves) of one (case, contender), rebuilt alike in the memory child."""
    dtype, device = measure.DTYPES[spec["dtype"]], spec["device"]
    if spec["kind"] == "fused":
        h, W, ht, Wt, y = fused_inputs(*spec["shape"], dtype, device)
        fn = fused_contenders(spec["divergence"], spec["compiled"])[spec["contender"]]
        return fn, (h, W, ht, Wt, y), (h, W)
    s, teachers, y = sparse_inputs(*spec["shape"], dtype, device)
    return sparse_contenders(), (s, teachers[spec["contender"]], y), (s,)


def memory_child(spec):
    """In a child: the resident high-water mark above the inputs during one fwd+bwd."""
    torch.manual_seed(0)
    fn, args, leaves = _case(spec)
    print(json.dumps(peak_above_inputs_mib(lambda: _step(fn, args, leaves),
                                           reset=lambda: [setattr(x, "grad", None)
                                                          for x in leaves])))


def _peak_cpu(spec):
    env = dict(os.environ, **MEASURING_ENV,
               PYTHONPATH=measure.ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-m", "benchmarks.lm", "--child", json.dumps(spec)],
                          capture_output=True, text=True, env=env, cwd=measure.ROOT)
    if done.returncode != 0:
        print(done.stderr[-2000:], file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(args):
    device = args.device
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    meta = dict(date=stamp, machine=platform.node(), device=measure.device_name(device),
                versions=f"torch {torch.__version__}")
    print(f"# {meta['device']} | {meta['versions']} | {stamp}", flush=True)
    rows, skipped = [], {}
    shapes = dict(SHAPES[device])
    for kind in ("fused", "sparse"):
        given = getattr(args, f"{kind}_shapes")
        if given:
            shapes[kind] = [tuple(int(v) for v in x.split("x")) for x in given.split(",")]
    for kind in args.kinds.split(","):
        for shape in shapes[kind]:
            for dtype_name in args.dtypes.split(","):
                if kind == "fused":
                    names = list(fused_contenders(args.divergence, not args.no_compile, skipped))
                else:
                    names = ["dense"] + [f"top-{k}" for k in SPARSE_K]
                found = {}
                for name in names:
                    torch._dynamo.reset()
                    spec = dict(kind=kind, shape=shape, dtype=dtype_name, device=device,
                                contender=name, divergence=args.divergence,
                                compiled=not args.no_compile)
                    try:
                        fn, fargs, leaves = _case(spec)
                        ms = _time(fn, fargs, leaves, device, args.min_reps, args.budget)
                        peak = (_peak_cuda(fn, fargs, leaves) if device == "cuda"
                                else _peak_cpu(spec))
                    except Exception as error:  # a contender that cannot run is reported
                        print(f"  {name}: failed ({type(error).__name__}: {error})",
                              file=sys.stderr)
                        skipped[name] = f"failed: {type(error).__name__}"
                        continue
                    grads = sum(x.numel() * x.element_size() for x in leaves) / 2 ** 20
                    found[name] = (ms, peak, grads, _teacher_mib(fargs) if kind == "sparse"
                                   else None)
                    del fn, fargs, leaves  # the next contender builds its own inputs
                    gc.collect()
                    if device == "cuda":
                        torch.cuda.empty_cache()
                    print(f"{kind} {'x'.join(map(str, shape))} {dtype_name} {name}: {ms:.1f} ms, "
                          f"peak extra {peak if peak is None else round(peak, 1)} MiB", flush=True)
                base = "kdkernels-fused-linear" if kind == "fused" else "dense"
                for name, (ms, peak, grads, teacher_mib) in found.items():
                    rows.append(dict(meta, kind=kind, shape="x".join(map(str, shape)),
                                     dtype=dtype_name, divergence=args.divergence, contender=name,
                                     median_ms=round(ms, 2),
                                     peak_extra_mib=None if peak is None else round(peak, 1),
                                     gradients_mib=round(grads, 1), teacher_mib=teacher_mib,
                                     base=base))
    return meta, rows, skipped


def markdown(meta, rows, skipped):
    """Per case: time and peak memory of each contender; for the fused path its ratios to each
    of the others (peak, peak beyond the inputs' gradients, which every path must return, and
    time); for a sparse teacher, its input size and time against the dense one."""
    lines = [f"{meta['device']} | {meta['versions']} | {meta['date']}", ""]
    fused = [r for r in rows if r["kind"] == "fused"]
    if fused:
        lines += ["### Fused linear distillation vs full logits (fwd+bwd)", "",
                  "| shape | dtype | contender | median ms | peak extra MiB | of it, gradients "
                  "of h and W | fused / this: peak | peak beyond the gradients | time |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in fused:
            f = _base(fused, r)
            peak = beyond = "-"
            if f["peak_extra_mib"] and r["peak_extra_mib"]:
                peak = f"{f['peak_extra_mib'] / r['peak_extra_mib']:.1%}"
                over = [x["peak_extra_mib"] - x["gradients_mib"] for x in (f, r)]
                beyond = f"{over[0] / over[1]:.1%}" if over[1] > 0 else "-"
            lines.append(f"| {r['shape']} | {r['dtype']} | {r['contender']} | {r['median_ms']} | "
                         f"{r['peak_extra_mib']} | {r['gradients_mib']} | {peak} | {beyond} | "
                         f"{f['median_ms'] / r['median_ms']:.2f} |")
        lines.append("")
    sparse = [r for r in rows if r["kind"] == "sparse"]
    if sparse:
        lines += ["### Sparse (top-k, with tail) vs dense teacher, kdkernels (fwd+bwd)", "",
                  "| shape | dtype | teacher | median ms | time / dense | teacher input MiB | "
                  "peak extra MiB |", "|---|---|---|---|---|---|---|"]
        for r in sparse:
            d = _base(sparse, r)
            lines.append(f"| {r['shape']} | {r['dtype']} | {r['contender']} | {r['median_ms']} | "
                         f"{r['median_ms'] / d['median_ms']:.2f} | {r['teacher_mib']} | "
                         f"{r['peak_extra_mib']} |")
        lines.append("")
    if skipped:
        lines.append(f"Not run: {report.skipped_note(skipped)}.")
    return "\n".join(lines)


def _base(rows, r):
    return next(b for b in rows if b["contender"] == r["base"] and b["shape"] == r["shape"]
                and b["dtype"] == r["dtype"])


def parser():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   choices=["cpu", "cuda"])
    p.add_argument("--kinds", default="fused,sparse")
    p.add_argument("--fused-shapes", help="tokens x hidden x vocab, e.g. 1024x1024x32000")
    p.add_argument("--sparse-shapes", help="tokens x vocab, e.g. 1024x32000")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--divergence", default="kl", choices=["kl", "jsd"])
    p.add_argument("--min-reps", type=int, default=3)
    p.add_argument("--budget", type=float, default=5.0, help="seconds of repetitions per case")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--out", default=OUT)
    p.add_argument("--write-results", nargs="?", const="LM scale, {device}", metavar="TITLE")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    if args.child:
        memory_child(json.loads(args.child))
        return 0
    from benchmarks.run import ALLOCATOR_ENV
    if args.device == "cpu" and any(os.environ.get(k) != v for k, v in ALLOCATOR_ENV.items()):
        os.execve(sys.executable, [sys.executable, "-m", "benchmarks.lm"] + sys.argv[1:],
                  dict(os.environ, **ALLOCATOR_ENV))  # the same allocator for every contender
    meta, rows, skipped = run(args)
    table = markdown(meta, rows, skipped)
    print("\n" + table)
    os.makedirs(args.out, exist_ok=True)
    if rows:
        report.append_csv(rows, os.path.join(args.out, "lm-results.csv"))
    with open(os.path.join(args.out, "lm-latest.md"), "w") as handle:
        handle.write(table + "\n")
    if args.write_results:
        report.write_results(meta, table, args.write_results.format(device=meta["device"]),
                             command="python -m benchmarks.lm")
    return 0


if __name__ == "__main__":
    sys.exit(main())
