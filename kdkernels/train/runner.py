"""Runs what a configuration asks for: picks the device (and the process group under torchrun),
trains the teachers and a student per method and seed, and measures each student."""
import dataclasses
import os

import torch
import torch.distributed as dist

from . import data as datasets
from . import models
from .config import ConfigError
from .loop import Budget, autocast_for, logits_of, train
from .methods import METHODS, top_score_difference


def choose_device(cfg):
    """The torch.device of this process (and its CPU threads); starts the process group when
    launched by torchrun. One GPU per local process: more processes than GPUs run on the CPU
    (auto) or stop (cuda)."""
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    enough_gpus = torch.cuda.is_available() and torch.cuda.device_count() >= local_processes
    if cfg.device == "auto":
        cfg.device = "cuda" if enough_gpus else "cpu"
    elif cfg.device == "cuda" and not enough_gpus:
        raise ConfigError(f"--device cuda needs one GPU per process: {local_processes} "
                          f"processes, {torch.cuda.device_count()} GPU(s)")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cfg.device == "cuda" else "gloo")
    device = torch.device(cfg.device)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    elif device.type == "cpu" and cfg.dataset in ("digits", "mnist"):
        torch.set_num_threads(1)  # MLPs on 64-784 features: a second thread only waits
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    return device


def inherited_errors(student_pred, teacher_pred, y):
    """The student's test errors (`errors`), those on which the teacher predicts the same wrong
    class (`inherited_rows`), and their share (`inherited`, None when the student makes no
    error)."""
    wrong = student_pred != y
    errors = int(wrong.sum())
    inherited_rows = int((wrong & (student_pred == teacher_pred)).sum())
    return dict(inherited=inherited_rows / errors if errors else None,
                inherited_rows=inherited_rows, errors=errors)


class Runner:
    """Trains what the chosen methods need, once per seed, with a checkpoint per model."""

    def __init__(self, cfg, data, device):
        self.cfg, self.data, self.device = cfg, data, device
        self.budget = Budget(cfg.interrupt_after)
        self.autocast = autocast_for(device)
        self.cache = {}
        # the inherited-error share is measured against the CE-trained teacher: trained when a
        # method distils from it or when the teacher-error setting is on
        self.measures_inheritance = bool(cfg.swap_pairs) or any(
            METHODS[name].teacher == "teacher" for name in cfg.method_list)

    def model(self, key, arch, loss_fn, seed, teacher=None, epochs=None, data=None):
        """Trained model `key` for `seed` (trained now, resumed, or loaded when done)."""
        if (key, seed) in self.cache:
            return self.cache[(key, seed)]
        # same seed and architecture, same initial weights: students differ by method alone
        torch.manual_seed(seed * 7919 + sum(map(ord, arch)))
        net = models.build(arch, self.data)
        path = os.path.join(self.cfg.out, "checkpoints", f"{key}-seed{seed}.pt")
        data = self.data if data is None else data
        result = train(net, loss_fn, data, self.cfg, seed, self.device, path, teacher=teacher,
                       budget=self.budget, desc=f"{key} seed {seed}", epochs=epochs)
        self.cache[(key, seed)] = (net, result)
        return net, result

    def teacher_data(self, seed):
        """The teachers' training data: the labels of --teacher-swap-pairs exchanged on a
        fraction of their rows (a different choice of rows per seed), or the data as it is."""
        if not self.cfg.swap_pairs:
            return self.data
        y = datasets.exchange_labels(self.data.y_train, self.cfg.swap_pairs,
                                     self.cfg.teacher_swap_fraction, seed)
        return dataclasses.replace(self.data, y_train=y)

    def teacher_for(self, kind, seed):
        cfg, ce = self.cfg, METHODS["ce"].make_loss(self.cfg)
        if kind == "teacher":
            return self.model("teacher", cfg.teacher_arch, ce, seed, epochs=cfg.teacher_epochs,
                              data=self.teacher_data(seed))[0]
        if kind == "self":
            return self.model("ce", cfg.student_arch, ce, seed)[0]
        if kind == "tolerant":
            return self.model("tolerant_teacher", cfg.teacher_arch, top_score_difference(cfg),
                              seed, epochs=cfg.teacher_epochs, data=self.teacher_data(seed))[0]
        return None

    def predictions(self, net):
        return logits_of(net, self.data.x_test, self.cfg.batch_size * 4, self.device,
                         self.autocast).argmax(-1).cpu()

    def run_method(self, name, seed):
        """One student: its accuracy (last and best epoch), its teacher's accuracy, the loss
        statistics, and the share of its test errors inherited from the CE-trained teacher."""
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
        y = self.data.y_test
        teacher_acc = None
        if teacher is not None:
            teacher_acc = (self.predictions(teacher) == y).float().mean().item()
        row = dict(method=name, seed=seed, last=result["last"], best=result["best"],
                   teacher_acc=teacher_acc, inherited=None, inherited_rows=None, errors=None)
        row.update(result["stats"] or {})
        if self.measures_inheritance:
            main_teacher = self.teacher_for("teacher", seed)
            row.update(inherited_errors(self.predictions(net), self.predictions(main_teacher), y))
        return row


def run(cfg, data, device):
    """Every method for every seed; the per-seed rows. Raises loop.Interrupted for
    --interrupt-after (the checkpoints are on disk)."""
    runner = Runner(cfg, data, device)
    return [runner.run_method(name, seed) for seed in range(cfg.seeds)
            for name in cfg.method_list]
