"""Peak memory (and time) of the integrations against the paths they replace, on the CPU:

- one GKD training step (forward + backward of TRL's GKDTrainer.training_step, lmbda=0) with
  TRL's own compute_loss (full logits of both models) against kdkernels' fused lm_head
  (kdkernels.integrations.trl.gkd_trainer_class);
- one Hugging Face call (forward + backward): the models' full logits and kdkernels'
  distillation_loss on them, against kdkernels.integrations.hf.distill_models_loss.

    python -m benchmarks.integrations                    # V=32000, 4 x 256 tokens
    python -m benchmarks.integrations --vocab 128256 --batch 2 --length 512

Models: Llama built from configs (random weights): the student 1 layer x 64 wide, the teacher
1 x 96, untied lm_heads, float32. Memory: the resident high-water mark above the resident set
before the step, in a child process per contender (small mmap threshold, so that freed blocks
leave the resident set), after one warm-up step; it includes every gradient of the step. Time:
median of --reps steps after the measured one (a busy machine inflates it).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from benchmarks import measure
from benchmarks.tiny_lm import tiny_llama, token_batch, word_tokenizer
from kdkernels.train.memory import MEASURING_ENV, peak_above_inputs_mib

CONTENDERS = {"gkd-step": ("TRL GKDTrainer (full logits)", "kdkernels GKD trainer (fused)"),
              "hf-call": ("full logits + kdkernels.distillation_loss",
                          "kdkernels.integrations.hf.distill_models_loss")}
OPTIONS = dict(temperature=1.0, kd_weight=1.0, ce_weight=0.0, t2_scale=False, divergence="jsd",
               jsd_beta=0.5)


def _models(args):
    return (tiny_llama(args.vocab, 64, seed=0), tiny_llama(args.vocab, 96, seed=1).eval(),
            token_batch(args.batch, args.length, args.vocab, seed=2))


def _gkd_step(args, fused):
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import datasets
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from kdkernels.integrations.trl import gkd_trainer_class
    student, teacher, (ids, mask, labels) = _models(args)
    batch = dict(input_ids=ids, attention_mask=mask, labels=labels)
    config = GKDConfig(output_dir=os.path.join(args.out, "gkd"), lmbda=0.0, beta=0.5,
                       seq_kd=False, report_to=[], use_cpu=True, disable_dropout=True,
                       max_length=None, per_device_train_batch_size=args.batch)
    cls = gkd_trainer_class() if fused else GKDTrainer
    trainer = cls(model=student, teacher_model=teacher, args=config,
                  train_dataset=datasets.Dataset.from_list([{"input_ids": [0]}]),
                  processing_class=word_tokenizer(args.vocab), data_collator=lambda rows: rows)
    trainer.current_gradient_accumulation_steps = 1  # what train() sets before its steps

    def step():
        trainer.model.zero_grad(set_to_none=True)
        trainer.training_step(trainer.model, batch)
    return step


def _hf_call(args, fused):
    import kdkernels
    from kdkernels.integrations.hf import distill_models_loss
    student, teacher, (ids, mask, labels) = _models(args)

    def step():
        student.zero_grad(set_to_none=True)
        if fused:
            loss = distill_models_loss(student, teacher, ids, mask, labels, **OPTIONS)
        else:
            logits = student(input_ids=ids, attention_mask=mask).logits
            with torch.no_grad():
                teacher_logits = teacher(input_ids=ids, attention_mask=mask).logits
            loss = kdkernels.distillation_loss(logits[:, :-1], teacher_logits[:, :-1],
                                               labels[:, 1:], **OPTIONS)
        loss.backward()
    return step


def child(spec):
    args = argparse.Namespace(**spec["args"])
    torch.manual_seed(0)
    step = (_gkd_step if spec["case"] == "gkd-step" else _hf_call)(args, spec["fused"])
    peak = peak_above_inputs_mib(step)  # after a warm-up step, from the current resident set
    times = []
    for _ in range(args.reps):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    print(json.dumps(dict(peak_mib=peak, ms=1e3 * statistics.median(times))))


def _run_child(case, fused, args):
    spec = dict(case=case, fused=fused, args=vars(args))
    env = dict(os.environ, **MEASURING_ENV,
               PYTHONPATH=measure.ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-m", "benchmarks.integrations", "--child",
                           json.dumps(spec)], capture_output=True, text=True, env=env,
                          cwd=measure.ROOT)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--cases", default="gkd-step,hf-call")
    parser.add_argument("--out", default=os.path.join(measure.ROOT, "benchmarks", "out"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(json.loads(args.child))
    spec = {k: v for k, v in vars(args).items() if k != "child"}
    tokens = args.batch * args.length
    logits_mib = tokens * args.vocab * 4 / 2 ** 20
    print(f"# {tokens} tokens x vocab {args.vocab}: one float32 [tokens, V] tensor is "
          f"{logits_mib:.1f} MiB | torch {torch.__version__} | {torch.get_num_threads()} threads")
    print("| case | contender | peak extra MiB | ms per step | fused / this (peak) |")
    print("|---|---|---|---|---|")
    for case in args.cases.split(","):
        results = [_run_child(case, fused, argparse.Namespace(**spec)) for fused in (False, True)]
        for (name, r) in zip(CONTENDERS[case], results):
            # at tiny sizes a peak may round to nothing (or below the start): no ratio then
            ratio = f"{results[1]['peak_mib'] / r['peak_mib']:.1%}" if r["peak_mib"] > 0 else "-"
            print(f"| {case} | {name} | {r['peak_mib']:.1f} | {r['ms']:.0f} | {ratio} |",
                  flush=True)


if __name__ == "__main__":
    main()
