"""kdkernels: fused knowledge-distillation losses (Triton on CUDA, C++ on CPU, pure torch anywhere).

    import kdkernels
    loss_fn = kdkernels.KDLoss(temperature=4.0)
    loss = loss_fn(student_logits, teacher_logits, labels)

``kdkernels.functional`` holds the functions, ``kdkernels.nn`` the modules (also exported here),
``kdkernels.backends()`` says which fused kernels run here and why not.
"""
from . import functional, nn
from ._core import DistillStats, distillation_loss
from ._fused_linear import fused_linear_distillation_loss
from ._options import DynamicTemperature, SparseTeacher
from ._vocab_parallel import (
    vocab_parallel_distillation_loss,
    vocab_parallel_fused_linear_distillation_loss,
)
from .nn import (
                 DistillationLoss,
                 FusedLinearDistillationLoss,
                 KDLoss,
                 PreparingLessonsLoss,
                 TeacherBiasLoss,
                 TfKDRegLoss,
                 TopScoreDifferenceLoss,
)
from .ops import backends

__version__ = "0.1.0"
__all__ = ["functional", "nn", "backends", "distillation_loss", "fused_linear_distillation_loss",
           "vocab_parallel_distillation_loss", "vocab_parallel_fused_linear_distillation_loss",
           "DistillStats", "DynamicTemperature", "SparseTeacher", "DistillationLoss",
           "FusedLinearDistillationLoss", "KDLoss", "TfKDRegLoss", "PreparingLessonsLoss",
           "TeacherBiasLoss", "TopScoreDifferenceLoss"]
