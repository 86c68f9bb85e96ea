"""What a run reports. `summarise` turns the per-seed rows into one entry per method; the printed
table, results.md, results.json, results.csv and accuracy.png are all drawn from those entries, so
a '-' in the table is a null in the JSON (an empty CSV cell) and a number is the same number."""
import csv
import json
import math
import os
import statistics

from .methods import METHODS

# per-seed values averaged per method: student top-1 (last and best epoch), the share of its test
# errors inherited from the CE-trained teacher and their number, its teacher's top-1, and the
# loss statistics
KEYS = ["last", "best", "inherited", "inherited_rows", "teacher_acc", "wrong", "fixed",
        "temperature"]
PAIRED = ["last", "inherited"]  # compared seed by seed against plain KD


def plural(n, word, many=None):
    """'1 seed', '3 seeds'; `many` for irregular plurals ('processes')."""
    return f"{n} {word}" if n == 1 else f"{n} {many or word + 's'}"


def mean_std(values):
    """(mean, sample std) of the values that are not None; std is None for a single value."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    if len(values) == 1:
        return values[0], None
    return statistics.mean(values), statistics.stdev(values)


def paired_p(diffs):
    """Two-sided p-value of the paired t-test on per-seed differences (scipy); None below two
    seeds or when all differences are equal (no spread to test against)."""
    if len(diffs) < 2 or len(set(diffs)) == 1:
        return None
    from scipy.stats import ttest_1samp
    return float(ttest_1samp(diffs, 0.0).pvalue)


def paired(mine, base, key):
    """Seed-by-seed differences mine - base of `key`: mean, std, how many seeds are higher and
    lower, the paired t-test p-value, and the number of pairs."""
    base_by_seed = {r["seed"]: r.get(key) for r in base}
    diffs = [r[key] - base_by_seed[r["seed"]] for r in mine
             if r.get(key) is not None and base_by_seed.get(r["seed"]) is not None]
    mean, std = mean_std(diffs)
    return {"": mean, "_std": std, "_higher": sum(d > 0 for d in diffs),
            "_lower": sum(d < 0 for d in diffs), "_p": paired_p(diffs), "_pairs": len(diffs)}


def summarise(rows, methods):
    """One flat dict per method: '<key>' and '<key>_std' for every KEYS entry (None where the
    method has no such value), and 'vs_kd_<key>...' for the paired comparison against kd."""
    kd_rows = [r for r in rows if r["method"] == "kd"]
    table = []
    for name in methods:
        mine = [r for r in rows if r["method"] == name]
        entry = {"method": name, "seeds": len(mine)}
        for key in KEYS:
            entry[key], entry[f"{key}_std"] = mean_std([r.get(key) for r in mine])
        if METHODS[name].teacher is None:  # no teacher of its own to be wrong
            entry["wrong"] = entry["wrong_std"] = None
        if not METHODS[name].corrects:
            entry["fixed"] = entry["fixed_std"] = None
        for key in PAIRED:
            comparison = paired(mine, kd_rows, key) if name != "kd" and kd_rows else {}
            for suffix in ["", "_std", "_higher", "_lower", "_p", "_pairs"]:
                entry[f"vs_kd_{key}{suffix}"] = comparison.get(suffix)
        table.append(entry)
    return table


def pct(mean, std=None, digits=2):
    if mean is None:
        return "-"
    text = f"{100 * mean:.{digits}f}"
    return text if std is None else f"{text} ± {100 * std:.{digits}f}"


def delta(entry, key):
    """'+1.23 ± 0.45' percentage points, or '-' without a comparison."""
    mean, std = entry[f"vs_kd_{key}"], entry[f"vs_kd_{key}_std"]
    if mean is None:
        return "-"
    return f"{100 * mean:+.2f}" + ("" if std is None else f" ± {100 * std:.2f}")


def p_value(p):
    return "-" if p is None else (f"{p:.2g}" if p >= 0.001 else "<0.001")


def markdown(table):
    seeds = sorted({e["seeds"] for e in table})
    seed_text = (plural(seeds[0], "seed") if len(seeds) == 1
                 else f"{'/'.join(map(str, seeds))} seeds")
    spread = "mean ± std over " if seeds[-1] > 1 else ""
    lines = [f"Student and teacher test top-1 (%) and inherited errors: {spread}{seed_text}.",
             "",
             "| method | student top-1 (last) | student top-1 (best) | inherited errors "
             "(share) | inherited errors (rows) | teacher top-1 | teacher wrong (train) "
             "| fixed by correction | mean T |",
             "|---|---|---|---|---|---|---|---|---|"]
    for e in table:
        mean_t = "-" if e["temperature"] is None else f"{e['temperature']:.2f}"
        rows = "-" if e["inherited_rows"] is None else f"{e['inherited_rows']:.1f}"
        lines.append(
            f"| {e['method']} | {pct(e['last'], e['last_std'])} | {pct(e['best'], e['best_std'])} "
            f"| {pct(e['inherited'], e['inherited_std'], 1)} | {rows} "
            f"| {pct(e['teacher_acc'], e['teacher_acc_std'], 1)} | {pct(e['wrong'], digits=1)} "
            f"| {pct(e['fixed'], digits=1)} | {mean_t} |")
    lines += ["", "Inherited errors: the student's test errors on which the CE-trained teacher "
              "predicts the same wrong class, as a share of the student's test errors and as a "
              "number of test rows (mean over seeds)."]
    compared = [e for e in table if e["vs_kd_last"] is not None]
    if compared:
        lines += ["", "Paired against kd, seed by seed (differences in percentage points"
                  + (", mean ± std over seeds; p: two-sided paired t-test):" if seeds[-1] > 1
                     else ", one seed: no spread, no test):"), "",
                  "| method | Δ top-1 (last) | seeds higher / lower | p | Δ inherited errors "
                  "| seeds lower / higher | p |",
                  "|---|---|---|---|---|---|---|"]
        for e in compared:
            inherited = e["vs_kd_inherited"] is not None
            lines.append(
                f"| {e['method']} | {delta(e, 'last')} "
                f"| {e['vs_kd_last_higher']} / {e['vs_kd_last_lower']} "
                f"| {p_value(e['vs_kd_last_p'])} | {delta(e, 'inherited')} "
                + (f"| {e['vs_kd_inherited_lower']} / {e['vs_kd_inherited_higher']} "
                   if inherited else "| - ")
                + f"| {p_value(e['vs_kd_inherited_p'])} |")
    return "\n".join(lines)


def plot(table, rows, path, title):
    """Dot-and-whisker plot: each method's mean with its std over seeds, every seed as a small dot,
    the CE and teacher means as reference lines; a second panel for the inherited-error share."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    panels = [("last", "student test top-1 (%), last epoch")]
    if any(e["inherited"] is not None for e in table):
        panels.append(("inherited", "inherited errors (% of the student's test errors)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels) + 1.6,
                                                     0.42 * len(table) + 2.2),
                             sharey=True, squeeze=False)
    seeds = max(e["seeds"] for e in table)
    for ax, (key, label) in zip(axes[0], panels):
        for i, e in enumerate(table):
            values = [100 * r[key] for r in rows if r["method"] == e["method"]
                      and r.get(key) is not None]
            ax.plot(values, [i] * len(values), "o", ms=3, color="0.55", alpha=0.5, zorder=2)
            if e[key] is not None:
                std = e[f"{key}_std"]
                ax.errorbar(100 * e[key], i, xerr=None if std is None else 100 * std, fmt="o",
                            color="#225599", ms=6, capsize=4, zorder=3)
        ax.set_xlabel(label)
        ax.grid(axis="x", alpha=0.3)
        if key == "inherited":
            ax.set_xlim(0, 100)
    ax = axes[0][0]
    ax.set_yticks(range(len(table)), [e["method"] for e in table])
    ax.invert_yaxis()
    references = reference_lines(table, rows)
    for _, value, style in references:
        ax.axvline(100 * value, color="#aa3377", ls=style, lw=1.2, zorder=1)
    handles = [Line2D([], [], marker="o", color="#225599", ls="",
                      label="mean ± std over " + plural(seeds, "seed") if seeds > 1
                      else "1 seed (no error bars)"),
               Line2D([], [], marker="o", ms=3, color="0.55", ls="", label="each seed")]
    handles += [Line2D([], [], color="#aa3377", ls=style, label=text)
                for text, _, style in references]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False,
               fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def reference_lines(table, rows):
    """(label, value, linestyle): the mean CE student and the mean teacher (the CE-trained
    teacher-arch model of the methods that distil from it)."""
    lines = []
    ce = next((e for e in table if e["method"] == "ce"), None)
    if ce is not None and ce["last"] is not None:
        lines.append(("ce student (mean)", ce["last"], "--"))
    teacher = [r["teacher_acc"] for r in rows if r.get("teacher_acc") is not None
               and METHODS[r["method"]].teacher == "teacher"]
    if teacher:
        lines.append(("teacher (mean)", statistics.mean(teacher), ":"))
    return lines


def write(out, config, table, rows, title):
    """results.json, results.csv, results.md and accuracy.png (when matplotlib is installed)
    under `out`; returns the table's text and the files written."""
    text = markdown(table)
    return text, write_files(out, {"config": config, "summary": table, "runs": rows}, text,
                             table, "accuracy.png", lambda path: plot(table, rows, path, title))


def write_files(out, results, text, table, plot_name, draw):
    """results.json (`results`), results.md (`text`), results.csv (`table`) and the plot
    (`draw(path)`, skipped without matplotlib); returns the names written."""
    with open(os.path.join(out, "results.json"), "w") as handle:
        json.dump(results, handle, indent=1)
    with open(os.path.join(out, "results.md"), "w") as handle:
        handle.write(text + "\n")
    with open(os.path.join(out, "results.csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    written = ["results.json", "results.csv", "results.md"]
    try:
        draw(os.path.join(out, plot_name))
        written.append(plot_name)
    except ModuleNotFoundError as error:
        if error.name != "matplotlib":
            raise
    return written


# --task lm: validation cross-entropy per method, paired against ce and kl; the loss curves

LM_KEYS = ["val_loss", "ppl", "tokens_per_s", "train_seconds"]
LM_BASELINES = ["ce", "kl"]  # each method is compared seed by seed with these


def summarise_lm(rows, methods, peaks):
    """One flat dict per method: '<key>' and '<key>_std' for LM_KEYS, 'peak_mib' (the loss
    step's, None when not measured) and 'vs_<baseline>_val_loss...' (paired differences)."""
    table = []
    for name in methods:
        mine = [r for r in rows if r["method"] == name]
        entry = {"method": name, "seeds": len(mine)}
        for key in LM_KEYS:
            entry[key], entry[f"{key}_std"] = mean_std([r[key] for r in mine])
        entry["peak_mib"] = peaks.get(name)
        for base in LM_BASELINES:
            base_rows = [r for r in rows if r["method"] == base]
            comparison = paired(mine, base_rows, "val_loss") if name != base and base_rows else {}
            for suffix in ["", "_std", "_higher", "_lower", "_p", "_pairs"]:
                entry[f"vs_{base}_val_loss{suffix}"] = comparison.get(suffix)
        table.append(entry)
    return table


def _number(mean, std=None, digits=3):
    if mean is None:
        return "-"
    return f"{mean:.{digits}f}" + ("" if std is None else f" ± {std:.{digits}f}")


def _lm_delta(entry, base):
    mean = entry[f"vs_{base}_val_loss"]
    if mean is None:
        return "-", "-"
    std = entry[f"vs_{base}_val_loss_std"]
    text = f"{mean:+.3f}" + ("" if std is None else f" ± {std:.3f}")
    return (f"{text} ({entry[f'vs_{base}_val_loss_lower']}/{entry[f'vs_{base}_val_loss_higher']})",
            p_value(entry[f"vs_{base}_val_loss_p"]))


def markdown_lm(table, summary):
    seeds = max(e["seeds"] for e in table)
    spread = f"mean ± std over {plural(seeds, 'seed')}" if seeds > 1 else "1 seed"
    lines = [f"Validation cross-entropy (nats per token) and perplexity of the students, {spread}; "
             "Δ: paired against ce and against kl, seed by seed (negative: lower loss; in "
             "brackets the seeds lower / higher; p: two-sided paired t-test).",
             "",
             "| method | val CE | perplexity | Δ CE vs ce | p | Δ CE vs kl | p | tokens/s "
             "| loss-step peak MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for e in table:
        vs_ce, p_ce = _lm_delta(e, "ce")
        vs_kl, p_kl = _lm_delta(e, "kl")
        peak = "-" if e["peak_mib"] is None else f"{e['peak_mib']:.1f}"
        lines.append(f"| {e['method']} | {_number(e['val_loss'], e['val_loss_std'])} "
                     f"| {_number(e['ppl'], e['ppl_std'], 1)} | {vs_ce} | {p_ce} | {vs_kl} "
                     f"| {p_kl} | {_number(e['tokens_per_s'], digits=0)} | {peak} |")
    lines += ["", "tokens/s: training tokens per second of the student (mean over seeds; the "
              "teacher's forward and the cache reads included). Loss-step peak: memory above "
              "the inputs during the loss's forward and backward, from the student's last "
              "hidden states to the gradients of them and of the lm_head, at the run's batch."]
    if "python" in summary:
        lines += ["", f"Data: the Python {summary['python']} standard library's sources "
                  f"({summary['files']['train']} train / {summary['files']['val']} validation "
                  f"files, file list {summary['files_digest']}), BPE vocabulary "
                  f"{summary['vocab_size']}"
                  + (f" (teacher padded to {summary['teacher_vocab']})"
                     if summary["teacher_vocab"] != summary["vocab_size"] else "")
                  + f"; {summary['train_tokens']} training tokens, {summary['val_tokens']} "
                  f"validation tokens per evaluation."]
    if "teacher_val_loss" in summary:
        lines += ["", f"Teacher: validation CE {summary['teacher_val_loss']:.3f} (perplexity "
                  f"{math.exp(summary['teacher_val_loss']):.1f})."]
    cache = summary.get("cache")
    if cache:
        per_token = cache["bytes_per_token"]
        lines += ["", f"Offline teacher cache: top-{cache['k']} log-probabilities and the tail "
                  f"mass for {cache['tokens']} training tokens, {per_token} bytes per token "
                  f"({per_token * cache['tokens'] / 2 ** 20:.1f} MiB) against "
                  f"{cache['dense_fp32_bytes_per_token']} for dense fp32 logits "
                  f"({cache['dense_fp32_bytes_per_token'] / per_token:.0f}x) and "
                  f"{cache['dense_bf16_bytes_per_token']} for bf16 "
                  f"({cache['dense_bf16_bytes_per_token'] / per_token:.0f}x); written in "
                  f"{cache['write_seconds']:.1f} s (teacher forward included), read in "
                  f"{cache['read_seconds']:.2f} s in all ({cache['rows_read']} rows, "
                  f"{1e6 * cache['read_seconds'] / max(cache['rows_read'], 1):.2f} µs per "
                  f"token). Mean tail mass: {cache['mean_tail_top8']:.3f} beyond the top 8, "
                  f"{cache['mean_tail_top64']:.3f} beyond the top 64."]
    phases = summary.get("phases")
    if phases:
        lines += ["", "Time per phase: " + ", ".join(f"{name} {seconds:.0f} s"
                                                    for name, seconds in phases.items())
                  + (" (this invocation only: the run was resumed, and its earlier invocations "
                     "are not counted; tokens/s counts every invocation)."
                     if summary.get("resumed") else ".")]
    return "\n".join(lines)


def plot_lm(rows, summary, path, title):
    """Validation loss against steps: one line per method (the mean over seeds, each seed
    faint; dashed: from the offline cache, dash-dotted: fused lm_head, which computes what kl
    does and so lies on it), the teacher's final loss as a reference line."""
    import matplotlib

    from .lm import METHODS as LM_METHODS
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    colors = plt.get_cmap("tab10")
    for i, name in enumerate(methods):
        runs = [r["history"] for r in rows if r["method"] == name]
        steps = [s for s, _ in runs[0]]
        for history in runs:
            ax.plot(steps, [v for _, v in history], color=colors(i % 10), lw=0.6, alpha=0.35)
        mean = [statistics.mean(h[j][1] for h in runs) for j in range(len(steps))]
        style = {"cache": "--", "hidden": "-."}.get(LM_METHODS[name].teacher, "-")
        ax.plot(steps, mean, color=colors(i % 10), lw=1.6, marker="o", ms=3, ls=style,
                label=name)
    if "teacher_val_loss" in summary:
        ax.axhline(summary["teacher_val_loss"], color="0.3", ls=":", lw=1.2,
                   label="teacher (final)")
    ax.set_xlabel("student optimizer step")
    ax.set_ylabel("validation cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_lm(out, config, table, rows, summary, title):
    """results.json, results.csv, results.md and val_loss.png under `out`; returns the table's
    text and the files written."""
    text = markdown_lm(table, summary)
    results = {"config": config, "summary": table, "runs": rows, "run": summary}
    return text, write_files(out, results, text, table, "val_loss.png",
                             lambda path: plot_lm(rows, summary, path, title))
