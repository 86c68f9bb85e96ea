"""--task lm: the stdlib split, the tokenizer cache, the offline teacher cache, a tiny end-to-end
run through main() (table, plot, the cache's rows against the teacher), resume, the report."""
import json
import os
import sys

import numpy as np
import pytest
import torch

from kdkernels.train import cli, lm, lm_data, report, teacher_cache

TINY = ["--task", "lm", "--vocab-size", "300", "--context", "32", "--batch-size", "4",
        "--steps", "4", "--teacher-steps", "4", "--eval-every", "2", "--train-tokens", "2048",
        "--val-tokens", "256", "--teacher-arch", "1x64", "--student-arch", "1x32", "--seeds",
        "1", "--no-progress"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One tokenizer cache for the module's runs (training it is the slow part)."""
    return str(tmp_path_factory.mktemp("lm-cache"))


def fake_stdlib(root):
    files = {"a.py": "import os\n" * 50, "pkg/b.py": "def f(x):\n    return x\n" * 40,
             "pkg/tests/t.py": "assert 1\n", "test/t2.py": "assert 2\n",
             "idlelib/i.py": "x = 1\n", "_sysconfigdata_x.py": "build = {}\n",
             "notes.txt": "not python\n"}
    # what differs between machines and distributions of the same Python version
    files.update({f"{name}.py": "machine = 1\n" for name in [
        "config-3.11-x86_64-linux-gnu/python-config", "config-3.11-darwin/python-config",
        "lib-dynload/x", "distutils/core", "ensurepip/__init__", "tkinter/__init__",
        "ctypes/macholib/dyld", "msilib/schema", "site-packages/pkg/mod", "sitecustomize",
        "_distutils_system_mod"]})
    files.update({f"m{i}.py": f"value_{i} = {i} * 2\nprint(value_{i})\n" * 20 for i in range(40)})
    for name, text in files.items():
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as handle:
            handle.write(text)
    return files


def test_split_is_deterministic_and_disjoint(tmp_path):
    fake_stdlib(str(tmp_path))
    split = lm_data.split_files(str(tmp_path))
    assert split == lm_data.split_files(str(tmp_path))
    everything = split["train"] + split["val"]
    assert not set(split["train"]) & set(split["val"])
    assert sorted(everything) == sorted(["a.py", "pkg/b.py"] + [f"m{i}.py" for i in range(40)])
    # the SHA-256 of each path decides, on every machine and in every process (hash() would
    # differ: string hashing is salted per process)
    assert split["val"] == ["m15.py", "m10.py"]
    assert lm_data.files_digest(split) == "c6f882152cb2"
    # the side of a file depends on its path alone: adding files moves no other file
    with open(tmp_path / "zz_new.py", "w") as handle:
        handle.write("new = 1\n")
    grown = lm_data.split_files(str(tmp_path))
    assert set(split["val"]) <= set(grown["val"]) and set(split["train"]) <= set(grown["train"])
    real = lm_data.split_files()
    assert real == lm_data.split_files() and real["val"] and len(real["train"]) > 10 * len(
        real["val"]) > 0
    assert not set(real["train"]) & set(real["val"])
    assert not any(part in lm_data.EXCLUDED_DIRS or part.startswith("config-")
                   for p in real["train"] + real["val"] for part in p.split("/")[:-1])
    assert not set(lm_data.EXCLUDED_FILES) & set(real["train"] + real["val"])


def test_tokenizer_and_ids_are_cached_not_retrained(tmp_path, monkeypatch):
    root, cache = str(tmp_path / "lib"), str(tmp_path / "cache")
    fake_stdlib(root)
    first = lm_data.load(300, cache, root)
    assert first.vocab_size == 300 and first.files == {
        "train": len(lm_data.split_files(root)["train"]), "val": len(lm_data.split_files(root)[
            "val"])}
    end = first.train[-1].item()  # every file ends with the end-of-file token

    def no_training(*args):
        raise AssertionError("the tokenizer was trained again")
    monkeypatch.setattr(lm_data, "train_tokenizer", no_training)
    second = lm_data.load(300, cache, root)
    assert second.cache == first.cache
    assert torch.equal(second.train, first.train) and torch.equal(second.val, first.val)
    assert (first.train == end).sum() == first.files["train"]
    # another vocabulary size is another cache entry: trained (here: refused) anew
    with pytest.raises(AssertionError, match="trained again"):
        lm_data.load(320, cache, root)


def test_teacher_cache_round_trip(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(0)
    V, k, tokens = 500, 64, 300
    logits = torch.randn(tokens, V, generator=g) * 3
    logits[5, :] = 0.0  # ties
    logits[7, 10:] = -float("inf")  # 10 possible tokens only: the rest has no mass
    batches = [logits[:128], logits[128:256], logits[256:]]
    folder = str(tmp_path / "cache")
    monkeypatch.setattr(teacher_cache, "ROWS_AT_ONCE", 50)  # batches cut into parts too
    meta = teacher_cache.write(folder, iter(batches), tokens, k, V, "abc")
    assert (meta["k"], meta["vocab_size"], meta["tokens"], meta["teacher"]) == (k, V, tokens,
                                                                                "abc")
    cache = teacher_cache.TeacherCache(folder)
    assert cache.bytes_per_token() == k * (2 + 4) + 4  # uint16 ids, float32 values and tail
    assert teacher_cache.TeacherCache.valid(folder, k, V, tokens, "abc")
    assert not teacher_cache.TeacherCache.valid(folder, k, V, tokens, "another teacher")
    written = {name: np.load(os.path.join(folder, f"{name}.npy")) for name in
               ("indices", "values", "tail")}
    positions = np.array([[0, 5, 7], [299, 128, 3]])
    indices, values, tail = cache.rows(positions)
    assert indices.shape == values.shape == (2, 3, k) and tail.shape == (2, 3)
    # bit for bit what was written, for the positions asked
    assert np.array_equal(indices.numpy(), written["indices"][positions].astype(np.int64))
    assert np.array_equal(values.numpy().view(np.uint32),
                          written["values"][positions].view(np.uint32))
    assert np.array_equal(tail.numpy().view(np.uint32), written["tail"][positions].view(np.uint32))
    # and what was written is the teacher's top-k: log-probabilities and the mass of the rest
    log_p = torch.log_softmax(logits.double(), -1)
    top = log_p.topk(k, -1)
    for row in (0, 3, 128, 299):
        assert torch.equal(torch.from_numpy(written["values"][row]), top.values[row].float())
        assert set(written["indices"][row].tolist()) == set(top.indices[row].tolist())
    assert np.allclose(written["tail"], 1 - top.values.exp().sum(-1).numpy(), atol=1e-6)
    assert written["tail"][7] < 1e-6 and np.isneginf(written["values"][7, 10:]).all()
    first8 = cache.rows(np.array([3]), k=8)[1]
    assert torch.equal(first8[0], values[1, 2, :8])  # k <= the cache's: its first (largest) k
    assert cache.rows_read == 7 and cache.read_seconds > 0


def test_teacher_cache_rejects_a_wrong_count(tmp_path):
    with pytest.raises(ValueError, match="expects 20"):
        teacher_cache.write(str(tmp_path / "c"), iter([torch.randn(10, 50)]), 20, 8, 50, "h")
    assert not os.path.exists(tmp_path / "c")


def _snapshot(folder):
    """Each file's bytes, inode and modification time: a rewrite changes them."""
    snapshot = {}
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        with open(path, "rb") as handle:
            info = os.stat(path)
            snapshot[name] = (handle.read(), info.st_ino, info.st_mtime_ns)
    return snapshot


def _weights(out):
    return {f: torch.load(os.path.join(out, "checkpoints", f), weights_only=False)["model"]
            for f in sorted(os.listdir(os.path.join(out, "checkpoints")))}


def _results(out):
    with open(os.path.join(out, "results.json")) as handle:
        return json.load(handle)


@pytest.mark.slow
def test_lm_run_end_to_end_and_resume(tmp_path, cache_dir, capsys):
    """A tiny --task lm run prints the table; the cache holds the teacher's top-64 at every
    training token; a run stopped twice and resumed ends with the same weights and losses."""
    methods = ["--methods", "ce,kl,top8_tail,fused_kl"]
    whole, cut = str(tmp_path / "whole"), str(tmp_path / "cut")
    assert cli.main(TINY + methods + ["--out", whole, "--cache-dir", cache_dir]) == 0
    printed = capsys.readouterr().out
    assert "standard library" in printed and "| method | val CE | perplexity |" in printed
    results = _results(whole)
    table = {e["method"]: e for e in results["summary"]}
    assert list(table) == ["ce", "kl", "top8_tail", "fused_kl"]
    for e in table.values():
        assert 0 < e["val_loss"] < 10 and e["ppl"] == pytest.approx(np.exp(e["val_loss"]))
        assert e["tokens_per_s"] > 0 and e["peak_mib"] is not None
        assert f"| {e['method']} |" in printed
    # the fused lm_head computes the loss that kl computes through the full logits
    assert table["fused_kl"]["val_loss"] == pytest.approx(table["kl"]["val_loss"], abs=1e-4)
    assert table["kl"]["vs_ce_val_loss_pairs"] == 1 and table["ce"]["vs_ce_val_loss"] is None
    assert (tmp_path / "whole" / "val_loss.png").stat().st_size > 1000
    assert "Offline teacher cache: top-64" in printed
    assert "Data: the Python 3." in printed and "2016 training tokens" in printed
    assert f"file list {lm_data.files_digest(lm_data.split_files())}" in printed
    run = results["run"]
    assert run["cache"]["bytes_per_token"] == 64 * 6 + 4 and run["cache"]["tokens"] == 2016

    # the cached rows of a window are the trained teacher's top-64 on that window
    teacher = lm.models.build_gpt("1x64", 300, 32)
    teacher.load_state_dict(torch.load(os.path.join(whole, "checkpoints", "teacher.pt"),
                                       weights_only=False)["model"])
    data = lm_data.load(300, cache_dir)
    window = lm.windows_of(data.train[:2048], 32)[17]
    with torch.no_grad():
        log_p = torch.log_softmax(teacher.logits(window[None, :-1])[0].double(), -1)
    indices, values, _ = teacher_cache.TeacherCache(os.path.join(whole, "teacher-cache")).rows(
        np.arange(17 * 32, 18 * 32))
    # (the teacher's logits in a batch of one window: equal to float32 rounding)
    torch.testing.assert_close(values, log_p.gather(-1, indices).float(), rtol=0, atol=1e-5)
    assert (values.double() >= log_p.topk(65, -1).values[:, 64:] - 1e-5).all()
    assert (indices.sort(-1).values[:, 1:] > indices.sort(-1).values[:, :-1]).all()

    # stopped in the teacher's training, then in the cached-teacher student's (after 1 teacher,
    # 2 ce, 2 kl evaluations, the cache written, 1 of top8_tail), then finished
    args = TINY + methods + ["--cache-dir", cache_dir]
    assert cli.main(args + ["--out", cut, "--interrupt-after", "1"]) == 3
    assert cli.main(["--resume", cut, "--interrupt-after", "6", "--no-progress"]) == 3
    started = torch.load(os.path.join(cut, "checkpoints", "top8_tail-seed0.pt"),
                         weights_only=False)["state"]
    assert started["step"] == 2 and not os.path.exists(
        os.path.join(cut, "checkpoints", "fused_kl-seed0.pt"))
    cache = os.path.join(cut, "teacher-cache")
    before = _snapshot(cache)
    assert set(before) == {"meta.json", "indices.npy", "values.npy", "tail.npy"}
    capsys.readouterr()
    assert cli.main(["--resume", cut, "--no-progress"]) == 0
    assert "this invocation only: the run was resumed" in capsys.readouterr().out
    assert _snapshot(cache) == before  # reused: neither rewritten nor touched
    a, b = _weights(whole), _weights(cut)
    assert a.keys() == b.keys() and len(a) == 5
    for name in a:
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]), (name, key)
    for x, y in zip(results["summary"], _results(cut)["summary"]):
        assert (x["method"], x["val_loss"]) == (y["method"], y["val_loss"])


@pytest.mark.slow
def test_padded_teacher_vocabulary(tmp_path, cache_dir, capsys):
    """--pad-teacher-vocab 64: a teacher of 320 rows for the 300 tokens; every teacher form
    distils with padded_teacher=True (dense logits, cached top-k, fused lm_head)."""
    out = str(tmp_path / "pad")
    assert cli.main(TINY + ["--methods", "kl,top64_tail,top8,fused_kl", "--pad-teacher-vocab",
                            "64", "--out", out, "--cache-dir", cache_dir]) == 0
    assert "padded to 320 for the teacher" in capsys.readouterr().out
    teacher = torch.load(os.path.join(out, "checkpoints", "teacher.pt"), weights_only=False)
    assert teacher["model"]["lm_head.weight"].shape == (320, 64)
    assert teacher["model"]["embed.weight"].shape == (320, 64)
    results = _results(out)
    assert results["run"]["teacher_vocab"] == 320 and results["run"]["vocab_size"] == 300
    table = {e["method"]: e for e in results["summary"]}
    assert all(0 < e["val_loss"] < 10 for e in table.values())
    assert table["fused_kl"]["val_loss"] == pytest.approx(table["kl"]["val_loss"], abs=1e-4)
    student = torch.load(os.path.join(out, "checkpoints", "kl-seed0.pt"), weights_only=False)
    assert student["model"]["lm_head.weight"].shape == (300, 32)


def test_padded_teacher_loss_drops_the_padding():
    """The loss of a padded teacher is the loss of its first V columns, in every form."""
    import argparse
    cfg = argparse.Namespace(temperature=1.0, kd_weight=0.9, ce_weight=0.1, pad_teacher_vocab=8)
    g = torch.Generator().manual_seed(0)
    h, W = torch.randn(6, 16, generator=g), torch.randn(300, 16, generator=g)
    ht, Wt = torch.randn(6, 24, generator=g), torch.randn(304, 24, generator=g)
    Wt[300:] += 5  # padding rows that would dominate were they read
    y = torch.randint(0, 300, (6,), generator=g)
    unpadded = argparse.Namespace(**dict(vars(cfg), pad_teacher_vocab=0))
    for name in ("kl", "fused_kl", "jsd"):
        method = lm.METHODS[name]
        torch.testing.assert_close(lm.loss_of(method, cfg, h, W, (ht, Wt), y),
                                   lm.loss_of(method, unpadded, h, W, (ht, Wt[:300]), y))
    with pytest.raises(ValueError, match="padded_teacher"):
        lm.loss_of(lm.METHODS["kl"], unpadded, h, W, (ht, Wt), y)
    # cached top-k with padding tokens among them: those slots are dropped into the tail
    indices = torch.tensor([[301, 5, 7]] * 6)
    values = torch.log(torch.tensor([[0.5, 0.3, 0.1]] * 6))
    method = lm.METHODS["top8_tail"]
    padded_loss = lm.loss_of(method, cfg, h, W, lm.sparse_teacher(method, indices, values, 304),
                             y)
    dropped = lm.sparse_teacher(method, indices.masked_fill(indices >= 300, -1), values, 300)
    torch.testing.assert_close(padded_loss, lm.loss_of(method, unpadded, h, W, dropped, y))
    # the cache's width goes with its rows: a token past it is no padding, but an error
    with pytest.raises(ValueError, match="classes >= its vocab_size 304: e.g. 999"):
        lm.loss_of(method, cfg, h, W, lm.sparse_teacher(method, indices.fill_(999), values, 304),
                   y)


@pytest.mark.parametrize("args,message", [
    (["--vocab-size", "100"], "--vocab-size must be >= 257"),
    (["--student-arch", "2y128"], "--student-arch"),
    (["--teacher-arch", "mlp_large"], "--teacher-arch"),
    (["--methods", "ce,kd"], "unknown method"),
    (["--train-tokens", "10"], "--train-tokens"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--pad-teacher-vocab", "-1"], "--pad-teacher-vocab must be >= 0"),
    (["--pad-teacher-vocab", "100"], "--pad-teacher-vocab must be a multiple of 8"),
    (["--vocab-parallel"], "--vocab-parallel: not an option of --task lm (it would do nothing)"),
    (["--teacher-swap-pairs", "3-8"], "--teacher-swap-pairs: not an option of --task lm"),
    (["--epochs", "3", "--dataset", "mnist"], "--dataset, --epochs: not an option of --task lm"),
])
def test_bad_lm_configuration(args, message, tmp_path, capsys):
    assert cli.main(["--task", "lm"] + args + ["--out", str(tmp_path / "never")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def _tiny_data(train, val):
    return lm_data.LMData(train=torch.arange(train) % 300, val=torch.arange(val) % 300,
                          vocab_size=300, python="3.x", files={"train": 1, "val": 1},
                          digest="0" * 12, cache="")


@pytest.mark.parametrize("train,val,split", [(5000, 40, "validation"), (40, 5000, "train")])
def test_context_longer_than_a_token_stream(train, val, split, tmp_path, capsys, monkeypatch):
    """Checked before any window is cut (unfold would raise) and before the run folder."""
    monkeypatch.setattr(lm_data, "load_shared", lambda *args: _tiny_data(train, val))
    args = ["--task", "lm", "--context", "64", "--train-tokens", "0", "--val-tokens", "64"]
    assert cli.main(args + ["--out", str(tmp_path / "never")]) == 2
    err = capsys.readouterr().err
    assert f"--context 64 is longer than the {split} token stream ({min(train, val)} " in err
    assert not (tmp_path / "never").exists()


def test_driver_without_tokenizers_says_what_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import tokenizers: ImportError
    assert cli.main(["--task", "lm", "--out", str(tmp_path / "never")]) == 2
    err = capsys.readouterr().err
    assert "needs the tokenizers package: pip install 'kdkernels[train]'" in err


def test_ranks_other_than_0_load_the_data_after_rank_0_built_it(monkeypatch):
    """Under torchrun rank 0 trains the tokenizer; the others wait, then read its cache; an
    error on rank 0 reaches them instead of a hang."""
    events = []
    dist = torch.distributed
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)

    def broadcast(outcome, src):
        events.append(("broadcast", outcome[0]))
        outcome[0] = shared[0]
    monkeypatch.setattr(dist, "broadcast_object_list", broadcast)
    monkeypatch.setattr(lm_data, "load", lambda *args: events.append("load") or "data")
    for rank in (0, 1):
        monkeypatch.setattr(dist, "get_rank", lambda rank=rank: rank)
        events.clear()
        shared = [None]
        assert lm_data.load_shared(300) == "data"
        assert events == (["load", ("broadcast", None)] if rank == 0
                          else [("broadcast", None), "load"])
    shared = ["OSError: disk full"]  # rank 0 failed: rank 1 raises, loads nothing
    events.clear()
    with pytest.raises(RuntimeError, match="rank 0 could not build .*disk full"):
        lm_data.load_shared(300)
    assert events == [("broadcast", None)]


def test_eval_batches_bound_the_logits():
    """The cpu preset keeps its 4 training batches per forward-only batch (the same numbers as
    before the bound); the gpu preset's logits stay within EVAL_LOGITS_BYTES."""
    import argparse

    from kdkernels.train.config import LM_PRESETS
    cpu, gpu = (argparse.Namespace(**LM_PRESETS[p]) for p in ("cpu", "gpu"))
    assert lm.eval_batch(cpu, 8192) == 4 * cpu.batch_size == 32
    windows = lm.eval_batch(gpu, 32768)
    assert windows == 16 and 4 * windows * gpu.context * 32768 <= lm.EVAL_LOGITS_BYTES
    assert lm.eval_batch(gpu, 10 ** 9) == 1


def _lm_rows(method, losses):
    return [dict(method=method, seed=seed, val_loss=v, ppl=float(np.exp(v)), tokens_per_s=100.0,
                 train_seconds=1.0, history=[(1, v + 1), (2, v)])
            for seed, v in enumerate(losses)]


def test_lm_report_pairs_against_ce_and_kl(tmp_path):
    rows = (_lm_rows("ce", [5.0, 5.2, 5.1]) + _lm_rows("kl", [4.9, 5.0, 5.05])
            + _lm_rows("top8", [4.95, 5.1, 5.0]))
    table = report.summarise_lm(rows, ["ce", "kl", "top8"], {"kl": 96.0})
    ce, kl, top8 = table
    assert ce["vs_ce_val_loss"] is None and kl["vs_kl_val_loss"] is None
    assert kl["vs_ce_val_loss"] == pytest.approx(-0.35 / 3)
    assert (top8["vs_kl_val_loss_higher"], top8["vs_kl_val_loss_lower"]) == (2, 1)
    assert top8["vs_kl_val_loss"] == pytest.approx(0.1 / 3)
    assert kl["peak_mib"] == 96.0 and ce["peak_mib"] is None
    text, written = report.write_lm(str(tmp_path), {}, table, rows, {"phases": {"data": 1.0}},
                                    "t")
    assert "| kl | 4.983 ± 0.076 |" in text and "| 96.0 |" in text
    assert "-0.117 ± 0.076 (3/0)" in text  # kl vs ce: lower on all three seeds
    assert written[-1] == "val_loss.png" and (tmp_path / "val_loss.png").stat().st_size > 1000
    assert "Time per phase: data 1 s." in text


@pytest.mark.slow
def test_two_process_lm_run(tmp_path, cache_dir):
    """torchrun, 2 gloo processes: the teacher, its cache (written by rank 0) and the students
    train data-parallel and the table is printed once."""
    import subprocess

    from test_vocab_parallel import _free_port
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(_free_port()), "-m", "kdkernels.train", "--methods",
           "ce,top8_tail,kl", "--out", str(tmp_path / "ddp"), "--cache-dir", cache_dir] + TINY
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 processes" in done.stdout and done.stdout.count("| method | val CE |") == 1
    table = _results(str(tmp_path / "ddp"))["summary"]
    assert [e["method"] for e in table] == ["ce", "top8_tail", "kl"]
    assert all(0 < e["val_loss"] < 10 for e in table)
