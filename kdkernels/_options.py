"""The options of the one fused primitive, as every backend receives them."""
from dataclasses import dataclass

CORRECTIONS = {None: 0, "swap": 1, "smooth": 2, "rectify": 3}
REDUCTIONS = ("mean", "sum", "none")
WEIGHTINGS = ("cosine", "max_prob")

# How a row's temperature is found. ROWS: read from a [N] tensor; COSINE / MAX_PROB: the DTD
# temperature computed in the kernel from the same row.
TEMP_SCALAR, TEMP_ROWS, TEMP_COSINE, TEMP_MAX_PROB = 0, 1, 2, 3

# Bits of the per-row flags every backend writes.
FLAG_TEACHER_CORRECT, FLAG_STILL_WRONG = 1, 2


@dataclass(frozen=True)
class DynamicTemperature:
    """Dynamic Temperature Distillation (Preparing Lessons): a temperature per row,
    ``tau_i = tau0 - beta * w_i`` (or ``tau0 + beta * (mean(w) - w_i)`` with ``center=True``),
    clamped at ``tau_min``, where ``w_i`` measures how confusable row i is:

    - ``weighting="cosine"``: ``w = (1 - cos(s, t))^2`` over the classes where both logits are finite;
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
class FusedOptions:
    """Scalars a backend needs besides the tensors. Kernels trust these: validation is done."""
    temp_mode: int = TEMP_SCALAR
    temperature: float = 4.0
    tau0: float = 4.0
    beta: float = 1.0
    tau_min: float = 1.0
    kd_weight: float = 0.9
    wrong_kd_weight: float = 0.9
    ce_weight: float = 0.1
    correction: int = 0
    smooth_eps: float = 0.1
    virtual_teacher: float = 0.0  # 0: read the teacher tensor; a in (0, 1]: build pd from labels
    t2_scale: bool = True
    ignore_index: int = -100
    compute_grad: bool = True  # False: loss only (no_grad / evaluation), no N x C gradient written
    grad_scale: float = 1.0  # the gradient is written times this (1 / rows for "mean" on CPU)
