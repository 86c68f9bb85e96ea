"""kdkernels-train: train a teacher, then students under every method, and print one table.

    kdkernels-train                         # digits, every method, 3 seeds (a few minutes on 2 CPUs)
    kdkernels-train --methods kd,teacher_bias --seeds 5
    kdkernels-train --dataset cifar100 --data-dir ~/data --teacher-arch resnet32x4 \\
                    --student-arch resnet8x4 --epochs 240
    kdkernels-train --resume runs/digits-20261122-063000   # continue an interrupted run
    torchrun --nproc_per_node 2 -m kdkernels.train ...      # DistributedDataParallel
"""
import argparse
import csv
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

from . import data as datasets
from . import models
from .loop import Budget, Interrupted, accuracy, autocast_for, rank_and_world, train
from .methods import METHODS, top_score_difference

DEFAULTS = {  # per data set: the small ones run in minutes on 2 CPU cores
    # teacher_epochs: a teacher trained to zero training error makes no mistakes to correct,
    # so on the small sets the teachers train briefly and err on a few percent of the rows.
    "digits": dict(epochs=30, teacher_epochs=4, batch_size=64, lr=0.05, teacher_arch="mlp_large",
                   student_arch="mlp_tiny"),
    "mnist": dict(epochs=20, teacher_epochs=3, batch_size=64, lr=0.05, teacher_arch="mlp_large",
                  student_arch="mlp_tiny"),
    "cifar10": dict(epochs=240, teacher_epochs=240, batch_size=64, lr=0.05,
                    teacher_arch="resnet56", student_arch="resnet20"),
    "cifar100": dict(epochs=240, teacher_epochs=240, batch_size=64, lr=0.05,
                     teacher_arch="resnet32x4", student_arch="resnet8x4"),
}


def parser():
    p = argparse.ArgumentParser(prog="kdkernels-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="digits", choices=sorted(DEFAULTS))
    p.add_argument("--data-dir", help="folder with the CIFAR python-pickle files")
    p.add_argument("--download", action="store_true", help="fetch CIFAR with torchvision")
    p.add_argument("--methods", default="all",
                   help=f"comma-separated, or 'all': {', '.join(METHODS)}")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (0, 1, ...)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--teacher-epochs", type=int, help="epochs of the teachers (default per data set)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--teacher-arch")
    p.add_argument("--student-arch")
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--kd-weight", type=float, default=0.9)
    p.add_argument("--ce-weight", type=float, default=0.1)
    p.add_argument("--tau0", type=float, default=4.0, help="DTD base temperature")
    p.add_argument("--beta", type=float, default=1.0, help="DTD strength")
    p.add_argument("--smooth-eps", type=float, default=0.1)
    p.add_argument("--ls-eps", type=float, default=0.1, help="label smoothing baseline")
    p.add_argument("--tfkd-a", type=float, default=0.99)
    p.add_argument("--tfkd-temperature", type=float, default=20.0)
    p.add_argument("--tsd-eta", type=float, default=0.6)
    p.add_argument("--tsd-k", type=int, default=5)
    p.add_argument("--generations", type=int, default=2, help="born-again generations after 0")
    p.add_argument("--out", help="run folder (default runs/<dataset>-<time>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run saved in RUN_DIR")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--interrupt-after", type=int, default=0, help=argparse.SUPPRESS)
    return p


def fail(message):
    raise SystemExit(f"kdkernels-train: error: {message}")


def check_config(cfg):
    """Every configuration error is reported here, before any training."""
    for key, value in DEFAULTS[cfg.dataset].items():
        if getattr(cfg, key) is None:
            setattr(cfg, key, value)
    names = list(METHODS) if cfg.methods == "all" else [m.strip() for m in cfg.methods.split(",")
                                                         if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        fail(f"unknown method(s) {unknown or cfg.methods!r}; choose from {', '.join(METHODS)}")
    cfg.method_list = names
    positive_ints = ["seeds", "epochs", "teacher_epochs", "batch_size", "generations", "tsd_k"]
    for key in positive_ints:
        if getattr(cfg, key) < 1:
            fail(f"--{key.replace('_', '-')} must be >= 1, got {getattr(cfg, key)}")
    for key in ["lr", "temperature", "tau0", "tfkd_temperature"]:
        value = getattr(cfg, key)
        if not (math.isfinite(value) and value > 0):
            fail(f"--{key.replace('_', '-')} must be > 0, got {value}")
    for key in ["kd_weight", "ce_weight", "beta", "weight_decay"]:
        value = getattr(cfg, key)
        if not (math.isfinite(value) and value >= 0):
            fail(f"--{key.replace('_', '-')} must be >= 0, got {value}")
    for key in ["smooth_eps", "ls_eps", "tsd_eta"]:
        if not 0 <= getattr(cfg, key) <= 1:
            fail(f"--{key.replace('_', '-')} must be in [0, 1], got {getattr(cfg, key)}")
    if not 0 < cfg.tfkd_a <= 1:
        fail(f"--tfkd-a must be in (0, 1], got {cfg.tfkd_a}")
    for key in ["teacher_arch", "student_arch"]:
        arch = getattr(cfg, key)
        if arch not in models.ARCHITECTURES:
            fail(f"--{key.replace('_', '-')} {arch!r} unknown; choose from "
                 f"{', '.join(models.ARCHITECTURES)}")
        image_arch = arch in models.RESNETS
        if image_arch != cfg.dataset.startswith("cifar"):
            fail(f"--{key.replace('_', '-')} {arch} does not fit --dataset {cfg.dataset}")
    if cfg.dataset.startswith("cifar"):
        if not cfg.data_dir:
            fail(f"--dataset {cfg.dataset} needs --data-dir")
        if not cfg.download and datasets.find_cifar_dir(cfg.dataset, cfg.data_dir) is None:
            fail(f"--data-dir {cfg.data_dir!r} holds no {cfg.dataset} python-pickle files "
                 f"(pass --download to fetch them with torchvision)")
    if cfg.device not in ("auto", "cpu", "cuda"):
        fail(f"--device must be auto, cpu or cuda, got {cfg.device!r}")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda but no CUDA device is available")
    return cfg


SAVED_KEYS = ["dataset", "data_dir", "methods", "seeds", "epochs", "teacher_epochs", "batch_size", "lr",
              "weight_decay", "teacher_arch", "student_arch", "temperature", "kd_weight",
              "ce_weight", "tau0", "beta", "smooth_eps", "ls_eps", "tfkd_a", "tfkd_temperature",
              "tsd_eta", "tsd_k", "generations"]


def configure(argv):
    cfg = parser().parse_args(argv)
    if cfg.resume:
        path = os.path.join(cfg.resume, "config.json")
        if not os.path.isfile(path):
            fail(f"--resume {cfg.resume!r}: no config.json there")
        with open(path) as handle:
            saved = json.load(handle)
        for key in SAVED_KEYS:
            setattr(cfg, key, saved[key])
        cfg.out = cfg.resume
    else:
        cfg.out = cfg.out or os.path.join("runs", f"{cfg.dataset}-{time.strftime('%Y%m%d-%H%M%S')}")
        if os.path.exists(os.path.join(cfg.out, "config.json")):
            fail(f"{cfg.out} already holds a run: --resume {cfg.out} continues it")
    return check_config(cfg)


class Runner:
    """Trains what the chosen methods need, once per seed, with a checkpoint per model."""

    def __init__(self, cfg, data, device):
        self.cfg, self.data, self.device = cfg, data, device
        self.budget = Budget(cfg.interrupt_after)
        self.autocast = autocast_for(device)
        self.cache = {}

    def model(self, key, arch, loss_fn, seed, teacher=None, epochs=None):
        """Trained model `key` for `seed` (trained now, resumed, or loaded when done)."""
        if (key, seed) in self.cache:
            return self.cache[(key, seed)]
        # same seed and architecture, same initial weights: students differ by method alone
        torch.manual_seed(seed * 7919 + sum(map(ord, arch)))
        net = models.build(arch, self.data)
        path = os.path.join(self.cfg.out, "checkpoints", f"{key}-seed{seed}.pt")
        result = train(net, loss_fn, self.data, self.cfg, seed, self.device, path,
                       teacher=teacher, budget=self.budget, desc=f"{key} seed {seed}",
                       epochs=epochs)
        self.cache[(key, seed)] = (net, result)
        return net, result

    def teacher_for(self, kind, seed):
        cfg, ce = self.cfg, METHODS["ce"].make_loss(self.cfg)
        if kind == "teacher":
            return self.model("teacher", cfg.teacher_arch, ce, seed, epochs=cfg.teacher_epochs)[0]
        if kind == "self":
            return self.model("ce", cfg.student_arch, ce, seed)[0]
        if kind == "tolerant":
            return self.model("tolerant_teacher", cfg.teacher_arch, top_score_difference(cfg),
                              seed, epochs=cfg.teacher_epochs)[0]
        return None

    def run_method(self, name, seed):
        cfg, method = self.cfg, METHODS[name]
        if method.teacher == "generations":
            net, _ = self.model("born_again_gen0", cfg.student_arch, top_score_difference(cfg),
                                seed)
            for generation in range(1, cfg.generations + 1):
                teacher = net
                net, result = self.model(f"born_again_gen{generation}", cfg.student_arch,
                                         method.make_loss(cfg), seed, teacher=teacher)
        else:
            teacher = self.teacher_for(method.teacher, seed)
            net, result = self.model(name, cfg.student_arch, method.make_loss(cfg), seed,
                                     teacher=teacher)
        teacher_acc = None
        if teacher is not None:
            teacher_acc = accuracy(teacher, self.data.x_test, self.data.y_test, cfg, self.device,
                                   self.autocast)
        return dict(method=name, seed=seed, last=result["last"], best=result["best"],
                    teacher_acc=teacher_acc, **(result["stats"] or {}))


def summarise(rows, methods):
    def mean_std(values):
        values = [v for v in values if v is not None]
        if not values:
            return None, None
        return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    table = []
    for name in methods:
        mine = [r for r in rows if r["method"] == name]
        entry = {"method": name, "seeds": len(mine)}
        for key in ["last", "best", "teacher_acc", "wrong", "fixed", "temperature"]:
            entry[key], entry[f"{key}_std"] = mean_std([r.get(key) for r in mine])
        if not METHODS[name].teacher or name in ("tfkd_reg",):
            entry["wrong"] = entry["fixed"] = None
        table.append(entry)
    return table


def markdown(table):
    def pct(mean, std=None):
        if mean is None:
            return "-"
        return f"{100 * mean:.2f} ± {100 * std:.2f}" if std is not None else f"{100 * mean:.1f}"

    lines = ["| method | student top-1 (last) | student top-1 (best) | teacher top-1 | "
             "teacher wrong (train) | fixed by correction | mean T |",
             "|---|---|---|---|---|---|---|"]
    for e in table:
        corrects = e["method"].startswith("lessons") or e["method"] == "teacher_bias"
        mean_t = "-" if e["temperature"] is None else f"{e['temperature']:.2f}"
        lines.append(
            f"| {e['method']} | {pct(e['last'], e['last_std'])} | {pct(e['best'], e['best_std'])} "
            f"| {pct(e['teacher_acc'])} | {pct(e['wrong'])} "
            f"| {pct(e['fixed']) if corrects else '-'} "
            f"| {mean_t} |")
    return "\n".join(lines)


def plot(table, path, title):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(10, 4.5))
    names = [e["method"] for e in table]
    means = [100 * e["last"] for e in table]
    stds = [100 * e["last_std"] for e in table]
    ax.bar(range(len(names)), means, yerr=stds, capsize=3, color="#4477aa")
    ax.set_xticks(range(len(names)), names, rotation=35, ha="right")
    low = min(m - s for m, s in zip(means, stds))
    ax.set_ylim(max(0, low - 2), min(100, max(means) + 2))
    ax.set_ylabel("student top-1 (%), last epoch")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None):
    cfg = configure(sys.argv[1:] if argv is None else argv)
    # one GPU per local process: more processes than GPUs run on the CPU (auto) or stop (cuda)
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    enough_gpus = torch.cuda.is_available() and torch.cuda.device_count() >= local_processes
    if cfg.device == "auto":
        cfg.device = "cuda" if enough_gpus else "cpu"
    elif cfg.device == "cuda" and not enough_gpus:
        fail(f"--device cuda needs one GPU per process: {local_processes} processes, "
             f"{torch.cuda.device_count()} GPU(s)")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cfg.device == "cuda" else "gloo")
    rank, world = rank_and_world()
    device = torch.device(cfg.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    data = datasets.load(cfg.dataset, cfg.data_dir, cfg.download)
    if rank == 0:
        os.makedirs(os.path.join(cfg.out, "checkpoints"), exist_ok=True)
        with open(os.path.join(cfg.out, "config.json"), "w") as handle:
            json.dump({k: getattr(cfg, k) for k in SAVED_KEYS}, handle, indent=1)
        print(f"kdkernels-train: {cfg.dataset} ({len(data.y_train)} train / {len(data.y_test)} "
              f"test), teacher {cfg.teacher_arch} ({cfg.teacher_epochs} epochs), student "
              f"{cfg.student_arch} ({cfg.epochs} epochs), {cfg.seeds} seeds, {len(cfg.method_list)} methods, {world} process(es) "
              f"on {device}; backend {kdkernels_backend(device)}; run folder {cfg.out}",
              flush=True)
    if world > 1:
        dist.barrier()
    started = time.time()
    runner = Runner(cfg, data, device)
    rows = []
    try:
        for seed in range(cfg.seeds):
            for name in cfg.method_list:
                rows.append(runner.run_method(name, seed))
    except Interrupted as stop:
        if rank == 0:
            print(f"kdkernels-train: {stop}; resume with: kdkernels-train --resume {cfg.out}")
        return 3
    table = summarise(rows, cfg.method_list)
    if rank == 0:
        text = markdown(table)
        print(text)
        print(f"kdkernels-train: {time.time() - started:.0f} s; results in {cfg.out}")
        with open(os.path.join(cfg.out, "results.json"), "w") as handle:
            json.dump({"config": {k: getattr(cfg, k) for k in SAVED_KEYS}, "summary": table,
                       "runs": rows}, handle, indent=1)
        with open(os.path.join(cfg.out, "results.md"), "w") as handle:
            handle.write(text + "\n")
        with open(os.path.join(cfg.out, "results.csv"), "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(table[0]))
            writer.writeheader()
            writer.writerows(table)
        plot(table, os.path.join(cfg.out, "accuracy.png"),
             f"{cfg.dataset}: {cfg.student_arch} students, {cfg.seeds} seeds")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def kdkernels_backend(device):
    from kdkernels.ops import resolve
    return resolve("auto", device).NAME


if __name__ == "__main__":
    sys.exit(main())
