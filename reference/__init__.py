"""Pure-PyTorch reference implementations of every method in docs/METHODS.md: the oracle.
Installed with the package as ``kdkernels.reference`` (for your own tests too).

Written for clarity, not speed: each function follows the specification line by line and lets
autograd differentiate it. Generic over device and dtype; the tests run it in float64.
``kdkernels.reference.methods.METHODS`` pairs each method's fused loss with its reference.
"""
from .losses import (  # noqa: F401
    DIVERGENCES,
    densify,
    distillation_loss,
    divergence_rows,
    dtd_temperature,
    kd_loss,
    preparing_lessons_loss,
    reduce_rows,
    teacher_bias_loss,
    tfkd_reg_loss,
    top_score_difference_loss,
)
