"""One model's training: deterministic batches, checkpoints written atomically, exact resume,
DistributedDataParallel when launched by torchrun, or (--vocab-parallel) the classifier split by
its output classes across the processes, with the loss in its vocab-parallel form."""
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

import kdkernels

from .data import augment
from .models import features_and_head
from .progress import Progress, mode


class Interrupted(Exception):
    """Raised by --interrupt-after (for testing resume): the checkpoint is on disk."""


def autocast_for(device):
    """bf16 autocast on the GPU, none on the CPU; a factory, since each use needs a new context."""
    if device.type == "cuda":
        return lambda: torch.autocast("cuda", torch.bfloat16)
    return lambda: torch.autocast("cpu", enabled=False)


def distributed():
    return dist.is_available() and dist.is_initialized()


def rank_and_world():
    return (dist.get_rank(), dist.get_world_size()) if distributed() else (0, 1)


@dataclass(frozen=True)
class VocabShard:
    """This process's classes [start, end) of `size` under --vocab-parallel. Every process sees
    the whole batch and holds the whole model, but computes only its columns of the student's
    classifier and of the loss (kdkernels.vocab_parallel_distillation_loss: one collective per
    step); the parameters' gradients, each process's part of the one loss, are then summed."""
    start: int
    end: int
    size: int

    @classmethod
    def of_rank(cls, size, rank, world):
        bounds = [size * r // world for r in range(world + 1)]  # as even as the classes allow
        return cls(bounds[rank], bounds[rank + 1], size)

    def student_logits(self, model, x):
        features, head = features_and_head(model)
        bias = head.bias[self.start:self.end] if head.bias is not None else None
        return torch.nn.functional.linear(features(x), head.weight[self.start:self.end], bias)

    def columns(self, logits):
        return logits[:, self.start:self.end]

    def loss(self, module, s, t, y):
        return kdkernels.vocab_parallel_distillation_loss(
            s, t, y, vocab_start=self.start, vocab_size=self.size, return_stats=True,
            **module.primitive_options())

    @staticmethod
    def sum_gradients(model):
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))


def save_atomically(obj, path):
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a crash leaves the old checkpoint or the new one, never half of one


def _rng_state():
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state):
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def restore(checkpoint, model, optimizer, scheduler, state):
    """Loads `checkpoint` into the model, optimizer, scheduler and random generators when it
    exists and returns its training state; else returns `state` (a fresh start)."""
    if not os.path.exists(checkpoint):
        return state
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    _set_rng_state(saved["rng"])
    return saved["state"]


def save_checkpoint(checkpoint, model, optimizer, scheduler, state):
    """What `restore` reads back (written by rank 0 only): a resumed run continues exactly."""
    if rank_and_world()[0] == 0:
        save_atomically({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "rng": _rng_state(),
                         "state": state}, checkpoint)


@torch.no_grad()
def logits_of(model, x, batch_size, device, autocast):
    model.eval()
    out = []
    for i in range(0, len(x), batch_size):
        with autocast():
            out.append(model(x[i:i + batch_size].to(device)).float())
    return torch.cat(out)


def accuracy(model, x, y, cfg, device, autocast):
    return (logits_of(model, x, cfg.batch_size * 4, device, autocast).argmax(-1).cpu() == y
            ).float().mean().item()


class Budget:
    """Counts checkpoints written in this process (one per epoch, or per evaluation of a language
    model), for --interrupt-after."""
    def __init__(self, limit, unit="epochs"):
        self.limit, self.used, self.unit = limit, 0, unit

    def spend(self):
        self.used += 1
        if self.limit and self.used >= self.limit:
            raise Interrupted(f"stopped after {self.used} {self.unit} (--interrupt-after)")


def train(model, loss_fn, data, cfg, seed, device, checkpoint, teacher=None, budget=None,
          desc="", epochs=None):
    """Trains `model` in place with loss_fn(student_logits, teacher_logits, y, epoch), which
    returns the loss or (loss, DistillStats); returns the results. Resumes from `checkpoint`."""
    rank, world = rank_and_world()
    epochs = epochs or cfg.epochs
    model.to(device)
    net = model
    shard = None  # --vocab-parallel: this process's classes (for losses on kdkernels' primitive)
    if getattr(cfg, "vocab_parallel", False) and getattr(loss_fn, "shardable", False):
        shard = VocabShard.of_rank(data.num_classes, rank, world)
    elif distributed():
        net = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9,
                                weight_decay=cfg.weight_decay, nesterov=True)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    autocast = autocast_for(device)
    state = restore(checkpoint, model, optimizer, scheduler,
                    {"epoch": 0, "history": [], "stats": None})
    if teacher is not None:
        teacher.to(device).eval()

    x_train, y_train = data.x_train, data.y_train
    # a bar per model on a terminal, log lines elsewhere
    progress = Progress(desc, epochs, state["epoch"], mode(cfg.progress, rank))
    for epoch in range(state["epoch"], epochs):
        net.train()
        # the batch order depends on (seed, epoch) alone, so a resumed run sees the same batches
        g = torch.Generator().manual_seed(seed * 100003 + epoch)
        order = torch.randperm(len(y_train), generator=g)
        totals = {"rows": 0, "wrong": 0, "fixed": 0, "temperature": 0.0}
        batches = range(0, len(order), cfg.batch_size)
        for start in batches:
            idx = order[start:start + cfg.batch_size]
            if shard is None:  # data parallel: a slice of the batch per process
                idx = idx[rank::world]
            x, y = x_train[idx].to(device), y_train[idx].to(device)
            if data.image:
                x = augment(x, g)
            with autocast():
                logits = net(x) if shard is None else shard.student_logits(model, x)
                t_logits = None
                if teacher is not None:
                    with torch.no_grad():
                        t_logits = teacher(x)
                        if shard is not None:
                            t_logits = shard.columns(t_logits)
            t_logits = None if t_logits is None else t_logits.float()
            if shard is None:
                loss = loss_fn(logits.float(), t_logits, y, epoch)
            else:
                loss = loss_fn(logits.float(), t_logits, y, epoch, shard=shard)
            if isinstance(loss, tuple):
                loss, stats = loss
                _accumulate(totals, stats)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if shard is not None:
                shard.sum_gradients(model)
            optimizer.step()
        scheduler.step()
        acc = accuracy(model, data.x_test, data.y_test, cfg, device, autocast)
        state["history"].append(acc)
        state["epoch"] = epoch + 1
        if totals["rows"]:
            state["stats"] = {"wrong": totals["wrong"] / totals["rows"],
                              "fixed": totals["fixed"] / max(totals["wrong"], 1),
                              "temperature": totals["temperature"] / totals["rows"]}
        save_checkpoint(checkpoint, model, optimizer, scheduler, state)
        progress.epoch(epoch + 1, acc)
        if budget is not None:
            budget.spend()
    progress.close()
    model.eval()
    return {"last": state["history"][-1], "best": max(state["history"]), "stats": state["stats"],
            "history": state["history"]}


def _accumulate(totals, stats):
    n = stats.temperature.numel()
    totals["rows"] += n
    totals["temperature"] += stats.temperature.sum().item()
    if stats.teacher_correct is not None:
        wrong = ~stats.teacher_correct
        totals["wrong"] += wrong.sum().item()
        totals["fixed"] += (wrong & ~stats.still_wrong).sum().item()
