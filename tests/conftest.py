"""Test set-up: the repository root on the path (for reference/), and the Triton interpreter on
CPU-only machines. TRITON_INTERPRET must be set before triton kernels are decorated."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import settings  # noqa: E402

settings.register_profile("kdkernels", deadline=None, print_blob=True)
settings.load_profile("kdkernels")
