"""What a benchmark run reports: rows appended to results.csv, the markdown table (latest.md and,
on request, a section of benchmarks/RESULTS.md) and the plot (speedup.png): speed-up against the
eager reference and absolute times, with the contenders that were not run named under it."""
import csv
import math
import os
import re
import shlex
import sys

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
REFERENCE = "eager-reference"


def append_csv(rows, path):
    if os.path.exists(path):  # a file with other columns (an older harness) is kept aside
        with open(path, newline="") as handle:
            header = next(csv.reader(handle), None)
        if header != list(rows[0]):
            os.replace(path, path[:-len(".csv")] + "-old-columns.csv")
    new = not os.path.exists(path)
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        if new:
            writer.writeheader()
        writer.writerows(rows)


def skipped_note(skipped):
    return "; ".join(f"{name} ({why})" for name, why in sorted(skipped.items()))


def is_busy(row):
    return str(row.get("busy")) == "True"


def busy_warning(rows, meta=None):
    """Warning lines: the figures whose repetitions spread too far, and a load average above the
    cores (other processes took turns with this one: every figure may be inflated, even where
    its repetitions agree, e.g. all stretched to the scheduler's time slice); or None."""
    lines = []
    busy = [f"{r['method']} {r['shape']} {r['dtype']} {r['mode']} {r['contender']}"
            for r in rows if is_busy(r)]
    if busy:
        lines.append(f"WARNING: the machine was busy: {len(busy)} of {len(rows)} figures spread "
                     f"by more than 25% over their repetitions (marked *): {'; '.join(busy)}")
    if meta and meta.get("load") and meta.get("cores") and meta["load"] > meta["cores"]:
        lines.append(f"WARNING: load average {meta['load']} on {meta['cores']} cores during the "
                     "run: other processes shared the machine; rerun on a quiet one")
    return "\n".join(lines) or None


def markdown(meta, rows, skipped=None):
    lines = [f"{meta['device']} | {meta['versions']} | {meta['date']}", "",
             "| method | shape | dtype | mode | contender | median ms | spread | vs eager | "
             "peak extra MiB |"
             + (" GB/s | of copy |" if rows and rows[0]["copy_fraction"] is not None else ""),
             "|---|---|---|---|---|---|---|---|---|"
             + ("---|---|" if rows and rows[0]["copy_fraction"] is not None else "")]
    for r in rows:
        extra = (f" {r['gbps']} | {r['copy_fraction']:.0%} |" if r["copy_fraction"] is not None
                 else "")
        ratio = "-" if r["speedup_vs_eager"] is None else f"{r['speedup_vs_eager']:.2f}x"
        peak = "-" if r["peak_extra_mib"] is None else r["peak_extra_mib"]
        spread = "-" if r.get("spread") is None else f"{float(r['spread']):.0%}"
        mark = " *" if is_busy(r) else ""
        lines.append(f"| {r['method']} | {r['shape']} | {r['dtype']} | {r['mode']} | "
                     f"{r['contender']} | {r['median_ms']:.3f}{mark} | {spread} | {ratio} | "
                     f"{peak} |{extra}")
    warning = busy_warning(rows, meta)
    if warning:
        lines += ["", warning]
    if skipped:
        lines += ["", f"Not run: {skipped_note(skipped)}."]
    return "\n".join(lines)


def log_minor_label(value, _):
    """Plain labels for the 2s and 5s between the powers of ten of a log axis."""
    if value <= 0:
        return ""
    mantissa = round(value / 10 ** math.floor(math.log10(value)))
    return f"{value:g}" if mantissa in (2, 5) else ""


def plot(rows, path, title, skipped=None):
    """One row of panels per method: speed-up over the eager reference (left, bars; the reference
    itself is the dashed line at 1) and absolute median times (right, markers on a log scale, the
    reference included). One legend under the panels, then the contenders not run and why."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    picked = [r for r in rows if r["mode"] == "fwd+bwd"]
    methods = list(dict.fromkeys(r["method"] for r in picked))
    names = list(dict.fromkeys(r["contender"] for r in picked))
    colours = {name: plt.get_cmap("tab10")(i) for i, name in enumerate(names)}
    most_cases = max(len({(r["shape"], r["dtype"]) for r in picked if r["method"] == m})
                     for m in methods)
    fig, axes = plt.subplots(len(methods), 2, squeeze=False,
                             figsize=(max(2 * 0.9 * most_cases + 2.5, 9), 2.9 * len(methods) + 1))
    for row, method in enumerate(methods):
        mine = [r for r in picked if r["method"] == method]
        cases = list(dict.fromkeys(f"{r['shape']}\n{r['dtype']}" for r in mine))
        value = {(r["contender"], f"{r['shape']}\n{r['dtype']}"): r for r in mine}
        for column, (key, shown) in enumerate([("speedup_vs_eager",
                                                [n for n in names if n != REFERENCE]),
                                               ("median_ms", names)]):
            ax = axes[row][column]
            width = 0.8 / max(len(shown), 1)
            for k, name in enumerate(shown):
                heights = [value[(name, case)][key] if (name, case) in value
                           and value[(name, case)][key] else math.nan for case in cases]
                busy = [(name, case) in value and is_busy(value[(name, case)]) for case in cases]
                xs = [i + (k - (len(shown) - 1) / 2) * width for i in range(len(cases))]
                if key == "speedup_vs_eager":
                    bars = ax.bar(xs, heights, width, color=colours[name],
                                  hatch=["////" if b else None for b in busy])
                    # vertical labels: each stays within its own bar's width
                    ax.bar_label(bars, labels=[("" if math.isnan(h) else f"{h:.1f}")
                                               + ("*" if b else "")
                                               for h, b in zip(heights, busy)],
                                 fontsize=6, padding=2, rotation=90)
                else:  # a bar's length means nothing on a log axis: markers
                    ax.plot(xs, heights, "o", ms=6, color=colours[name])
                    if any(busy):  # a busy figure: an open ring around its marker
                        ax.plot([x for x, b in zip(xs, busy) if b],
                                [h for h, b in zip(heights, busy) if b], "o", ms=11,
                                mfc="none", mec="red")
            ax.set_xticks(range(len(cases)), cases, fontsize=7)
            ax.set_xlim(-0.5, len(cases) - 0.5)
            if key == "speedup_vs_eager":
                ax.axhline(1, color="black", lw=0.8, ls="--")
                ax.set_title(f"{method}, fwd+bwd: speed-up vs eager reference", fontsize=9)
                ax.set_ylabel("speed-up over eager (x)", fontsize=8)
                ax.set_ylim(0, ax.get_ylim()[1] * 1.2)  # room for the vertical bar labels
            else:
                ax.set_yscale("log")
                ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                ax.yaxis.set_minor_formatter(FuncFormatter(log_minor_label))
                ax.tick_params(axis="y", which="both", labelsize=7)
                ax.set_title(f"{method}, fwd+bwd: median time per call", fontsize=9)
                ax.set_ylabel("ms (log scale)", fontsize=8)
            ax.grid(axis="y", which="both", alpha=0.3)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[n]) for n in names]  # bar or marker
    labels = [n + (" (= 1x, the dashed line)" if n == REFERENCE else "") for n in names]
    legend_height = 0.9 / fig.get_size_inches()[1]  # the legend and the note: 0.9 inch
    fig.legend(handles, labels, loc="lower center", ncol=min(len(names), 5), frameon=False,
               fontsize=8, bbox_to_anchor=(0.5, legend_height * 0.3))
    notes = []
    if any(is_busy(r) for r in picked):
        notes.append("hatched bar, * and red ring: measured on a busy machine (the repetitions "
                     "spread by more than 25%)")
    if skipped:
        notes.append(f"not run: {skipped_note(skipped)}")
    if notes:
        fig.text(0.5, legend_height * 0.08, "\n".join(notes), ha="center",
                 fontsize=7, color="0.3", wrap=True)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, legend_height, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(meta, table, title, path=RESULTS, command="python -m benchmarks.run"):
    """Replaces the section `title` of RESULTS.md with the latest table."""
    text = open(path).read() if os.path.exists(path) else "# Benchmark results\n"
    header = f"## {title}"
    sections = re.split(r"(?m)^(?=## )", text)
    kept = [sec for sec in sections if not sec.startswith(header)]
    kept.append(f"{header}\n\nMeasured {meta['date']} with `{command} "
                f"{shlex.join(sys.argv[1:])}`.\n\n{table}\n\n")
    with open(path, "w") as handle:
        handle.write("".join(kept).rstrip() + "\n")
