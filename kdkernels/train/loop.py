"""One model's training: deterministic batches, checkpoints written atomically, exact resume,
DistributedDataParallel when launched by torchrun."""
import os
import random

import numpy as np
import torch
import torch.distributed as dist

from .data import augment
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
    """Counts epochs trained in this process, for --interrupt-after."""
    def __init__(self, limit):
        self.limit, self.used = limit, 0

    def spend(self):
        self.used += 1
        if self.limit and self.used >= self.limit:
            raise Interrupted(f"stopped after {self.used} epochs (--interrupt-after)")


def train(model, loss_fn, data, cfg, seed, device, checkpoint, teacher=None, budget=None,
          desc="", epochs=None):
    """Trains `model` in place with loss_fn(student_logits, teacher_logits, y, epoch), which
    returns the loss or (loss, DistillStats); returns the results. Resumes from `checkpoint`."""
    rank, world = rank_and_world()
    epochs = epochs or cfg.epochs
    model.to(device)
    net = model
    if distributed():
        net = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9,
                                weight_decay=cfg.weight_decay, nesterov=True)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    autocast = autocast_for(device)
    state = {"epoch": 0, "history": [], "stats": None}
    if os.path.exists(checkpoint):
        saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        _set_rng_state(saved["rng"])
        state = saved["state"]
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
            idx = order[start:start + cfg.batch_size][rank::world]
            x, y = x_train[idx].to(device), y_train[idx].to(device)
            if data.image:
                x = augment(x, g)
            with autocast():
                logits = net(x)
                t_logits = None
                if teacher is not None:
                    with torch.no_grad():
                        t_logits = teacher(x)
            loss = loss_fn(logits.float(), None if t_logits is None else t_logits.float(), y,
                           epoch)
            if isinstance(loss, tuple):
                loss, stats = loss
                _accumulate(totals, stats)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        scheduler.step()
        acc = accuracy(model, data.x_test, data.y_test, cfg, device, autocast)
        state["history"].append(acc)
        state["epoch"] = epoch + 1
        if totals["rows"]:
            state["stats"] = {"wrong": totals["wrong"] / totals["rows"],
                              "fixed": totals["fixed"] / max(totals["wrong"], 1),
                              "temperature": totals["temperature"] / totals["rows"]}
        if rank == 0:
            save_atomically({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "scheduler": scheduler.state_dict(), "rng": _rng_state(),
                             "state": state}, checkpoint)
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
