"""The training driver: a reduced default run, the teacher-error setting, exact resume, a 2-process
gloo run, the CIFAR reader on files in the real format, configuration errors, progress lines
outside a terminal, and the report (table, JSON, paired comparison) on hand-made rows."""
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from kdkernels.train import cli, config, data, models, progress, report, runner
from kdkernels.train.methods import METHODS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--seeds", "1", "--epochs", "2", "--no-progress"]


def summary(out):
    with open(os.path.join(out, "results.json")) as handle:
        return json.load(handle)["summary"]


def test_reduced_default_run_writes_the_table(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(SMALL + ["--seeds", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = summary(out)
    assert [e["method"] for e in rows] == list(METHODS)
    for entry in rows:
        assert entry["seeds"] == 2 and 0 < entry["last"] <= 1 and entry["best"] >= entry["last"]
        assert f"| {entry['method']} |" in printed
        assert 0 <= entry["inherited"] <= 1  # the teacher is trained: measured for every method
    kd = next(e for e in rows if e["method"] == "kd")
    assert kd["teacher_acc"] > 0.5 and kd["temperature"] == pytest.approx(4.0)
    assert kd["fixed"] is None and kd["vs_kd_last"] is None  # not a correction, not compared
    assert next(e for e in rows if e["method"] == "lessons_swap")["fixed"] is not None
    assert next(e for e in rows if e["method"] == "ce")["teacher_acc"] is None
    assert "2 seeds" in printed and "Paired against kd" in printed
    assert (out / "results.csv").read_text().startswith("method,")
    assert (out / "results.md").read_text().strip() in printed
    assert (out / "accuracy.png").stat().st_size > 1000


def test_teacher_error_setting(tmp_path, capsys):
    """Classes 3 and 8 fully exchanged for the teacher: it is wrong on about their share of the
    training rows (20%), the swap correction fixes every such row, and the inherited-error share
    and the paired comparison against kd are reported."""
    out = tmp_path / "run"
    assert cli.main(["--methods", "kd,lessons_swap", "--seeds", "2", "--epochs", "3",
                     "--teacher-swap-pairs", "3-8", "--teacher-swap-fraction", "1",
                     "--no-progress", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "exchanged on 100% of the rows of classes 3-8" in printed
    kd, swap = summary(out)
    assert 0.15 < kd["wrong"] < 0.3 and kd["teacher_acc"] < 0.85
    assert swap["fixed"] == 1.0
    for entry in (kd, swap):
        assert 0 <= entry["inherited"] <= 1 and entry["inherited_std"] is not None
        assert entry["inherited_rows"] <= (1 - entry["last"]) * 359 + 1e-6  # 359 test rows
    assert swap["vs_kd_last_pairs"] == 2
    assert "| lessons_swap |" in printed.split("Paired against kd")[1]
    saved = json.loads((out / "config.json").read_text())
    assert saved["teacher_swap_pairs"] == "3-8" and saved["teacher_swap_fraction"] == 1.0


def test_exchange_labels_moves_the_asked_fraction_of_each_pair():
    y = torch.arange(10).repeat_interleave(20)  # 20 rows per class
    swapped = data.exchange_labels(y, [(3, 8), (1, 7)], 0.25, seed=0)
    changed = swapped != y
    assert changed.sum() == 4 * 5  # 25% of 20 rows, in each of the 4 classes
    assert set(y[changed].tolist()) == {1, 3, 7, 8}
    partner = {3: 8, 8: 3, 1: 7, 7: 1}
    assert all(partner[int(a)] == int(b) for a, b in zip(y[changed], swapped[changed]))
    assert torch.equal(swapped, data.exchange_labels(y, [(3, 8), (1, 7)], 0.25, seed=0))
    assert not torch.equal(swapped, data.exchange_labels(y, [(3, 8), (1, 7)], 0.25, seed=1))
    with pytest.raises(ValueError, match="fraction"):
        data.exchange_labels(y, [(3, 8)], 0, seed=0)


def test_inherited_errors_count_the_same_wrong_class():
    y = torch.tensor([0, 1, 2, 3, 4])
    student = torch.tensor([0, 2, 0, 1, 4])  # wrong on rows 1, 2, 3
    teacher = torch.tensor([0, 2, 1, 1, 3])  # same wrong class on rows 1 and 3
    assert runner.inherited_errors(student, teacher, y) == dict(
        inherited=pytest.approx(2 / 3), inherited_rows=2, errors=3)
    assert runner.inherited_errors(y, teacher, y) == dict(inherited=None, inherited_rows=0,
                                                          errors=0)


def _final_weights(out):
    return {f: torch.load(os.path.join(out, "checkpoints", f), weights_only=False)["model"]
            for f in sorted(os.listdir(os.path.join(out, "checkpoints")))}


def test_resume_equals_uninterrupted(tmp_path):
    args = ["--methods", "kd,teacher_bias", "--seeds", "1", "--epochs", "4", "--no-progress"]
    whole, cut = str(tmp_path / "whole"), str(tmp_path / "cut")
    assert cli.main(args + ["--out", whole]) == 0
    # stop in the middle of the teacher's training, then in the middle of a student's
    assert cli.main(args + ["--out", cut, "--interrupt-after", "2"]) == 3
    assert cli.main(["--resume", cut, "--interrupt-after", "3", "--no-progress"]) == 3
    assert cli.main(["--resume", cut, "--no-progress"]) == 0
    a, b = _final_weights(whole), _final_weights(cut)
    assert a.keys() == b.keys() and len(a) == 3
    for name in a:
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]), (name, key)
    assert summary(whole) == summary(cut)


def test_existing_run_folder_is_not_overwritten(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert cli.main(["--methods", "ce", "--out", out] + SMALL) == 0
    assert cli.main(["--methods", "ce", "--out", out] + SMALL) == 2
    assert "--resume" in capsys.readouterr().err


@pytest.mark.slow
def test_two_process_gloo_run(tmp_path):
    out = str(tmp_path / "ddp")
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", "29517", "-m", "kdkernels.train", "--methods", "ce,kd",
           "--out", out] + SMALL
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 processes" in done.stdout
    rows = summary(out)
    assert [e["method"] for e in rows] == ["ce", "kd"]
    assert all(0.3 < e["last"] <= 1 for e in rows)


@pytest.mark.slow
def test_vocab_parallel_students_train_as_one_process_does(tmp_path):
    """--vocab-parallel under torchrun (2 gloo processes, the classifier split 5 + 5 classes):
    the students end with the weights a single process trains (up to float32 rounding)."""
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    args = ["--methods", "kd,teacher_bias", "--seeds", "1", "--epochs", "3", "--no-progress"]
    shared = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
              "--master_port", "29519", "-m", "kdkernels.train", "--vocab-parallel"]
    done = subprocess.run(shared + args + ["--out", str(tmp_path / "vp")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 processes (students vocab-parallel)" in done.stdout
    assert cli.main(args + ["--out", str(tmp_path / "one")]) == 0
    for name in ("kd", "teacher_bias"):
        sharded, whole = (torch.load(tmp_path / run / "checkpoints" / f"{name}-seed0.pt",
                                     weights_only=False)["model"] for run in ("vp", "one"))
        for key in whole:
            torch.testing.assert_close(sharded[key], whole[key], rtol=1e-4, atol=1e-5)


def _write_cifar(folder, name, n=40):
    rng = np.random.default_rng(0)
    files, tests, key, classes, sub = data.CIFAR_FILES[name]
    root = os.path.join(folder, sub)
    os.makedirs(root)
    written = {}
    for f in files + tests:
        images = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, classes, n).tolist()
        with open(os.path.join(root, f), "wb") as handle:
            pickle.dump({b"data": images, key: labels, b"batch_label": b"x"}, handle)
        written[f] = (images, labels)
    return written


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_reader_on_real_format(tmp_path, name):
    written = _write_cifar(str(tmp_path), name)
    ds = data.cifar(name, str(tmp_path))
    files, tests, _, classes, _ = data.CIFAR_FILES[name]
    assert ds.x_train.shape == (40 * len(files), 3, 32, 32) and ds.num_classes == classes
    first_images, first_labels = written[files[0]]
    assert ds.y_train[:40].tolist() == first_labels
    # pixel (channel 1, row 2, column 3) of image 0, back through the normalisation
    raw = first_images[0].reshape(3, 32, 32)[1, 2, 3] / 255.0
    restored = ds.x_train[0, 1, 2, 3] * data.CIFAR_STD[1] + data.CIFAR_MEAN[1]
    assert restored.item() == pytest.approx(raw, abs=1e-6)
    aug = data.augment(ds.x_train[:8], torch.Generator().manual_seed(0))
    assert aug.shape == (8, 3, 32, 32)


def test_cifar_resnets_build_and_run(tmp_path):
    _write_cifar(str(tmp_path), "cifar10", n=4)
    ds = data.cifar("cifar10", str(tmp_path))
    for arch in ["resnet20", "resnet8x4", "resnet32x4", "resnet56"]:
        net = models.build(arch, ds)
        assert net(ds.x_train[:2]).shape == (2, 10)
    params = sum(p.numel() for p in models.build("resnet56", ds).parameters())
    assert 0.8e6 < params < 0.9e6  # He et al.: ResNet-56 has 0.85M parameters


def test_cifar_run_end_to_end(tmp_path):
    _write_cifar(str(tmp_path), "cifar10", n=16)
    out = str(tmp_path / "run")
    assert cli.main(["--dataset", "cifar10", "--data-dir", str(tmp_path), "--teacher-arch",
                     "resnet8", "--student-arch", "resnet8", "--methods", "kd", "--out", out,
                     "--batch-size", "16", "--teacher-epochs", "2"] + SMALL) == 0


@pytest.mark.parametrize("args,message", [
    (["--methods", "kd,magic"], "unknown method"),
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--seeds", "0"], "--seeds must be >= 1"),
    (["--lr", "-1"], "--lr must be > 0"),
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--kd-weight", "-0.5"], "--kd-weight must be >= 0"),
    (["--smooth-eps", "1.5"], "--smooth-eps must be in"),
    (["--tfkd-a", "0"], "--tfkd-a must be in"),
    (["--generations", "0"], "--generations must be >= 1"),
    (["--student-arch", "resnet20"], "does not fit"),
    (["--teacher-arch", "vgg"], "unknown"),
    (["--dataset", "cifar100"], "needs --data-dir"),
    (["--dataset", "cifar10", "--data-dir", "/nonexistent", "--teacher-arch", "resnet56",
      "--student-arch", "resnet20"], "holds no cifar10"),
    (["--resume", "/nonexistent"], "no config.json"),
    (["--device", "tpu"], "--device"),
    (["--teacher-swap-pairs", "3-3"], "two different classes"),
    (["--teacher-swap-pairs", "3-10"], "two different classes"),
    (["--teacher-swap-pairs", "3-8,8-1"], "class 8 is in two pairs"),
    (["--teacher-swap-pairs", "3:8"], "not a pair of class numbers"),
    (["--teacher-swap-pairs", "3-8", "--teacher-swap-fraction", "0"],
     "--teacher-swap-fraction must be in"),
    (["--teacher-swap-fraction", "0.5"], "needs --teacher-swap-pairs"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--pad-teacher-vocab", "64"], "--pad-teacher-vocab: not an option of --task vision (it "
                                    "would do nothing); it belongs to --task lm"),
    (["--steps", "5", "--vocab-size", "300", "--context", "64"],
     "--vocab-size, --context, --steps: not an option of --task vision"),
    (["--preset", "gpu"], "--preset: not an option of --task vision"),
])
def test_bad_configuration_stops_before_training(args, message, tmp_path, capsys):
    """The CLI prints the library's error (which names the option) and exits with status 2."""
    assert cli.main(args + ["--out", str(tmp_path / "never")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kdkernels-train: error: ") and message in err
    assert not (tmp_path / "never").exists()


def test_driver_without_scikit_learn_says_what_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # its import: an ImportError
    assert cli.main(["--out", str(tmp_path / "never")] + SMALL) == 2
    assert "needs scikit-learn: pip install 'kdkernels[train]'" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_library_code_raises_exceptions_not_exits():
    digits = data.load("digits")
    with pytest.raises(config.ConfigError, match="--epochs"):
        config.configure(["--epochs", "0"])
    with pytest.raises(ValueError, match="unknown architecture 'vgg'"):
        models.build("vgg", digits)
    with pytest.raises(ValueError, match="needs image data"):
        models.build("resnet20", digits)
    with pytest.raises(FileNotFoundError, match="no cifar10 python-pickle files"):
        data.cifar("cifar10", "/nonexistent")
    with pytest.raises(ValueError, match="unknown dataset"):
        data.load("imagenet")


def test_progress_lines_outside_a_terminal(tmp_path, capsys):
    """pytest's captured stdout is not a terminal: a line per model (each finishes within the
    interval), with the epoch count and the test accuracy."""
    assert progress.mode(True) == "lines" and progress.mode(False) == "off"
    assert progress.mode(True, rank=1) == "off"
    args = ["--methods", "ce,kd", "--seeds", "1", "--epochs", "2", "--out", str(tmp_path / "r")]
    threads = torch.get_num_threads()
    assert cli.main(args) == 0
    assert torch.get_num_threads() == threads  # the driver's 1 thread does not outlive main
    printed = capsys.readouterr().out
    assert "1 seed," in printed and "2 methods, 1 process on cpu (1 thread each)" in printed
    lines = [line for line in printed.splitlines() if ": epoch " in line]
    assert [line.split(": epoch")[0] for line in lines] == [
        "kdkernels-train: ce seed 0", "kdkernels-train: teacher seed 0",
        "kdkernels-train: kd seed 0"]
    assert lines[0].split(": epoch ")[1].startswith("2/2, test top-1 ")


def test_progress_lines_every_interval(capsys):
    p = progress.Progress("m", total=5, how="lines", interval=0.0)
    for epoch in range(1, 6):
        p.epoch(epoch, 0.5)
    assert capsys.readouterr().out.count("test top-1 50.00%") == 5
    p = progress.Progress("m", total=5, how="lines", interval=3600)
    for epoch in range(1, 6):
        p.epoch(epoch, 0.5)
    assert capsys.readouterr().out.count("epoch 5/5") == 1  # the last epoch only
    p = progress.Progress("m", total=5, how="off")
    p.epoch(5, 0.5)
    assert capsys.readouterr().out == ""


def _rows(method, lasts, inherited=None):
    return [dict(method=method, seed=seed, last=last, best=last, teacher_acc=None,
                 inherited=None if inherited is None else inherited[seed],
                 inherited_rows=None if inherited is None else 10 * inherited[seed], errors=None)
            for seed, last in enumerate(lasts)]


def test_paired_comparison_against_kd():
    rows = (_rows("kd", [0.90, 0.80, 0.85], [0.6, 0.5, 0.7])
            + _rows("lessons_swap", [0.92, 0.83, 0.84], [0.2, 0.5, 0.3]))
    kd, swap = report.summarise(rows, ["kd", "lessons_swap"])
    assert kd["vs_kd_last"] is None
    assert swap["vs_kd_last"] == pytest.approx(0.04 / 3)
    assert (swap["vs_kd_last_higher"], swap["vs_kd_last_lower"]) == (2, 1)
    # paired t-test on the differences (0.02, 0.03, -0.01): t = mean / (std / sqrt(3)); with 2
    # degrees of freedom the two-sided p-value is 1 - |t| / sqrt(t^2 + 2)
    t = (0.04 / 3) / (np.std([0.02, 0.03, -0.01], ddof=1) / np.sqrt(3))
    assert swap["vs_kd_last_p"] == pytest.approx(1 - t / np.sqrt(t * t + 2), rel=1e-6)
    assert swap["vs_kd_inherited"] == pytest.approx(-0.8 / 3)
    assert (swap["vs_kd_inherited_higher"], swap["vs_kd_inherited_lower"]) == (0, 2)
    text = report.markdown(report.summarise(rows, ["kd", "lessons_swap"]))
    assert "| lessons_swap | +1.33 ± 2.08 | 2 / 1 | 0.38 | -26.67 ± 23.09 | 2 / 0 |" in text


def test_one_seed_table_has_no_spread_and_json_matches_table(tmp_path):
    rows = _rows("ce", [0.9]) + _rows("kd", [0.8])
    table = report.summarise(rows, ["ce", "kd"])
    text, written = report.write(str(tmp_path), {}, table, rows, "one seed")
    assert "1 seed." in text and "1 seeds" not in text and "±" not in text
    assert "mean ± std" not in text
    saved = json.loads((tmp_path / "results.json").read_text())["summary"]
    assert saved[0]["last_std"] is None
    # every '-' in the table is a null in the JSON, every number a value
    columns = ["last", "best", "inherited", "inherited_rows", "teacher_acc", "wrong", "fixed",
               "temperature"]
    for entry in saved:
        line = next(line for line in text.splitlines() if line.startswith(f"| {entry['method']} |"))
        cells = [c.strip() for c in line.strip("|").split("|")[1:]]
        for key, cell in zip(columns, cells):
            assert (cell == "-") == (entry[key] is None), (entry["method"], key, cell)
    assert "Paired against kd" in text and "| ce | +10.00 | 1 / 0 | - |" in text
    assert written[-1] == "accuracy.png" and (tmp_path / "accuracy.png").stat().st_size > 1000

