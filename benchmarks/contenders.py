"""What the benchmarks measure: the methods, each as a fused kdkernels call and as the eager
reference, and the contenders that compute them."""
import torch

from kdkernels import backends
from kdkernels.reference.methods import METHODS

T = 4.0
BENCHMARKED = ("kd", "lessons_swap_dtd", "teacher_bias", "tfkd_reg")  # names in METHODS


def liger_kd():
    """Liger-Kernel's KL divergence, with the log_softmax / softmax it needs, as plain KD."""
    from liger_kernel.transformers import LigerKLDIVLoss
    kl = LigerKLDIVLoss(reduction="batchmean")

    def fn(s, t, y):
        log_p = torch.log_softmax(s.float() / T, -1)
        q = torch.softmax(t.float() / T, -1)
        return 0.9 * T * T * kl(log_p, q) + 0.1 * torch.nn.functional.cross_entropy(s.float(), y)
    return fn


def contenders(method, device, compiled=True, skipped=None):
    """{name: fn(s, t, y) -> loss} for one method on one device type. The contenders left out
    here go into `skipped` (when given) as {name: why}."""
    skipped = {} if skipped is None else skipped
    entry = METHODS[method]
    found = {}
    for name, info in backends().items():
        if not info.available:
            skipped[f"kdkernels-{name}"] = info.reason
            continue
        if name == "triton" and device != "cuda":
            skipped["kdkernels-triton"] = "CUDA only (the CPU interpreter is for tests)"
            continue
        if name == "cpp" and device != "cpu":
            continue  # a CPU kernel: not a contender on the GPU
        found[f"kdkernels-{name}"] = entry.fused(name)
    ref = entry.reference()
    found["eager-reference"] = ref
    if compiled:  # the runner resets Dynamo per case: each case gets its own compilation
        found["compile-reference"] = torch.compile(ref, dynamic=False)
    else:
        skipped["compile-reference"] = "--no-compile"
    if method == "kd" and device != "cuda":
        skipped["liger-kl"] = "Liger-Kernel's Triton kernels run on CUDA only"
    elif method == "kd":
        try:
            found["liger-kl"] = liger_kd()
        except ImportError as error:
            skipped["liger-kl"] = ("Liger-Kernel not installed" if error.name == "liger_kernel"
                                   else f"Liger-Kernel does not import: {error}")
    return found
