"""--task lm: distil a small decoder-only transformer on the Python standard library's sources.

The teacher trains first (cross-entropy); its top-k log-probabilities and tail mass for every
training token then go to the offline cache (teacher_cache.py), written once; then a student per
method and seed, all from the same initial weights per seed. Each model trains for a number of
optimizer steps with an evaluation (validation cross-entropy) and a checkpoint every
--eval-every steps: --interrupt-after counts those, and --resume continues exactly.

Every loss goes through kdkernels' public API: from the student's last hidden states h [N, H],
its lm_head W [V, H] and the targets, with the teacher as its hidden states and lm_head (dense
methods: the teacher's logits are computed, then the loss; fused_kl: never), as cached top-k
(SparseTeacher) or absent (ce).
"""
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

import kdkernels

from . import models, teacher_cache
from .loop import Budget, autocast_for, distributed, rank_and_world, restore, save_checkpoint
from .memory import MEASURING_ENV, peak_above_inputs_mib
from .progress import Progress, mode

CACHE_K = 64  # the largest k of the methods: the cache holds it, smaller k read a prefix
# The forward-only passes (validation, the teacher cache) take 4 training batches at a time, as
# long as their fp32 logits stay within this: the cpu preset's 32 windows of 128 x 8192 take
# 128 MiB, the gpu preset's 256 of 256 x 32768 would take 8 GiB (20 GiB with bf16 and softmax).
EVAL_LOGITS_BYTES = 512 * 2 ** 20


@dataclass(frozen=True)
class Method:
    name: str
    teacher: Optional[str]  # None, "dense" (teacher logits), "cache" (top-k) or "hidden" (fused)
    description: str
    divergence: str = "kl"
    k: int = 0
    tail: bool = False


METHODS = {m.name: m for m in [
    Method("ce", None, "cross-entropy only"),
    Method("kl", "dense", "forward KL, full teacher logits"),
    Method("reverse_kl", "dense", "reverse KL, full teacher logits", divergence="reverse_kl"),
    Method("jsd", "dense", "JSD (beta 0.5), full teacher logits", divergence="jsd"),
    Method("top8", "cache", "forward KL to the cached top-8, renormalised", k=8),
    Method("top8_tail", "cache", "forward KL to the cached top-8 and the tail", k=8, tail=True),
    Method("top64", "cache", "forward KL to the cached top-64, renormalised", k=64),
    Method("top64_tail", "cache", "forward KL to the cached top-64 and the tail", k=64,
           tail=True),
    Method("fused_kl", "hidden", "forward KL, fused lm_head, teacher as hidden states + lm_head"),
]}


def padded(vocab_size, multiple):
    """The teacher's rows: the vocabulary rounded up to a multiple of `multiple` (0: none)."""
    return -(-vocab_size // multiple) * multiple if multiple else vocab_size


def loss_of(method, cfg, h, W, teacher, y):
    """The loss step of `method` from h [N, H], W [V, H] and y [N]; `teacher` is (teacher
    hidden states [N, H_t], teacher lm_head [V_t, H_t]) for dense and hidden, a SparseTeacher
    for cache, None for ce."""
    if method.teacher is None:
        return F.cross_entropy(F.linear(h, W), y)
    options = dict(temperature=cfg.temperature, kd_weight=cfg.kd_weight,
                   ce_weight=cfg.ce_weight, divergence=method.divergence)
    if cfg.pad_teacher_vocab:
        options["padded_teacher"] = True  # the teacher's tokens from V on are padding: dropped
    if method.teacher == "hidden":
        ht, Wt = teacher
        return kdkernels.fused_linear_distillation_loss(h, W, ht, y, teacher_weight=Wt,
                                                        **options)
    if method.teacher == "dense":
        ht, Wt = teacher
        with torch.no_grad():
            teacher = F.linear(ht, Wt)
    return kdkernels.distillation_loss(F.linear(h, W), teacher, y, **options)


def sparse_teacher(method, indices, values, vocab_size):
    """The cached top-k as the library's SparseTeacher: log-probabilities, the tail implied (with
    the tail) or renormalised over the k tokens (without), over the cache's `vocab_size` tokens.
    A padded teacher's tokens past the student's vocabulary are the library's to drop
    (padded_teacher=True: unused slots)."""
    return kdkernels.SparseTeacher(indices[..., :method.k], values[..., :method.k],
                                   tail=method.tail, vocab_size=vocab_size)


def check_streams(cfg, data):
    """Both token streams hold at least one window of --context (+ 1 target) tokens: checked
    before any window is cut."""
    train = min(len(data.train), cfg.train_tokens) if cfg.train_tokens else len(data.train)
    for split, tokens in (("train", train), ("validation", len(data.val))):
        if tokens < cfg.context + 1:
            raise ValueError(f"--context {cfg.context} is longer than the {split} token stream "
                             f"({tokens} tokens; a window takes --context + 1): use a smaller "
                             "--context")


def eval_batch(cfg, vocab_size):
    """Windows per batch of the forward-only passes (EVAL_LOGITS_BYTES)."""
    return max(1, min(4 * cfg.batch_size, EVAL_LOGITS_BYTES // (4 * cfg.context * vocab_size)))


def windows_of(tokens, context):
    """[n, context + 1] overlapping-by-one windows of the token stream (a view): inputs are
    [:, :-1], targets [:, 1:], and input j of window w is token w * context + j."""
    n = (len(tokens) - 1) // context
    return tokens[:n * context + 1].unfold(0, context + 1, context)


def lr_factor(step, steps):
    """Linear warm-up over the first 10% of the steps, then a cosine to 10%."""
    warm = max(1, steps // 10)
    if step < warm:
        return (step + 1) / warm
    return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


@torch.no_grad()
def validation_loss(model, windows, batch_size, device, autocast):
    """Mean cross-entropy (nats per token) of `model` on the validation windows (over all its
    rows: a padded teacher's padding takes part in its softmax, as in its training)."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        w = windows[i:i + batch_size].to(device)
        with autocast():
            logits = model.logits(w[:, :-1]).float()
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1),
                                 reduction="sum").item()
        count += w[:, 1:].numel()
    model.train()
    return total / count


class LMRunner:
    """The teacher, its cache, and a student per method and seed, each with a checkpoint. The
    data hold one window of each split (check_streams)."""

    def __init__(self, cfg, data, device):
        self.cfg, self.data, self.device = cfg, data, device
        self.budget = Budget(cfg.interrupt_after, "evaluations")
        self.autocast = autocast_for(device)
        tokens = data.train[:cfg.train_tokens] if cfg.train_tokens else data.train
        self.train_windows = windows_of(tokens, cfg.context)
        val = windows_of(data.val, cfg.context)
        # evenly spaced over the validation files, the same windows for every evaluation
        picks = torch.linspace(0, len(val) - 1, min(len(val), cfg.val_tokens // cfg.context))
        self.val_windows = val[picks.round().long()].contiguous()
        self.teacher_vocab = padded(data.vocab_size, cfg.pad_teacher_vocab)
        self.phases = {}
        self._teacher = self._cache = None

    def checkpoint(self, key):
        return os.path.join(self.cfg.out, "checkpoints", f"{key}.pt")

    def timed(self, phase, started):
        self.phases[phase] = self.phases.get(phase, 0.0) + time.perf_counter() - started

    def build(self, arch, seed, vocab_size):
        # same seed and architecture, same initial weights: students differ by method alone
        torch.manual_seed(seed * 7919 + sum(map(ord, arch)))
        return models.build_gpt(arch, vocab_size, self.cfg.context)

    def teacher(self):
        """The trained teacher (trained now, resumed, or loaded) and its results; seed 0."""
        if self._teacher is None:
            started = time.perf_counter()
            net = self.build(self.cfg.teacher_arch, 0, self.teacher_vocab)
            result = self.train(net, METHODS["ce"], 0, self.checkpoint("teacher"),
                                self.cfg.teacher_steps, "teacher")
            net.eval().requires_grad_(False)
            self._teacher = (net, result)
            self.timed("teacher", started)
        return self._teacher

    def cache(self):
        """The teacher's cache over every training token: written by rank 0 unless a valid one
        (same teacher checkpoint, sizes) is there, then memory-mapped by every process."""
        if self._cache is None:
            net, _ = self.teacher()
            started = time.perf_counter()
            folder = os.path.join(self.cfg.out, "teacher-cache")
            tokens = self.train_windows.shape[0] * self.cfg.context
            rank, _ = rank_and_world()
            k = min(CACHE_K, self.teacher_vocab)
            if rank == 0:
                digest = teacher_cache.file_hash(self.checkpoint("teacher"))
                if not teacher_cache.TeacherCache.valid(folder, k, self.teacher_vocab, tokens,
                                                        digest):
                    teacher_cache.write(folder, self.teacher_logits(net), tokens, k,
                                        self.teacher_vocab, digest)
            if distributed():
                torch.distributed.barrier()
            self._cache = teacher_cache.TeacherCache(folder)
            self.timed("teacher cache", started)
        return self._cache

    @torch.no_grad()
    def teacher_logits(self, net):
        """The teacher's logits over the training windows, in token order, a batch at a time."""
        batch = eval_batch(self.cfg, self.teacher_vocab)
        for i in range(0, len(self.train_windows), batch):
            x = self.train_windows[i:i + batch, :-1].to(self.device)
            with self.autocast():
                yield net.logits(x).float().reshape(-1, self.teacher_vocab)

    def teacher_input(self, method, x, positions):
        if method.teacher in ("dense", "hidden"):
            net, _ = self.teacher()
            with torch.no_grad(), self.autocast():
                ht = net(x)
            return ht.float().reshape(-1, ht.shape[-1]), net.lm_head.weight
        if method.teacher == "cache":
            cache = self.cache()
            indices, values, _ = cache.rows(positions.numpy(), method.k)
            return sparse_teacher(method, indices.reshape(-1, method.k).to(self.device),
                                  values.reshape(-1, method.k).to(self.device),
                                  cache.meta["vocab_size"])
        return None

    def train(self, model, method, seed, checkpoint, steps, desc):
        """Trains `model` for `steps` with `method`'s loss; resumes from `checkpoint`; returns
        the history of (step, validation loss), the training tokens per second and seconds."""
        cfg, device = self.cfg, self.device
        rank, world = rank_and_world()
        model.to(device)
        net = torch.nn.parallel.DistributedDataParallel(model) if distributed() else model
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95),
                                      weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, steps))
        state = restore(checkpoint, model, optimizer, scheduler,
                        {"step": 0, "history": [], "seconds": 0.0, "tokens": 0})
        progress = Progress(desc, steps, state["step"], mode(cfg.progress, rank), unit="step",
                            metric=("val loss", lambda v: f"{v:.3f}"))
        context = torch.arange(cfg.context)
        while state["step"] < steps:
            started = time.perf_counter()
            stop = min(steps, (state["step"] // cfg.eval_every + 1) * cfg.eval_every)
            for step in range(state["step"], stop):
                # the windows of a step depend on (seed, step) alone: a resumed run sees the same
                g = torch.Generator().manual_seed(seed * 100003 + step)
                chosen = torch.randint(0, len(self.train_windows), (cfg.batch_size,),
                                       generator=g)[rank::world]
                w = self.train_windows[chosen]
                x, y = w[:, :-1].to(device), w[:, 1:].reshape(-1).to(device)
                teacher = self.teacher_input(method, x, chosen[:, None] * cfg.context + context)
                with self.autocast():
                    h = net(x)
                h = h.float().reshape(-1, h.shape[-1])
                loss = loss_of(method, cfg, h, model.lm_head.weight, teacher, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
            state["seconds"] += time.perf_counter() - started
            state["tokens"] += (stop - state["step"]) * cfg.batch_size * cfg.context
            val = validation_loss(model, self.val_windows,
                                  eval_batch(cfg, model.lm_head.weight.shape[0]), device,
                                  self.autocast)
            state["history"].append((stop, val))
            progress.epoch(stop, val, advanced=stop - state["step"])
            state["step"] = stop
            save_checkpoint(checkpoint, model, optimizer, scheduler, state)
            self.budget.spend()
        progress.close()
        model.eval()
        return {"history": state["history"], "val_loss": state["history"][-1][1],
                "tokens_per_s": state["tokens"] / max(state["seconds"], 1e-9),
                "seconds": state["seconds"]}

    def run_method(self, name, seed):
        method = METHODS[name]
        if method.teacher == "cache":
            self.cache()
        elif method.teacher is not None:
            self.teacher()
        started = time.perf_counter()
        net = self.build(self.cfg.student_arch, seed, self.data.vocab_size)
        result = self.train(net, method, seed, self.checkpoint(f"{name}-seed{seed}"),
                            self.cfg.steps, f"{name} seed {seed}")
        self.timed("students", started)
        return dict(method=name, seed=seed, val_loss=result["val_loss"],
                    ppl=math.exp(result["val_loss"]), tokens_per_s=result["tokens_per_s"],
                    train_seconds=result["seconds"], history=result["history"])

    def summary(self):
        """What the report says besides the students: teacher, cache, phases."""
        phases = ["teacher", "teacher cache", "students"]
        out = {"phases": {p: self.phases[p] for p in phases if p in self.phases},
               "python": self.data.python, "files": self.data.files,
               "files_digest": self.data.digest, "resumed": bool(self.cfg.resume),
               "vocab_size": self.data.vocab_size, "teacher_vocab": self.teacher_vocab,
               "train_tokens": self.train_windows.shape[0] * self.cfg.context,
               "val_tokens": self.val_windows.shape[0] * self.cfg.context}
        if self._teacher is not None:
            result = self._teacher[1]
            out.update(teacher_val_loss=result["val_loss"], teacher_history=result["history"])
        if self._cache is not None:
            c = self._cache
            out["cache"] = dict(
                k=c.meta["k"], tokens=c.meta["tokens"], bytes_per_token=c.bytes_per_token(),
                dense_fp32_bytes_per_token=4 * self.teacher_vocab,
                dense_bf16_bytes_per_token=2 * self.teacher_vocab,
                write_seconds=c.meta["write_seconds"], read_seconds=c.read_seconds,
                rows_read=c.rows_read, mean_tail_top64=float(np.mean(c.tail)),
                mean_tail_top8=float(1 - np.exp(c.values[:, :8].astype(np.float64)).sum(-1)
                                     .mean()))
        return out


def run(cfg, data, device):
    """Every method for every seed: the per-seed rows and the run's summary. Raises
    loop.Interrupted for --interrupt-after (the checkpoints are on disk)."""
    runner = LMRunner(cfg, data, device)
    rows = [runner.run_method(name, seed) for seed in range(cfg.seeds)
            for name in cfg.method_list]
    return rows, runner.summary()


def loss_step_inputs(spec, method):
    """Random inputs of the run's shapes for `method`'s loss step (the peak depends on the
    shapes, not on the trained weights): h, W (leaves), the teacher's input, y."""
    g = torch.Generator().manual_seed(0)
    N, H, V, Ht, Vt = (spec[k] for k in ("tokens", "width", "vocab", "teacher_width",
                                         "teacher_vocab"))
    h = torch.randn(N, H, generator=g).requires_grad_()
    W = (torch.randn(V, H, generator=g) * 0.02).requires_grad_()
    ht, Wt = torch.randn(N, Ht, generator=g), torch.randn(Vt, Ht, generator=g) * 0.02
    y = torch.randint(0, V, (N,), generator=g)
    teacher = None
    if method.teacher in ("dense", "hidden"):
        teacher = (ht, Wt)
    elif method.teacher == "cache":
        indices, values, _ = teacher_cache.top_k(F.linear(ht, Wt), min(CACHE_K, Vt))
        teacher = sparse_teacher(method, indices, values, Vt)
    return h, W, teacher, y


def measure_loss_steps(spec):
    """{method: MiB}: the peak memory of each method's loss step (forward and backward, from the
    hidden states to the gradients of h and W) above its inputs. CPU: the resident high-water
    mark (memory.py; call it in a process started with MEASURING_ENV); CUDA: the allocator's."""
    import argparse
    cfg = argparse.Namespace(**spec["options"])
    return {name: _measure_loss_step(METHODS[name], cfg, spec, torch.device(spec["device"]))
            for name in spec["methods"]}


def _measure_loss_step(method, cfg, spec, device):
    h, W, teacher, y = loss_step_inputs(spec, method)
    h, W = (x.detach().to(device).requires_grad_() for x in (h, W))
    y = y.to(device)
    if isinstance(teacher, tuple):
        teacher = tuple(x.to(device) for x in teacher)
    elif teacher is not None:
        teacher = replace(teacher, indices=teacher.indices.to(device),
                          values=teacher.values.to(device))

    def step():
        loss_of(method, cfg, h, W, teacher, y).backward()

    def reset():
        h.grad = W.grad = None
    if device.type != "cuda":
        return peak_above_inputs_mib(step, reset)
    step()
    reset()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    reset()
    return peak


def loss_step_peaks(cfg, vocab_size, teacher_vocab, device):
    """measure_loss_steps for the run's methods and shapes: in a child process on the CPU (a
    clean allocator), in this process on CUDA. {} when the child fails (reported, not fatal)."""
    spec = dict(methods=cfg.method_list, tokens=cfg.batch_size * cfg.context,
                width=models.parse_gpt(cfg.student_arch)[1], vocab=vocab_size,
                teacher_width=models.parse_gpt(cfg.teacher_arch)[1], teacher_vocab=teacher_vocab,
                device=str(device), options=dict(
                    temperature=cfg.temperature, kd_weight=cfg.kd_weight,
                    ce_weight=cfg.ce_weight, pad_teacher_vocab=cfg.pad_teacher_vocab))
    if device.type == "cuda":
        return measure_loss_steps(spec)
    root = os.path.dirname(os.path.dirname(os.path.abspath(kdkernels.__file__)))
    env = dict(os.environ, **MEASURING_ENV,
               PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-m", "kdkernels.train.lm", json.dumps(spec)],
                          capture_output=True, text=True, env=env)
    if done.returncode != 0:
        print(f"kdkernels-train: measuring the loss steps failed: {done.stderr[-2000:]}",
              file=sys.stderr)
        return {}
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":  # the child of loss_step_peaks
    print(json.dumps(measure_loss_steps(json.loads(sys.argv[1]))))
