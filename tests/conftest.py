"""Test set-up: the Triton interpreter on CPU-only machines. TRITON_INTERPRET must be set before
the triton kernels are decorated."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import settings  # noqa: E402

settings.register_profile("kdkernels", deadline=None, print_blob=True)
settings.load_profile("kdkernels")
