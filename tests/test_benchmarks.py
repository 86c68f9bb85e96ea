"""The benchmark harness end to end on a tiny grid, written to a temporary folder: it runs, and its
outputs hold what it says; and the report's pieces on hand-made rows."""
import csv
import os
import re
import subprocess
import sys

import pytest

from benchmarks import report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_harness_writes_csv_table_and_plot(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("TRITON_INTERPRET", None)
    shared = os.path.join(ROOT, "benchmarks", "out", "results.csv")
    shared_before = os.path.getmtime(shared) if os.path.exists(shared) else None
    out = str(tmp_path / "bench")
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--device", "cpu", "--shapes",
         "64x100", "--methods", "kd,teacher_bias", "--dtypes", "fp32", "--no-compile",
         "--out", out],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(os.path.join(out, "results.csv")) as handle:
        rows = list(csv.DictReader(handle))
    cases = {(r["method"], r["mode"], r["contender"]) for r in rows}
    assert ("kd", "fwd+bwd", "kdkernels-cpp") in cases and ("kd", "fwd", "eager-reference") in cases
    assert ("teacher_bias", "fwd+bwd", "kdkernels-torch") in cases
    assert not any(r["contender"] == "compile-reference" for r in rows)  # --no-compile
    for r in rows:
        assert float(r["median_ms"]) > 0 and r["shape"] == "64x100" and r["device"]
        if r["contender"] == "eager-reference":
            assert float(r["speedup_vs_eager"]) == 1.0
    assert any(r["peak_extra_mib"] for r in rows if r["mode"] == "fwd+bwd")
    table = open(os.path.join(out, "latest.md")).read()
    assert "| kd | 64x100 | fp32 | fwd+bwd | kdkernels-cpp |" in table
    assert "compile-reference (--no-compile)" in table  # what was not run is said
    assert "not run:" in done.stdout
    assert os.path.getsize(os.path.join(out, "speedup.png")) > 1000
    # nothing went to the shared benchmarks/out
    assert (os.path.getmtime(shared) if os.path.exists(shared) else None) == shared_before


def test_lm_harness_prints_the_fused_ratios(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("TRITON_INTERPRET", None)
    out = str(tmp_path / "lm")
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.lm", "--fused-shapes", "32x8x100", "--sparse-shapes",
         "32x100", "--dtypes", "fp32", "--no-compile", "--budget", "0.05", "--out", out],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(os.path.join(out, "lm-results.csv")) as handle:
        rows = list(csv.DictReader(handle))
    contenders = {(r["kind"], r["contender"]) for r in rows}
    assert {("fused", "kdkernels-fused-linear"), ("fused", "kdkernels-unfused"),
            ("fused", "eager-reference"), ("sparse", "dense"), ("sparse", "top-64")} <= contenders
    assert all(float(r["median_ms"]) > 0 and r["peak_extra_mib"] != "" for r in rows)
    table = open(os.path.join(out, "lm-latest.md")).read()
    assert "| 32x8x100 | fp32 | eager-reference |" in table and "fused / this: peak" in table
    assert "| 32x100 | fp32 | top-128 |" in table
    assert table.strip() in done.stdout


def test_vocab_parallel_benchmark_counts_bytes_and_collectives(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.vocab_parallel", "--rows", "300", "--vocab", "300",
         "--dtypes", "fp32", "--reps", "1", "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    table = open(os.path.join(tmp_path, "vocab-parallel.md")).read()
    # 15 float64 statistics per row (the header and the first collective's fixed 256 rows,
    # then the other 44 rows: 2 all-gathers); the logits' way sends 2 x 150 fp32 values per row
    assert "| fp32 | kdkernels-vocab-parallel | 2 / 0 | 120 | 120 |" in table
    assert "single-device kernel on the same shard" in table
    assert "| fp32 | all-gather-logits | 2 / 0 | 1200 | 1200 |" in table


def _row(method, shape, contender, ms, eager_ms):
    return dict(method=method, shape=shape, dtype="fp32", mode="fwd+bwd", contender=contender,
                median_ms=ms, speedup_vs_eager=round(eager_ms / ms, 3), peak_extra_mib=None,
                gbps=1.0, copy_fraction=None)


def test_plot_leaves_the_reference_out_of_the_speedup_bars(tmp_path, monkeypatch):
    import matplotlib.axes
    bars = []
    original = matplotlib.axes.Axes.bar

    def recording_bar(self, x, height, *args, **kwargs):
        bars.append(list(height))
        return original(self, x, height, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "bar", recording_bar)
    rows = [_row("kd", "64x100", name, ms, 2.0) for name, ms in
            [("kdkernels-cpp", 0.5), ("eager-reference", 2.0), ("compile-reference", 1.0)]]
    path = tmp_path / "speedup.png"
    report.plot(rows, str(path), "test", {"liger-kl": "Liger-Kernel not installed"})
    assert path.stat().st_size > 1000
    assert sorted(h for heights in bars for h in heights) == [2.0, 4.0]  # no 1.0 bar


def test_markdown_names_what_was_not_run():
    rows = [_row("kd", "64x100", "eager-reference", 2.0, 2.0)]
    meta = dict(device="cpu", versions="torch", date="today")
    assert "Not run: liger-kl (Liger-Kernel not installed)." in report.markdown(
        meta, rows, {"liger-kl": "Liger-Kernel not installed"})
    assert "Not run" not in report.markdown(meta, rows, {})


def test_log_axis_labels_are_plain_numbers():
    assert [report.log_minor_label(v, None) for v in (0.2, 0.3, 0.5, 20, 70)] == \
        ["0.2", "", "0.5", "20", ""]


def test_busy_figures_are_marked_in_the_table_and_plot(tmp_path, monkeypatch):
    import matplotlib.axes
    rows = [_row("kd", "64x100", name, ms, 2.0) for name, ms in
            [("kdkernels-cpp", 0.5), ("eager-reference", 2.0)]]
    rows[0].update(spread=0.6, busy=True)
    rows[1].update(spread=0.05, busy=False)
    meta = dict(device="cpu", versions="torch", date="today")
    table = report.markdown(meta, rows)
    assert "| kdkernels-cpp | 0.500 * | 60% | 4.00x |" in table
    assert "| eager-reference | 2.000 | 5% | 1.00x |" in table
    assert "WARNING: the machine was busy: 1 of 2 figures" in table
    assert report.busy_warning(rows[1:]) is None
    assert report.busy_warning(rows[1:], dict(meta, load=2.0, cores=2)) is None
    assert "load average 6.5 on 2 cores" in report.busy_warning(rows[1:],
                                                               dict(meta, load=6.5, cores=2))
    recorded, ylabels = [], []
    original_label = matplotlib.axes.Axes.bar_label
    original_ylabel = matplotlib.axes.Axes.set_ylabel

    def recording_label(self, container, labels=None, **kwargs):
        recorded.append((list(labels), kwargs.get("rotation")))
        return original_label(self, container, labels=labels, **kwargs)

    def recording_ylabel(self, text, **kwargs):
        ylabels.append(text)
        return original_ylabel(self, text, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "bar_label", recording_label)
    monkeypatch.setattr(matplotlib.axes.Axes, "set_ylabel", recording_ylabel)
    report.plot(rows, str(tmp_path / "speedup.png"), "test")
    assert recorded == [(["4.0*"], 90)]  # the busy bar's label is marked; labels are vertical
    assert "speed-up over eager (x)" in ylabels
    assert (tmp_path / "speedup.png").stat().st_size > 1000


def test_overhead_prints_ops_and_times():
    """benchmarks/overhead.py (issue 20's figures): per contender the aten ops besides the
    kernel and the microseconds per call at both shapes, the kdkernels rows at 4 ops."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.overhead", "--reps", "2", "--budget", "0.02",
         "--no-compile"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| this |")]
    for shape in ("8x10", "64x100"):
        assert any(f"| {shape} | eager-reference |" in r for r in rows), done.stdout
        kd = [r for r in rows if f"| {shape} | kd_loss |" in r]
        assert kd and "| 4 (+1) |" in kd[0], done.stdout
    assert "ops per fwd+bwd besides the kernels" in done.stdout


def test_integrations_benchmark_prints_both_contenders_peak_memory(tmp_path):
    """benchmarks/integrations.py at its smallest sizes (vocabulary 8, one sequence of 6 tokens:
    a labelled row after the 3-token prompt and the 2 padded positions; one timed step): per
    case, a row with the peak memory and time of each contender."""
    for name in ("trl", "datasets", "transformers"):
        pytest.importorskip(name)  # optional install: kdkernels[trl]
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.integrations", "--vocab", "8", "--batch", "1",
         "--length", "6", "--reps", "1", "--out", str(tmp_path)], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for case, contenders in (
            ("gkd-step", ("TRL GKDTrainer (full logits)", "kdkernels GKD trainer (fused)")),
            ("hf-call", ("full logits + kdkernels.distillation_loss",
                         "kdkernels.integrations.hf.distill_models_loss"))):
        for name in contenders:
            row = re.search(rf"^\| {re.escape(case)} \| {re.escape(name)} \| (-?[\d.]+) \| "
                            rf"(\d+) \|", done.stdout, re.M)
            assert row, (case, name, done.stdout)
