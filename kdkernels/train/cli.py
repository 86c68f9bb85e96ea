"""kdkernels-train: train a teacher, then students under every method, and print the tables.

    kdkernels-train                         # digits, every method, 3 seeds (under a minute)
    kdkernels-train --methods kd,teacher_bias --seeds 5
    kdkernels-train --teacher-swap-pairs 3-8,1-7 --methods ce,kd,lessons_swap --seeds 10
                                            # a teacher wrong on part of classes 3, 8, 1 and 7
    kdkernels-train --dataset cifar100 --data-dir ~/data --teacher-arch resnet32x4 \\
                    --student-arch resnet8x4 --epochs 240
    kdkernels-train --resume runs/digits-20261122-063000   # continue an interrupted run
    kdkernels-train --task lm               # distil a language model (Python's stdlib sources)
    kdkernels-train --task lm --preset gpu  # larger, for a GPU
    torchrun --nproc_per_node 2 -m kdkernels.train ...      # DistributedDataParallel

Exit status: 0 done, 2 bad configuration or data, 3 stopped by --interrupt-after (resumable).
"""
import json
import os
import sys
import time

import torch
import torch.distributed as dist

from . import config, lm, lm_data, report, runner
from . import data as datasets
from .loop import Interrupted, rank_and_world
from .report import plural


def error(message):
    print(f"kdkernels-train: error: {message}", file=sys.stderr)
    return 2


def main(argv=None):
    """Parses, runs, reports; turns the library's errors into a message and an exit status.
    Leaves torch's thread count as it found it (tests call main in-process)."""
    threads = torch.get_num_threads()
    try:
        return drive(sys.argv[1:] if argv is None else argv)
    finally:
        torch.set_num_threads(threads)
        if dist.is_initialized():
            dist.destroy_process_group()


def drive(argv):
    started = time.perf_counter()
    try:
        cfg = config.configure(argv, __doc__)
        device = runner.choose_device(cfg)
        if cfg.task == "lm":
            data = lm_data.load_shared(cfg.vocab_size, cfg.cache_dir)
            lm.check_streams(cfg, data)
        else:
            data = datasets.load(cfg.dataset, cfg.data_dir, cfg.download)
    except (ValueError, RuntimeError, OSError) as problem:  # ConfigError is a ValueError
        return error(problem)
    data_seconds = time.perf_counter() - started
    rank, world = rank_and_world()
    if rank == 0:
        os.makedirs(os.path.join(cfg.out, "checkpoints"), exist_ok=True)
        with open(os.path.join(cfg.out, "config.json"), "w") as handle:
            json.dump(config.saved(cfg), handle, indent=1)
        print((lm_headline if cfg.task == "lm" else headline)(cfg, data, world, device),
              flush=True)
    if world > 1:
        dist.barrier()
    started = time.time()
    try:
        if cfg.task == "lm":
            return drive_lm(cfg, data, device, rank, data_seconds)
        rows = runner.run(cfg, data, device)
    except Interrupted as stop:
        if rank == 0:
            print(f"kdkernels-train: {stop}; resume with: kdkernels-train --resume {cfg.out}")
        return 3
    if rank == 0:
        table = report.summarise(rows, cfg.method_list)
        text, written = report.write(cfg.out, config.saved(cfg), table, rows, title(cfg))
        print(text)
        print(f"kdkernels-train: {time.time() - started:.0f} s of training{this_invocation(cfg)}; "
              f"wrote {', '.join(written)} in {cfg.out}")
    return 0


def drive_lm(cfg, data, device, rank, data_seconds):
    """--task lm after the data: train, measure the loss steps, report (rank 0)."""
    rows, summary = lm.run(cfg, data, device)
    if rank != 0:
        return 0
    summary["phases"] = {"data": data_seconds, **summary["phases"]}
    started = time.perf_counter()
    peaks = lm.loss_step_peaks(cfg, data.vocab_size, summary["teacher_vocab"], device)
    summary["phases"]["loss-step memory"] = time.perf_counter() - started
    table = report.summarise_lm(rows, cfg.method_list, peaks)
    text, written = report.write_lm(cfg.out, config.saved(cfg), table, rows, summary,
                                    lm_title(cfg, data))
    print(text)
    print(f"kdkernels-train: {sum(summary['phases'].values()):.0f} s in all"
          f"{this_invocation(cfg)}; wrote {', '.join(written)} in {cfg.out}")
    return 0


def this_invocation(cfg):
    """After --resume the printed times cover this invocation alone (they are not saved)."""
    return " (this invocation only: the run was resumed)" if cfg.resume else ""


def lm_headline(cfg, data, world, device):
    from kdkernels.ops import resolve
    pad = f", padded to {lm.padded(data.vocab_size, cfg.pad_teacher_vocab)} for the teacher" \
        if cfg.pad_teacher_vocab else ""
    return (f"kdkernels-train: language model on the Python {data.python} standard library "
            f"({data.files['train']} train / {data.files['val']} validation files, file list "
            f"{data.digest}, "
            f"{len(data.train)} / {len(data.val)} tokens, training on "
            f"{cfg.train_tokens or 'all'} of them, byte-level BPE of "
            f"{data.vocab_size} tokens{pad}), teacher {cfg.teacher_arch} ({cfg.teacher_steps} "
            f"steps), students {cfg.student_arch} ({cfg.steps} steps of {cfg.batch_size} x "
            f"{cfg.context} tokens), {plural(cfg.seeds, 'seed')}, "
            f"{plural(len(cfg.method_list), 'method')}, {plural(world, 'process', 'processes')} "
            f"on {device} ({plural(torch.get_num_threads(), 'thread')} each); backend "
            f"{resolve('auto', device).NAME}; run folder {cfg.out}")


def lm_title(cfg, data):
    return (f"Python {data.python} stdlib, BPE {data.vocab_size}: {cfg.student_arch} students, "
            f"{cfg.teacher_arch} teacher, {plural(cfg.seeds, 'seed')}")


def headline(cfg, data, world, device):
    from kdkernels.ops import resolve
    swap = ""
    if cfg.swap_pairs:
        swap = (f", teacher labels exchanged on {100 * cfg.teacher_swap_fraction:.0f}% of the "
                f"rows of classes {cfg.teacher_swap_pairs}")
    return (f"kdkernels-train: {cfg.dataset} ({len(data.y_train)} train / {len(data.y_test)} "
            f"test), teacher {cfg.teacher_arch} ({cfg.teacher_epochs} epochs{swap}), student "
            f"{cfg.student_arch} ({cfg.epochs} epochs), {plural(cfg.seeds, 'seed')}, "
            f"{plural(len(cfg.method_list), 'method')}, "
            f"{plural(world, 'process', 'processes')}"
            f"{' (students vocab-parallel)' if cfg.vocab_parallel else ''} on {device} "
            f"({plural(torch.get_num_threads(), 'thread')} each); "
            f"backend {resolve('auto', device).NAME}; run folder {cfg.out}")


def title(cfg):
    swap = ""
    if cfg.swap_pairs:
        swap = (f"; teacher trained with classes {cfg.teacher_swap_pairs} exchanged on "
                f"{100 * cfg.teacher_swap_fraction:.0f}% of their rows")
    return (f"{cfg.dataset}: {cfg.student_arch} students, {cfg.teacher_arch} teacher, "
            f"{plural(cfg.seeds, 'seed')}{swap}")


if __name__ == "__main__":
    sys.exit(main())
