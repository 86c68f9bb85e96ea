"""The C++ CPU backend: ``torch.ops.kdkernels.distill_cpu`` from csrc/distill.cpp.

setup.py compiles the source once per CPU capability (kdkernels._C_default, _C_avx2, _C_avx512);
this module imports the best variant that was built and that the running CPU supports, as torch
itself reports it (``torch.backends.cpu.get_cpu_capability()``; ``ATEN_CPU_CAPABILITY=avx2`` or
``default`` lowers it for torch and kdkernels alike). Registered through TORCH_LIBRARY with a fake
kernel here, so torch.compile sees one opaque op."""
import importlib
import json
import os

import torch

from .._options import ENUMS, OPTION_INDEX, OPTION_NAMES, REDUCTION_NONE, SHARD_STATS
from . import _rows

NAME = "cpp"
VARIANTS = ("avx512", "avx2", "default")  # best first


def _runtime_capability():
    """The variant this CPU (as torch sees it) can run: avx512, avx2 or default."""
    cap = torch.backends.cpu.get_cpu_capability().lower()
    return "avx512" if cap.startswith("avx512") else "avx2" if cap == "avx2" else "default"


def _build_report():
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "_build_report.json")
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


REBUILD = "reinstall with a working C++ compiler: pip install --no-build-isolation -e ."


def _load():
    """(module or None, variant, why not): the best importable variant for this CPU."""
    cpu = _runtime_capability()
    errors = []
    for variant in VARIANTS[VARIANTS.index(cpu):]:
        try:
            return importlib.import_module(f"kdkernels._C_{variant}"), variant, None
        except ImportError as error:
            errors.append(f"_C_{variant}: {error}")
    report = _build_report() or {}
    if report.get("skipped"):
        return None, None, f"skipped at install: {report['skipped']}"
    states = report.get("variants") or {}
    built = [v for v, state in states.items() if state == "built"]
    failures = sorted({state for state in states.values() if state != "built"})
    if states and not built:
        return None, None, f"the build failed ({'; '.join(failures)}); {REBUILD}"
    if built:
        return None, None, (f"this CPU runs {cpu} code and the install built only "
                            f"{', '.join(built)} ({'; '.join(failures) or 'not asked for'})")
    return None, None, f"not built or not importable ({'; '.join(errors)}); {REBUILD}"


def _contract_mismatch(module):
    """How the extension's build disagrees with kdkernels/_options.py (a stale build), or None."""
    built = getattr(module, "OPTION_NAMES", "")
    if built != ",".join(OPTION_NAMES):
        return f"options {built!r}, expected {','.join(OPTION_NAMES)!r}"
    wrong = {name: getattr(module, name, None) for name, value in ENUMS.items()
             if getattr(module, name, None) != value}
    return f"enum values {wrong}, expected {ENUMS}" if wrong else None


_C, _VARIANT, _WHY_NOT = _load()
if _C is not None and _contract_mismatch(_C):
    _C, _WHY_NOT = None, (f"the built extension disagrees with this kdkernels "
                          f"({_contract_mismatch(_C)}): a stale build; {REBUILD}")
_HERE = _runtime_capability()  # once: availability must stay plain Python for torch.compile


# the variant is chosen once, at import: so is what availability() says of it (a call per loss)
_LOWERED = " (lowered by ATEN_CPU_CAPABILITY)" if os.environ.get("ATEN_CPU_CAPABILITY") else ""
_READY = (True, f"C++ kernel, {_VARIANT} variant (torch's CPU capability: {_HERE}{_LOWERED})")


def availability(device=None):
    if device is not None and device.type != "cpu":
        return False, f"the C++ kernel runs on CPU tensors only, not {device.type}"
    if _C is None:  # read at the call: tests and users may unload it
        return False, f"C++ kernel unavailable: {_WHY_NOT}"
    return _READY


if _C is not None:
    @torch.library.register_fake("kdkernels::distill_cpu")
    def _fake(student, teacher, teacher_indices, target, temp_rows, options):
        N = student.shape[0]
        acc = torch.float64 if student.dtype == torch.float64 else torch.float32
        compute_grad = bool(options[OPTION_INDEX["compute_grad"]])
        reduced = options[OPTION_INDEX["reduction"]] != REDUCTION_NONE
        return (student.new_empty(() if reduced else N, dtype=acc),
                torch.empty_like(student) if compute_grad else student.new_empty(0),
                student.new_empty(N, dtype=acc), student.new_empty(N, dtype=torch.int8))


    @torch.library.register_fake("kdkernels::distill_cpu_")
    def _fake_over(student, teacher, teacher_indices, target, temp_rows, options):
        loss, _, temps, flags = _fake(student, teacher, teacher_indices, target, temp_rows,
                                      options)
        return loss, temps, flags


GRAD_OVER_STUDENT = True  # forward(overwrite=True) writes the gradient over the logits


def forward(student, teacher, target, temp_rows, o, teacher_indices=None, overwrite=False):
    """``overwrite=True``: the gradient may be written over ``student`` (a temporary the caller
    no longer needs, as the fused lm_head's chunk logits); it is, for contiguous rows."""
    if overwrite and o.compute_grad and student.is_contiguous():
        loss, temps, flags = torch.ops.kdkernels.distill_cpu_.default(
            student, teacher, teacher_indices, target, temp_rows, o.pack())
        return loss, student, temps, flags
    return torch.ops.kdkernels.distill_cpu.default(student, teacher, teacher_indices, target,
                                                   temp_rows, o.pack())


if _C is not None:
    @torch.library.register_fake("kdkernels::shard_stats_cpu")
    def _fake_stats(student, teacher, target, temps, vocab_start, vocab_size, options):
        return student.new_empty(student.shape[0], len(SHARD_STATS), dtype=torch.float64)

    @torch.library.register_fake("kdkernels::shard_pass_cpu")
    def _fake_pass(student, teacher, target, rows, vocab_start, vocab_size, options, grad):
        if grad:
            return torch.empty_like(student)
        return student.new_empty(student.shape[0], 2, dtype=torch.float64)

    @torch.library.register_fake("kdkernels::shard_pass_cpu_")
    def _fake_pass_over(student, teacher, target, rows, vocab_start, vocab_size, options):
        return None


def shard_statistics(student, teacher, target, temps, vocab_start, vocab_size, o):
    """The torch backend's shard_statistics (kdkernels/ops/torch_distill.py), in C++."""
    return _rows.shard_statistics(torch.ops.kdkernels.shard_stats_cpu.default, student,
                                  teacher, target, temps, vocab_start, vocab_size, o)


def shard_pass(student, teacher, target, rows, vocab_start, vocab_size, o, grad=True,
               overwrite=False):
    """The torch backend's shard_pass (kdkernels/ops/torch_distill.py), in C++;
    ``overwrite=True`` writes the gradient over ``student`` (unit class stride) and returns it."""
    return _rows.shard_pass(torch.ops.kdkernels.shard_pass_cpu.default,
                            torch.ops.kdkernels.shard_pass_cpu_.default, student, teacher,
                            target, rows, vocab_start, vocab_size, o, grad, overwrite)
