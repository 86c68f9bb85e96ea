"""The benchmark runner: speed and memory of the distillation losses, side by side in one run.

    python -m benchmarks.run --quick            # under five minutes on 2 CPU cores
    python -m benchmarks.run --device cuda      # the full grid on a GPU
    python -m benchmarks.run --quick --write-results   # also refresh benchmarks/RESULTS.md

Each run appends rows to OUT/results.csv (with machine, device, versions, date) and writes
OUT/latest.md and OUT/speedup.png (OUT: --out, default benchmarks/out). Each time is the median of
--repeats repetitions (each the median of its calls), with their spread; a spread above 25% marks
the figure as measured on a busy machine (table, plot, and a warning line). Ratios are against
the eager reference measured in the same run. On the CPU every
contender runs under the same allocator settings (large mmap and trim thresholds: fresh large
allocations are page-fault bound on these VMs), and peak memory is measured in a child process
per shape with a small fixed mmap threshold (the high-water mark of resident memory above the
inputs: every large block is then mapped when allocated and returned when freed).
On the GPU: triton.testing.do_bench, torch.cuda.max_memory_allocated, and the bandwidth from an
explicit bytes formula against a measured device-to-device copy.

measure.py measures, report.py writes the table and the plot; this file parses and calls them.
"""
import argparse
import os
import sys

import torch

from benchmarks import measure, report

OUT = os.path.join(measure.ROOT, "benchmarks", "out")
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "4294967296"}


def parser():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a reduced grid: minutes on 2 CPU cores")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   choices=["cpu", "cuda"])
    p.add_argument("--methods", default="kd,lessons_swap_dtd,teacher_bias,tfkd_reg")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--shapes", help="comma-separated NxC, e.g. 512x32000 (default: per device)")
    p.add_argument("--min-reps", type=int, default=5, help="calls per repetition, at least")
    p.add_argument("--repeats", type=int, default=measure.REPEATS,
                   help="repetitions per figure (the figure: their median; the spread: "
                   "(max - min) / median)")
    p.add_argument("--budget", type=float, default=None, help="seconds of repetitions per case")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile contenders")
    p.add_argument("--write-results", nargs="?", const="{device}", metavar="TITLE",
                   help="replace the section TITLE (default: the device) of benchmarks/RESULTS.md")
    p.add_argument("--out", default=OUT, help="folder for results.csv, latest.md, speedup.png")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    if args.device == "cpu" and any(os.environ.get(k) != v for k, v in ALLOCATOR_ENV.items()):
        os.execve(sys.executable, [sys.executable, "-m", "benchmarks.run"] + sys.argv[1:],
                  dict(os.environ, **ALLOCATOR_ENV))  # the same allocator for every contender
    if args.budget is None:
        args.budget = 0.5 if args.quick else 2.0
    if args.quick:
        args.min_reps = 1
        args.repeats = min(args.repeats, 3)
    meta, rows, skipped = measure.run(args)
    os.makedirs(args.out, exist_ok=True)
    csv_path = os.path.join(args.out, "results.csv")
    report.append_csv(rows, csv_path)
    table = report.markdown(meta, rows, skipped)
    with open(os.path.join(args.out, "latest.md"), "w") as handle:
        handle.write(table + "\n")
    report.plot(rows, os.path.join(args.out, "speedup.png"),
                f"{meta['device']} | {meta['versions']}", skipped)
    if args.write_results:
        report.write_results(meta, table, args.write_results.format(device=meta["device"]))
    print(f"\nwrote {csv_path}, {args.out}/latest.md, {args.out}/speedup.png")
    if skipped:
        print(f"not run: {report.skipped_note(skipped)}")
    warning = report.busy_warning(rows, meta)
    if warning:
        print(warning)
    return 0


if __name__ == "__main__":
    sys.exit(main())
