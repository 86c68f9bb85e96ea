"""The driver's configuration: the command-line options, their defaults per data set, and every
check on them. Errors are ConfigError (a ValueError) naming the option; only cli.py turns them into
a message and an exit status."""
import argparse
import json
import math
import os
import time

import torch

from . import data as datasets
from . import models
from .lm import METHODS as LM_METHODS
from .methods import METHODS

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

# what a run saves in config.json, and what --resume restores
SAVED_KEYS = ["dataset", "data_dir", "methods", "seeds", "epochs", "teacher_epochs", "batch_size",
              "lr", "weight_decay", "teacher_arch", "student_arch", "temperature", "kd_weight",
              "ce_weight", "tau0", "beta", "smooth_eps", "ls_eps", "tfkd_a", "tfkd_temperature",
              "tsd_eta", "tsd_k", "generations", "teacher_swap_pairs", "teacher_swap_fraction",
              "vocab_parallel"]

DEFAULT_SWAP_FRACTION = 0.6

# --task lm (kdkernels.train.lm), per --preset. cpu: sized to finish within 10 minutes on 2 CPU
# cores (README, "Distilling a language model"); gpu: a larger run for one GPU.
LM_PRESETS = {
    "cpu": dict(vocab_size=8192, context=128, batch_size=8, steps=100, teacher_steps=250,
                train_tokens=262144, val_tokens=16384, eval_every=25, lr=2e-3,
                teacher_arch="4x256", student_arch="2x128", seeds=2),
    "gpu": dict(vocab_size=32768, context=256, batch_size=64, steps=2000, teacher_steps=6000,
                train_tokens=0, val_tokens=262144, eval_every=200, lr=1e-3,
                teacher_arch="8x512", student_arch="4x256", seeds=3),
}
LM_SAVED_KEYS = ["task", "preset", "methods", "seeds", "temperature", "kd_weight", "ce_weight",
                 "weight_decay", "pad_teacher_vocab", "cache_dir"] + sorted(LM_PRESETS["cpu"])
# options one task reads and the other would ignore: refused there unless left at the default
VISION_ONLY = ["dataset", "data_dir", "download", "epochs", "teacher_epochs", "tau0", "beta",
               "smooth_eps", "ls_eps", "tfkd_a", "tfkd_temperature", "tsd_eta", "tsd_k",
               "generations", "teacher_swap_pairs", "teacher_swap_fraction", "vocab_parallel"]
LM_ONLY = ["preset", "vocab_size", "context", "steps", "teacher_steps", "train_tokens",
           "val_tokens", "eval_every", "pad_teacher_vocab", "cache_dir"]


class ConfigError(ValueError):
    """A bad option; the message names it."""


def parser(description=None):
    p = argparse.ArgumentParser(prog="kdkernels-train", description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="vision", choices=["vision", "lm"],
                   help="vision: the classification data sets (default); lm: distil a language "
                        "model on the Python standard library's sources")
    p.add_argument("--dataset", default="digits", choices=sorted(DEFAULTS))
    p.add_argument("--data-dir", help="folder with the CIFAR python-pickle files")
    p.add_argument("--download", action="store_true", help="fetch CIFAR with torchvision")
    p.add_argument("--methods", default="all",
                   help=f"comma-separated, or 'all': {', '.join(METHODS)}; --task lm: "
                        f"{', '.join(LM_METHODS)}")
    p.add_argument("--seeds", type=int, help="number of seeds (0, 1, ...; default 3, lm 2)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--teacher-epochs", type=int,
                   help="epochs of the teachers (default per data set)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--teacher-arch")
    p.add_argument("--student-arch")
    p.add_argument("--temperature", type=float, help="default 4, lm 1")
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
    p.add_argument("--teacher-swap-pairs", metavar="A-B[,C-D...]",
                   help="the teacher-error setting: train the teachers (teacher and tolerant "
                        "teacher) with the labels of these class pairs exchanged on a fraction "
                        "of their training rows, e.g. 3-8,1-7; students still learn from the "
                        "true labels")
    p.add_argument("--teacher-swap-fraction", type=float,
                   help="fraction of each listed class's training rows whose label goes to its "
                        f"partner (default {DEFAULT_SWAP_FRACTION}; above 0.5 the teacher "
                        "learns the exchange)")
    p.add_argument("--vocab-parallel", action="store_true",
                   help="under torchrun: split each distilled student's classifier by its output "
                        "classes across the processes, with the loss in its vocab-parallel form "
                        "(one collective per step); the other models train data-parallel")
    lm = p.add_argument_group("--task lm (defaults from --preset)")
    lm.add_argument("--preset", default="cpu", choices=sorted(LM_PRESETS),
                    help="cpu: within 10 minutes on 2 cores; gpu: larger, for one GPU")
    lm.add_argument("--vocab-size", type=int, help="BPE vocabulary of the tokenizer")
    lm.add_argument("--context", type=int, help="tokens per training window")
    lm.add_argument("--steps", type=int, help="optimizer steps of each student")
    lm.add_argument("--teacher-steps", type=int)
    lm.add_argument("--train-tokens", type=int,
                    help="train on the first N tokens of the train split (0: all of it)")
    lm.add_argument("--val-tokens", type=int, help="validation tokens of each evaluation")
    lm.add_argument("--eval-every", type=int, help="steps between evaluations (checkpoints)")
    lm.add_argument("--pad-teacher-vocab", type=int, default=0, metavar="M",
                    help="pad the teacher's embedding and lm_head to a multiple of M rows (e.g. "
                         "128, as real models are); the students distil with padded_teacher")
    lm.add_argument("--cache-dir", help="tokenizer and token ids (default "
                                        "$XDG_CACHE_HOME/kdkernels/lm, ~/.cache/kdkernels/lm "
                                        "without it)")
    p.add_argument("--out", help="run folder (default runs/<dataset or lm>-<time>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run saved in RUN_DIR")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--threads", type=int,
                   help="CPU threads per process (default: 1 for the small MLP data sets, "
                        "whose tiny matrix products only lose time to a second thread, above "
                        "all on a shared machine; torch's default otherwise)")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar on a terminal, no progress lines elsewhere")
    p.add_argument("--interrupt-after", type=int, default=0, help=argparse.SUPPRESS)
    return p


def option(key):
    return "--" + key.replace("_", "-")


def parse_pairs(text, num_classes):
    """'3-8,1-7' -> [(3, 8), (1, 7)]; each class at most once, all below num_classes."""
    pairs, seen = [], set()
    for item in text.split(","):
        parts = item.strip().split("-")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ConfigError(f"--teacher-swap-pairs: {item.strip()!r} is not a pair of class "
                              f"numbers like 3-8")
        a, b = int(parts[0]), int(parts[1])
        if a == b or max(a, b) >= num_classes:
            raise ConfigError(f"--teacher-swap-pairs: {a}-{b} needs two different classes "
                              f"in 0..{num_classes - 1}")
        if {a, b} & seen:
            raise ConfigError(f"--teacher-swap-pairs: class {sorted({a, b} & seen)[0]} is in "
                              f"two pairs")
        seen |= {a, b}
        pairs.append((a, b))
    return pairs


def check_task_options(cfg):
    """Refuses an option of the other task (it would do nothing), unless at its default."""
    defaults = parser().parse_args([])
    other, ours = (VISION_ONLY, "lm") if cfg.task == "lm" else (LM_ONLY, "vision")
    given = [key for key in other if getattr(cfg, key) != getattr(defaults, key)]
    if given:
        raise ConfigError(f"{', '.join(map(option, given))}: not an option of --task {ours} "
                          f"(it would do nothing); it belongs to --task "
                          f"{'vision' if ours == 'lm' else 'lm'}")


def check(cfg):
    """Fills the per-data-set defaults and checks every option, before any training."""
    check_task_options(cfg)
    if cfg.task == "lm":
        return check_lm(cfg)
    for key, value in dict(DEFAULTS[cfg.dataset], seeds=3, temperature=4.0).items():
        if getattr(cfg, key) is None:
            setattr(cfg, key, value)
    check_common(cfg, METHODS)
    for key in ["epochs", "teacher_epochs", "batch_size", "generations", "tsd_k"]:
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{option(key)} must be >= 1, got {getattr(cfg, key)}")
    for key in ["tau0", "tfkd_temperature"]:
        value = getattr(cfg, key)
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{option(key)} must be > 0, got {value}")
    if not (math.isfinite(cfg.beta) and cfg.beta >= 0):
        raise ConfigError(f"--beta must be >= 0, got {cfg.beta}")
    for key in ["smooth_eps", "ls_eps", "tsd_eta"]:
        if not 0 <= getattr(cfg, key) <= 1:
            raise ConfigError(f"{option(key)} must be in [0, 1], got {getattr(cfg, key)}")
    if not 0 < cfg.tfkd_a <= 1:
        raise ConfigError(f"--tfkd-a must be in (0, 1], got {cfg.tfkd_a}")
    check_teacher_swap(cfg)
    for key in ["teacher_arch", "student_arch"]:
        arch = getattr(cfg, key)
        if arch not in models.ARCHITECTURES:
            raise ConfigError(f"{option(key)} {arch!r} unknown; choose from "
                              f"{', '.join(models.ARCHITECTURES)}")
        if (arch in models.RESNETS) != cfg.dataset.startswith("cifar"):
            raise ConfigError(f"{option(key)} {arch} does not fit --dataset {cfg.dataset}")
    if cfg.dataset.startswith("cifar"):
        if not cfg.data_dir:
            raise ConfigError(f"--dataset {cfg.dataset} needs --data-dir")
        if not cfg.download and datasets.find_cifar_dir(cfg.dataset, cfg.data_dir) is None:
            raise ConfigError(f"--data-dir {cfg.data_dir!r} holds no {cfg.dataset} python-pickle "
                              f"files (pass --download to fetch them with torchvision)")
    return cfg


def check_common(cfg, methods):
    """The checks both tasks share: methods, seeds, weights, temperature, device, threads."""
    names = list(methods) if cfg.methods == "all" else [m.strip() for m in cfg.methods.split(",")
                                                        if m.strip()]
    unknown = [m for m in names if m not in methods]
    if unknown or not names:
        raise ConfigError(f"--methods: unknown method(s) {unknown or cfg.methods!r}; choose "
                          f"from {', '.join(methods)}")
    cfg.method_list = names
    if cfg.seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {cfg.seeds}")
    for key in ["lr", "temperature"]:
        value = getattr(cfg, key)
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{option(key)} must be > 0, got {value}")
    for key in ["kd_weight", "ce_weight", "weight_decay"]:
        value = getattr(cfg, key)
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"{option(key)} must be >= 0, got {value}")
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"--device must be auto, cpu or cuda, got {cfg.device!r}")
    if cfg.threads is not None and cfg.threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {cfg.threads}")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but no CUDA device is available")


def check_lm(cfg):
    """--task lm: the preset's defaults, then the checks."""
    for key, value in dict(LM_PRESETS[cfg.preset], temperature=1.0).items():
        if getattr(cfg, key) is None:
            setattr(cfg, key, value)
    check_common(cfg, LM_METHODS)
    for key in ["vocab_size", "context", "batch_size", "steps", "teacher_steps", "val_tokens",
                "eval_every"]:
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{option(key)} must be >= 1, got {getattr(cfg, key)}")
    if cfg.vocab_size < 257:
        raise ConfigError(f"--vocab-size must be >= 257 (the 256 bytes and the end-of-file "
                          f"token), got {cfg.vocab_size}")
    for key in ["train_tokens", "pad_teacher_vocab"]:
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{option(key)} must be >= 0, got {getattr(cfg, key)}")
    if cfg.train_tokens and cfg.train_tokens < cfg.context + 1:
        raise ConfigError(f"--train-tokens must be 0 (all) or > --context, got "
                          f"{cfg.train_tokens}")
    if cfg.pad_teacher_vocab % 8:
        raise ConfigError(f"--pad-teacher-vocab must be a multiple of 8 (padded vocabularies "
                          f"are, and kdkernels' padded_teacher expects it), got "
                          f"{cfg.pad_teacher_vocab}")
    if cfg.val_tokens < cfg.context:
        raise ConfigError(f"--val-tokens must be >= --context, got {cfg.val_tokens}")
    for key in ["teacher_arch", "student_arch"]:
        try:
            models.parse_gpt(getattr(cfg, key))
        except ValueError as error:
            raise ConfigError(f"{option(key)}: {error}") from None
    cfg.swap_pairs, cfg.vocab_parallel = [], False
    cfg.dataset = "stdlib"
    return cfg


def check_teacher_swap(cfg):
    if cfg.teacher_swap_pairs is None:
        if cfg.teacher_swap_fraction is not None:
            raise ConfigError("--teacher-swap-fraction needs --teacher-swap-pairs")
        cfg.swap_pairs = []
        return
    cfg.swap_pairs = parse_pairs(cfg.teacher_swap_pairs, datasets.NUM_CLASSES[cfg.dataset])
    if cfg.teacher_swap_fraction is None:
        cfg.teacher_swap_fraction = DEFAULT_SWAP_FRACTION
    if not 0 < cfg.teacher_swap_fraction <= 1:
        raise ConfigError(f"--teacher-swap-fraction must be in (0, 1], got "
                          f"{cfg.teacher_swap_fraction}")


def configure(argv, description=None):
    """Parses argv (or restores a run for --resume) and checks it; raises ConfigError."""
    cfg = parser(description).parse_args(argv)
    if cfg.resume:
        path = os.path.join(cfg.resume, "config.json")
        if not os.path.isfile(path):
            raise ConfigError(f"--resume {cfg.resume!r}: no config.json there")
        with open(path) as handle:
            saved = json.load(handle)
        cfg.task = saved.get("task") or "vision"  # runs saved before --task were vision runs
        for key in LM_SAVED_KEYS if cfg.task == "lm" else SAVED_KEYS:
            setattr(cfg, key, saved.get(key))
        cfg.out = cfg.resume
    else:
        name = "lm" if cfg.task == "lm" else cfg.dataset
        cfg.out = cfg.out or os.path.join("runs", f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
        if os.path.exists(os.path.join(cfg.out, "config.json")):
            raise ConfigError(f"--out {cfg.out} already holds a run: --resume {cfg.out} "
                              f"continues it")
    return check(cfg)


def saved(cfg):
    if cfg.task == "lm":
        return {key: getattr(cfg, key) for key in LM_SAVED_KEYS}
    return {key: getattr(cfg, key) for key in SAVED_KEYS + ["task"]}
