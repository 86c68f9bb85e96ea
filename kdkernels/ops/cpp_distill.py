"""The C++ CPU backend: ``torch.ops.kdkernels.distill_cpu`` from csrc/distill.cpp, built by setup.py.
Registered through TORCH_LIBRARY with a fake kernel here, so torch.compile sees one opaque op."""
import torch

NAME = "cpp"
_ORDER = ["DEFAULT", "AVX2", "AVX512"]

try:
    from .. import _C
    _IMPORT_ERROR = None
except ImportError as error:  # not built (no compiler at install, or KDKERNELS_NO_EXTENSION)
    _C, _IMPORT_ERROR = None, error


def _runtime_capability():
    cap = torch.backends.cpu.get_cpu_capability()
    return "AVX512" if cap.startswith("AVX512") else cap if cap in _ORDER else "DEFAULT"


_HERE = _runtime_capability()  # once: availability must stay plain Python for torch.compile


def availability(device=None):
    if device is not None and device.type != "cpu":
        return False, f"the C++ kernel runs on CPU tensors only, not {device.type}"
    if _C is None:
        return False, (f"the extension kdkernels._C is not built ({_IMPORT_ERROR}); reinstall with "
                       "a C++ compiler: pip install --no-build-isolation -e .")
    built = _C.CPU_CAPABILITY
    if _ORDER.index(built) > _ORDER.index(_HERE):
        return False, f"built for {built} but this CPU supports {_HERE}; rebuild it here"
    return True, f"C++ kernel built for {built} (this CPU: {_HERE})"


if _C is not None:
    @torch.library.register_fake("kdkernels::distill_cpu")
    def _fake(student, teacher, target, temperature, *args):
        N = student.shape[0]
        acc = torch.float64 if student.dtype == torch.float64 else torch.float32
        compute_grad = args[-2]
        return (student.new_empty(N, dtype=acc),
                torch.empty_like(student) if compute_grad else student.new_empty(0),
                student.new_empty(N, dtype=acc), student.new_empty(N, dtype=torch.int8))


def forward(student, teacher, target, temp_rows, o):
    return torch.ops.kdkernels.distill_cpu(
        student, teacher, target, temp_rows, o.temperature, o.temp_mode, o.tau0, o.beta,
        o.tau_min, o.kd_weight, o.wrong_kd_weight, o.ce_weight, o.correction, o.smooth_eps,
        o.virtual_teacher, o.t2_scale, o.ignore_index, o.compute_grad, o.grad_scale)
