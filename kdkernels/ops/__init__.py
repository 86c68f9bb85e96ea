"""Backends of the fused primitive. Each module exposes NAME, ``availability(device)`` -> (ok, why)
and ``forward(student, teacher, target, temp_rows, options)`` -> (loss, grad, temperature,
flags), with one contract: ``loss`` is the rows' losses ([N], ``options.reduction`` NONE) or their
sum or mean over the rows that count (one value, SUM / MEAN), and ``grad`` is d loss / d student
(rows independent), in the student's dtype; ignored rows have loss 0 and gradient 0."""
from collections import namedtuple

from . import cpp_distill, torch_distill, triton_distill

BackendInfo = namedtuple("BackendInfo", "available reason")
NAMES = ("triton", "cpp", "torch")
_MODULES = {"triton": triton_distill, "cpp": cpp_distill, "torch": torch_distill}


def backends():
    """What each backend can do here, and why not: {name: BackendInfo(available, reason)}."""
    return {name: BackendInfo(*_MODULES[name].availability()) for name in NAMES}


def resolve(name, device):
    """The backend module for ``name`` ("auto" or one of NAMES) on ``device``; a clear error when
    the named backend cannot run there. Plain Python, so that torch.compile traces through it."""
    if name == "auto":
        preferred = {"cuda": "triton", "cpu": "cpp"}.get(device.type)
        if preferred is not None and _MODULES[preferred].availability(device)[0]:
            return _MODULES[preferred]
        return _MODULES["torch"]
    if name not in NAMES:
        raise ValueError(f"backend must be 'auto' or one of {NAMES}, got {name!r}")
    module = _MODULES[name]
    ok, why = module.availability(device)
    if not ok:
        raise RuntimeError(f"backend={name!r} is not available for {device.type} tensors: {why}")
    return module


