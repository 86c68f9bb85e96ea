"""The training driver: a reduced default run, exact resume, a 2-process gloo run, the CIFAR
reader on files in the real format, and configuration errors."""
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from kdkernels.train import cli, data, models

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
    assert [e["method"] for e in rows] == list(cli.METHODS)
    for entry in rows:
        assert entry["seeds"] == 2 and 0 < entry["last"] <= 1 and entry["best"] >= entry["last"]
        assert f"| {entry['method']} |" in printed
    kd = next(e for e in rows if e["method"] == "kd")
    assert kd["teacher_acc"] > 0.5 and kd["temperature"] == pytest.approx(4.0)
    assert next(e for e in rows if e["method"] == "ce")["teacher_acc"] is None
    assert (out / "results.csv").read_text().startswith("method,")
    assert (out / "results.md").exists() and (out / "accuracy.png").stat().st_size > 1000


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


def test_existing_run_folder_is_not_overwritten(tmp_path):
    out = str(tmp_path / "run")
    assert cli.main(["--methods", "ce", "--out", out] + SMALL) == 0
    with pytest.raises(SystemExit, match="--resume"):
        cli.main(["--methods", "ce", "--out", out] + SMALL)


@pytest.mark.slow
def test_two_process_gloo_run(tmp_path):
    out = str(tmp_path / "ddp")
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", "29517", "-m", "kdkernels.train", "--methods", "ce,kd",
           "--out", out] + SMALL
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 process(es)" in done.stdout
    rows = summary(out)
    assert [e["method"] for e in rows] == ["ce", "kd"]
    assert all(0.3 < e["last"] <= 1 for e in rows)


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
                     "--batch-size", "16"] + SMALL) == 0


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
])
def test_bad_configuration_stops_before_training(args, message, tmp_path):
    with pytest.raises(SystemExit, match=message):
        cli.main(args + ["--out", str(tmp_path / "never")])
    assert not (tmp_path / "never").exists()
