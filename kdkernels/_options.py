"""The contract between the Python primitive and the kernels, declared once.

:class:`FusedOptions` lists, in order, every scalar a backend receives besides the tensors; the
enums below name the values of its integer fields and of the per-row flags. Everything else
follows from this file:

- the C++ op takes the options as one ``float[]`` in this order; setup.py writes the header
  ``kdk_contract.h`` (the ``Options`` struct, its unpacking, the enums) from :func:`cpp_header`,
  and the built extension reports the names and values it was built with, which the backend
  checks at import (a stale build is reported, not run);
- the fake kernel of the C++ op reads its options by name;
- the Triton kernels' parameters carry the fields' names: the launcher passes
  :meth:`FusedOptions.triton_kwargs` (``constexpr`` fields are compile-time switches there).

Adding a scalar option: a field here, then its use in each kernel's math.
"""
from dataclasses import dataclass, field, fields
from operator import attrgetter

from torch.compiler import is_compiling

REDUCTIONS = ("mean", "sum", "none")
# What a backend's forward returns as the loss: the per-row losses, or their sum, or their mean
# over the rows that count (labels not ignore_index; every row without labels), with the
# gradient then scaled by 1 / that count inside the kernel.
REDUCTION_NONE, REDUCTION_SUM, REDUCTION_MEAN = 0, 1, 2
REDUCTION_CODES = {"none": REDUCTION_NONE, "sum": REDUCTION_SUM, "mean": REDUCTION_MEAN}
WEIGHTINGS = ("cosine", "max_prob")

# How a row's temperature is found. ROWS: read from a [N] tensor; COSINE / MAX_PROB: the DTD
# temperature computed in the kernel from the same row.
TEMP_SCALAR, TEMP_ROWS, TEMP_COSINE, TEMP_MAX_PROB = 0, 1, 2, 3
# The teacher correction applied to the rows the teacher gets wrong.
CORRECTION_NONE, CORRECTION_SWAP, CORRECTION_SMOOTH, CORRECTION_RECTIFY = 0, 1, 2, 3
CORRECTIONS = {None: CORRECTION_NONE, "swap": CORRECTION_SWAP, "smooth": CORRECTION_SMOOTH,
               "rectify": CORRECTION_RECTIFY}
# The divergence D(q, p) between the (corrected) teacher q and the student p (docs/METHODS.md).
(DIVERGENCE_KL, DIVERGENCE_REVERSE_KL, DIVERGENCE_JSD, DIVERGENCE_SKEW_KL,
 DIVERGENCE_SKEW_REVERSE_KL, DIVERGENCE_TV) = 0, 1, 2, 3, 4, 5
DIVERGENCES = {"kl": DIVERGENCE_KL, "reverse_kl": DIVERGENCE_REVERSE_KL, "jsd": DIVERGENCE_JSD,
               "skew_kl": DIVERGENCE_SKEW_KL, "skew_reverse_kl": DIVERGENCE_SKEW_REVERSE_KL,
               "tv": DIVERGENCE_TV}
# Bits of the per-row flags every backend writes.
FLAG_TEACHER_CORRECT, FLAG_STILL_WRONG = 1, 2

ENUMS = {name: globals()[name] for name in (
    "REDUCTION_NONE", "REDUCTION_SUM", "REDUCTION_MEAN",
    "TEMP_SCALAR", "TEMP_ROWS", "TEMP_COSINE", "TEMP_MAX_PROB",
    "CORRECTION_NONE", "CORRECTION_SWAP", "CORRECTION_SMOOTH", "CORRECTION_RECTIFY",
    "DIVERGENCE_KL", "DIVERGENCE_REVERSE_KL", "DIVERGENCE_JSD", "DIVERGENCE_SKEW_KL",
    "DIVERGENCE_SKEW_REVERSE_KL", "DIVERGENCE_TV", "FLAG_TEACHER_CORRECT", "FLAG_STILL_WRONG")}


@dataclass(frozen=True)
class DynamicTemperature:
    """Dynamic Temperature Distillation (Preparing Lessons): a temperature per row,
    ``tau_i = tau0 - beta * w_i`` (or ``tau0 + beta * (mean(w) - w_i)`` with ``center=True``),
    clamped at ``tau_min``, where ``w_i`` measures how confusable row i is:

    - ``weighting="cosine"``: ``w = (1 - cos(s, t))^2`` over the classes where both logits are
      finite;
    - ``weighting="max_prob"``: ``w = 1 / max_j softmax(s)_j``.

    Computed from detached logits; no gradient flows through it. Pass it as ``temperature=``.
    """
    tau0: float = 4.0
    beta: float = 1.0
    weighting: str = "cosine"
    center: bool = False
    tau_min: float = 1.0

    def __post_init__(self):
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if not self.tau0 > 0:
            raise ValueError(f"tau0 must be > 0, got {self.tau0}")
        if not self.tau_min > 0:
            raise ValueError(f"tau_min must be > 0, got {self.tau_min}")
        if not self.beta >= 0:
            raise ValueError(f"beta must be >= 0 (confusable rows get a lower temperature), "
                             f"got {self.beta}")


@dataclass(frozen=True)
class SparseTeacher:
    """A teacher given by its top-k classes per row, for offline distillation from stored
    predictions: no dense teacher tensor is built anywhere.

    indices: [..., k] integer class ids (a negative id marks an unused slot, for rows with fewer
        classes); values: [..., k] the teacher's logits at those classes, or, with ``tail=True``,
        its log-probabilities at T=1, whose leftover mass ``1 - sum(exp(values))`` is the
        tail: every other class taken together.

    Without a tail the teacher is exactly the dense one with ``-inf`` outside its k classes. With
    a tail the divergence compares coarse distributions: the k classes and the tail (the
    student's mass outside the k classes). Temperature re-tempers each outcome's probability,
    ``q^(1/T) / Z``. docs/METHODS.md, "Sparse (top-k) teachers".

    vocab_size: the teacher's vocabulary width, optional: indices must lie below it (checked on
        CPU tensors), and it must be the student's width or, with ``padded_teacher=True``
        (which needs it), that width plus padding. docs/METHODS.md, "Mismatched vocabularies".
    """
    indices: object  # torch.Tensor (this module does not import torch: setup.py loads it)
    values: object
    tail: bool = False
    vocab_size: object = None  # an int (checked with the tensors: under torch.compile a SymInt)


def _option(default, constexpr=False):
    return field(default=default, metadata={"constexpr": constexpr})


@dataclass(frozen=True)
class FusedOptions:
    """Scalars a backend needs besides the tensors. Kernels trust these: validation is done."""
    temp_mode: int = _option(TEMP_SCALAR, constexpr=True)
    temp_value: float = _option(4.0)  # the temperature when temp_mode is TEMP_SCALAR
    tau0: float = _option(4.0)  # DTD: tau = max(tau0 - beta w, tau_min)
    beta: float = _option(1.0)
    tau_min: float = _option(1.0)
    kd_weight: float = _option(0.9)
    wrong_kd_weight: float = _option(0.9)  # the KD weight on rows the teacher gets wrong
    ce_weight: float = _option(0.1)
    correction: int = _option(CORRECTION_NONE, constexpr=True)
    smooth_eps: float = _option(0.1)
    virtual_teacher: float = _option(0.0)  # 0: read the teacher tensor; a in (0, 1]: pd from labels
    t2_scale: bool = _option(True, constexpr=True)
    ignore_index: int = _option(-100)
    divergence: int = _option(DIVERGENCE_KL, constexpr=True)
    divergence_param: float = _option(0.5)  # JSD's beta (in (0, 1)), the skew divergences' alpha
    teacher_tail: bool = _option(False, constexpr=True)  # sparse log-probs: 1 - sum exp is a tail
    compute_grad: bool = _option(True)  # False: the loss only, no N x C gradient written
    grad_scale: float = _option(1.0)  # the gradient is written times this
    # REDUCTION_NONE: the loss per row; SUM / MEAN: one value, and "mean" divides the gradient
    # by the count of rows that count as well (constexpr: Triton launches a reduction for it)
    reduction: int = _option(REDUCTION_NONE, constexpr=True)

    def pack(self):
        """The options as the C++ and Triton ops take them: floats in declaration order."""
        if is_compiling():  # Dynamo cannot trace attrgetter; the loop is what it sees
            return [float(getattr(self, name)) for name in OPTION_NAMES]
        return list(map(float, _OPTION_VALUES(self)))

    @classmethod
    def unpack(cls, values):
        return cls(**{f.name: f.type(v) for f, v in zip(fields(cls), values)})

    def triton_kwargs(self):
        """Keyword arguments for the Triton forward kernel, whose parameters carry these names."""
        return {name: getattr(self, name) for name in OPTION_NAMES}


# The two shard entry points of every backend (vocab-parallel: docs/METHODS.md, "Vocab-parallel
# distillation"). shard_statistics: per row, these float64 values over a range of its columns
# (the range's own maxima and sums; class ids global); the merge (kdkernels/_vocab_parallel.py)
# combines them over the ranges.
SHARD_STATS = ("ms", "zs", "mt", "zt", "cross", "z1", "s_y", "t_y", "owns", "b", "s_b", "tx1",
               "idx1", "tx2", "s_sum")
# shard_pass: per row, the merged values it reads (float64) to write the range's gradient, or
# its part of D and sum_j p_j G_j (the divergences other than the forward KL). scale: the
# gradient's factor (0 on a row that does not count, NaN on a bad row); the last four: 0 or 1.
SHARD_ROWS = ("T", "ms", "log_zs", "mt", "log_zt", "z1", "kd_grad", "b", "lr_y", "lr_b",
              "g_mean", "scale", "fix_y", "fix_b", "smoothed", "has_teacher")

OPTION_NAMES = tuple(f.name for f in fields(FusedOptions))
_OPTION_VALUES = attrgetter(*OPTION_NAMES)  # one call per kernel launch: a few us less than a loop
OPTION_INDEX = {name: i for i, name in enumerate(OPTION_NAMES)}
CONSTEXPR_OPTIONS = tuple(f.name for f in fields(FusedOptions) if f.metadata["constexpr"])


def cpp_header():
    """kdk_contract.h for csrc/distill.cpp (written by setup.py at build time)."""
    cpp = {int: "int64_t", float: "double", bool: "bool"}
    members = "\n".join(f"  {cpp[f.type]} {f.name};" for f in fields(FusedOptions))
    unpack = ",\n      ".join(
        f"v[{i}] != 0" if f.type is bool else f"static_cast<{cpp[f.type]}>(v[{i}])"
        for i, f in enumerate(fields(FusedOptions)))
    enums = "\n".join(f"constexpr int64_t k{''.join(w.capitalize() for w in name.split('_'))} = "
                      f"{value};" for name, value in ENUMS.items())
    table = ",\n    ".join(f'{{"{name}", {value}}}' for name, value in ENUMS.items())
    shard = "\n".join(
        [f"constexpr int64_t kStat_{name} = {i};" for i, name in enumerate(SHARD_STATS)]
        + [f"constexpr int64_t kNumStats = {len(SHARD_STATS)};"]
        + [f"constexpr int64_t kRow_{name} = {i};" for i, name in enumerate(SHARD_ROWS)]
        + [f"constexpr int64_t kNumRows = {len(SHARD_ROWS)};"])
    return f"""// Generated by setup.py from kdkernels/_options.py, the one declaration.
#pragma once
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>
#include <cstdint>

namespace kdk {{

{enums}

struct Options {{
{members}
}};

constexpr int64_t kNumOptions = {len(OPTION_NAMES)};
{shard}
constexpr const char* kOptionNames = "{','.join(OPTION_NAMES)}";

inline Options unpack_options(c10::ArrayRef<double> v) {{
  TORCH_CHECK(static_cast<int64_t>(v.size()) == kNumOptions, "kdkernels: expected ",
              kNumOptions, " options, got ", v.size());
  return Options{{
      {unpack}}};
}}

struct EnumValue {{
  const char* name;
  int64_t value;
}};
constexpr EnumValue kEnums[] = {{
    {table}}};

}}  // namespace kdk
"""
