"""Host work per call at small shapes: aten ops dispatched and microseconds per call of
kdkernels' KD entry points against the eager five-op reference and torch.compile of it.

    python -m benchmarks.overhead                       # this tree
    python -m benchmarks.overhead --compare-ref HEAD~3  # that commit and this tree, alternately

Ops are counted with a ``TorchDispatchMode``: every op that reaches the dispatcher's Python mode
from the top level (the ops a kernel runs inside itself are not seen), during one forward and
one ``backward()``, the autograd seed (``ones_like``) included. The kernels themselves
(``kdkernels::*`` ops) are counted apart. Times are per call: each repetition times a loop of
calls and divides; the table gives the median over repetitions (and the fastest: on a shared
machine the least disturbed) and their spread ((max - min) / median). A spread above
``BUSY_SPREAD`` means the machine was busy: the row is marked and a warning printed.
With ``--compare-ref`` the old tree (a ``git worktree`` of GITREF, its C++ extension copied from
this tree when csrc/ and kdkernels/_options.py are unchanged, else built there) and this tree
run one after the other, ``--rounds`` times, in separate processes.

This file imports nothing from this repository but ``kdkernels``, so that it can measure any
tree put first on PYTHONPATH.
"""
import argparse
import collections
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

SHAPES = ((8, 10), (64, 100))
BUSY_SPREAD = 0.25  # (max - min) / median of the repetitions above this: the machine was busy
T = 4.0


def eager_reference(s, t, y):
    """Plain-torch KD in five ops: log_softmax, softmax, kl_div, cross_entropy, and their sum."""
    log_p = F.log_softmax(s / T, -1)
    q = F.softmax(t / T, -1)
    return 0.9 * T * T * F.kl_div(log_p, q, reduction="batchmean") + 0.1 * F.cross_entropy(s, y)


def contenders(compiled=True):
    import kdkernels
    import kdkernels.functional as KF
    module = kdkernels.KDLoss(temperature=T, kd_weight=0.9, ce_weight=0.1)
    found = {
        "kd_loss": lambda s, t, y: KF.kd_loss(s, t, y, temperature=T),
        "distillation_loss": lambda s, t, y: kdkernels.distillation_loss(s, t, y, temperature=T),
        "KDLoss": module,
        "eager-reference": eager_reference,
    }
    if compiled:
        found["compile-reference"] = torch.compile(eager_reference, dynamic=False)
    return found


class OpCounter(TorchDispatchMode):
    """Counts the ops that reach this mode (top-level: a mode is off inside its own handler)."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def inputs(N, C, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(N, C, generator=g).to(device).requires_grad_()
    t = torch.randn(N, C, generator=g).to(device)
    y = torch.randint(0, C, (N,), generator=g).to(device)
    return s, t, y


def synchronize(s):
    """On CUDA a loop of calls ends when the device has run them (host work is what is timed,
    but a queue that outruns the device would hide the kernels' own time)."""
    if s.is_cuda:
        torch.cuda.synchronize(s.device)


def fwd(fn, s, t, y):
    with torch.no_grad():
        fn(s, t, y)


def fwd_bwd(fn, s, t, y):
    s.grad = None
    fn(s, t, y).backward()


def count_ops(fn, s, t, y):
    """{op name: count} of one forward + backward (after a warm-up call)."""
    fwd_bwd(fn, s, t, y)
    with OpCounter() as counter:
        fwd_bwd(fn, s, t, y)
    return dict(counter.ops)


def time_us(step, fn, s, t, y, reps, budget_s):
    """Per-call microseconds of `reps` repetitions, each a loop sized to ~budget_s / reps."""
    for _ in range(20):
        step(fn, s, t, y)
    synchronize(s)
    started = time.perf_counter()
    for _ in range(20):
        step(fn, s, t, y)
    synchronize(s)
    per_call = (time.perf_counter() - started) / 20
    loop = max(10, int(budget_s / reps / max(per_call, 1e-7)))
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        for _ in range(loop):
            step(fn, s, t, y)
        synchronize(s)
        times.append((time.perf_counter() - started) / loop * 1e6)
    return times


def measure(args):
    """{shape: {contender: {ops, fwd_us, fwd_bwd_us}}} in this process."""
    torch.set_num_threads(args.threads)
    found = contenders(compiled=not args.no_compile)
    result = {}
    for N, C in SHAPES:
        s, t, y = inputs(N, C, device=args.device)
        torch._dynamo.reset()
        cases = {}
        for name, fn in found.items():
            ops = None if name == "compile-reference" else count_ops(fn, s, t, y)
            cases[name] = dict(ops=ops,
                               fwd_us=time_us(fwd, fn, s, t, y, args.reps, args.budget),
                               fwd_bwd_us=time_us(fwd_bwd, fn, s, t, y, args.reps, args.budget))
        result[f"{N}x{C}"] = cases
    return result


def spread(times):
    return (max(times) - min(times)) / statistics.median(times)


def kernel_ops(ops):
    return sum(n for name, n in ops.items() if name.startswith("kdkernels."))


def other_ops(ops):
    return sum(n for name, n in ops.items() if not name.startswith("kdkernels."))


def table(runs):
    """Markdown: one row per (tree, shape, contender); runs: [(tree label, result)]."""
    lines = ["| tree | shape | contender | aten ops fwd+bwd (+ kernels) | fwd us (min) | spread | "
             "fwd+bwd us (min) | spread | fwd+bwd vs eager |", "|---" * 9 + "|"]
    busy = []
    for label, result in runs:
        for shape, cases in result.items():
            eager = statistics.median(cases["eager-reference"]["fwd_bwd_us"])
            for name, case in cases.items():
                ops = case["ops"]
                ops_text = "-" if ops is None else (
                    f"{other_ops(ops)}" + (f" (+{kernel_ops(ops)})" if kernel_ops(ops) else ""))
                cells = []
                for key in ("fwd_us", "fwd_bwd_us"):
                    times = case[key]
                    mark = " (busy)" if spread(times) > BUSY_SPREAD else ""
                    if mark:
                        busy.append(f"{label} {shape} {name} {key}")
                    cells += [f"{statistics.median(times):.1f} ({min(times):.1f})",
                              f"{spread(times):.0%}{mark}"]
                ratio = eager / statistics.median(case["fwd_bwd_us"])
                lines.append(f"| {label} | {shape} | {name} | {ops_text} | {' | '.join(cells)} | "
                             f"{ratio:.2f}x |")
    return "\n".join(lines), busy


def op_lists(runs):
    lines = []
    for label, result in runs:
        for shape, cases in result.items():
            for name, case in cases.items():
                if case["ops"] is not None and not name.startswith("eager"):
                    listed = ", ".join(f"{op} x{n}" if n > 1 else op
                                       for op, n in sorted(case["ops"].items()))
                    lines.append(f"- {label} {shape} {name}: {listed}")
                    break  # the kdkernels entry points share their ops: one list per shape
    return "\n".join(lines)


def old_tree(ref, here):
    """A worktree of `ref` with a C++ extension that matches it; returns its path."""
    path = tempfile.mkdtemp(prefix="kdk-overhead-")
    subprocess.run(["git", "-C", here, "worktree", "add", "--detach", "-f", path, ref],
                   check=True, capture_output=True)
    same_kernel = subprocess.run(["git", "-C", here, "diff", "--quiet", ref, "--", "csrc",
                                  "kdkernels/_options.py"]).returncode == 0
    if same_kernel:
        for name in os.listdir(os.path.join(here, "kdkernels")):
            if name.startswith("_C_") or name == "_build_report.json":
                shutil.copy(os.path.join(here, "kdkernels", name), os.path.join(path, "kdkernels"))
    else:
        env = dict(os.environ, KDKERNELS_CPU_VARIANTS=os.environ.get(
            "KDKERNELS_CPU_VARIANTS", "avx512" if torch.backends.cpu.get_cpu_capability()
            .lower().startswith("avx512") else "avx2"))
        print(f"building the C++ extension of {ref} in {path} ...", flush=True)
        subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=path, env=env,
                       check=True, capture_output=True)
    return path


def child(tree, argv):
    """This file run against `tree`'s kdkernels in a fresh process; its result."""
    env = dict(os.environ, PYTHONPATH=tree)
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--json"] + argv,
                          env=env, cwd=tempfile.gettempdir(), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=7, help="repetitions per figure")
    p.add_argument("--budget", type=float, default=0.7, help="seconds per figure")
    p.add_argument("--threads", type=int, default=1,
                   help="intra-op threads (1: host work is serial, and a busy second core "
                   "then stalls no OpenMP barrier)")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--device", default="cpu", help="cpu, or cuda (times end on a synchronize)")
    p.add_argument("--compare-ref", metavar="GITREF",
                   help="also measure the tree at GITREF, alternating with this one")
    p.add_argument("--rounds", type=int, default=2, help="alternations with --compare-ref")
    p.add_argument("--json", action="store_true", help="print the raw result as JSON")
    args = p.parse_args(argv)
    own = [a for a in (argv if argv is not None else sys.argv[1:])
           if not a.startswith("--compare-ref") and a != "--json"]
    if args.compare_ref:
        own = [a for i, a in enumerate(own) if i == 0 or own[i - 1] != "--compare-ref"]
        own = [a for a in own if a != args.compare_ref]
    if args.json:
        print(json.dumps(measure(args)))
        return 0
    import kdkernels
    here = os.path.dirname(os.path.dirname(os.path.abspath(kdkernels.__file__)))
    print(f"# torch {torch.__version__}, {args.device}, {args.threads} threads, {args.reps} "
          f"repetitions of "
          f"~{args.budget / args.reps * 1e3:.0f} ms per figure", flush=True)
    runs = []
    load_before = os.getloadavg()[0]
    if args.compare_ref:
        old = old_tree(args.compare_ref, here)
        try:
            for r in range(args.rounds):
                runs.append((f"{args.compare_ref} #{r + 1}", child(old, own)))
                runs.append((f"this #{r + 1}", child(here, own)))
        finally:
            subprocess.run(["git", "-C", here, "worktree", "remove", "--force", old],
                           capture_output=True)
    else:
        runs.append(("this", measure(args)))
    text, busy = table(runs)
    print(text)
    print("\nops per fwd+bwd besides the kernels (one kdkernels entry point per shape):")
    print(op_lists(runs))
    if busy:
        print(f"\nWARNING: the machine was busy (spread > {BUSY_SPREAD:.0%}) for: "
              + "; ".join(busy))
    load = max(load_before, os.getloadavg()[0])
    if load > os.cpu_count():
        print(f"\nWARNING: load average {load:.1f} on {os.cpu_count()} cores: other processes "
              "shared the machine; rerun on a quiet one")
    return 0


if __name__ == "__main__":
    sys.exit(main())
