"""The benchmark harness end to end on a tiny grid: it runs, and its outputs hold what it says."""
import csv
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_harness_writes_csv_table_and_plot(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("TRITON_INTERPRET", None)
    out = os.path.join(ROOT, "benchmarks", "out")
    csv_path = os.path.join(out, "results.csv")
    before = sum(1 for _ in open(csv_path)) if os.path.exists(csv_path) else 0
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--device", "cpu", "--shapes",
         "64x100", "--methods", "kd,teacher_bias", "--dtypes", "fp32", "--no-compile"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(csv_path) as handle:
        rows = list(csv.DictReader(handle))[max(before - 1, 0):]
    cases = {(r["method"], r["mode"], r["contender"]) for r in rows}
    assert ("kd", "fwd+bwd", "kdkernels-cpp") in cases and ("kd", "fwd", "eager-reference") in cases
    assert ("teacher_bias", "fwd+bwd", "kdkernels-torch") in cases
    for r in rows:
        assert float(r["median_ms"]) > 0 and r["shape"] == "64x100" and r["device"]
        if r["contender"] == "eager-reference":
            assert float(r["speedup_vs_eager"]) == 1.0
    assert any(r["peak_extra_mib"] for r in rows if r["mode"] == "fwd+bwd")
    table = open(os.path.join(out, "latest.md")).read()
    assert "| kd | 64x100 | fp32 | fwd+bwd | kdkernels-cpp |" in table
    assert os.path.getsize(os.path.join(out, "speedup.png")) > 1000
