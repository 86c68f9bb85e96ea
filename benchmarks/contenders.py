"""What the benchmarks measure: the methods, each as a fused kdkernels call and as the eager
reference, and the contenders that compute them."""
import torch

import kdkernels.functional as KF
import reference as R
from kdkernels import backends

T = 4.0
METHODS = {
    "kd": (lambda s, t, y, b: KF.kd_loss(s, t, y, temperature=T, backend=b),
           lambda s, t, y: R.kd_loss(s, t, y, temperature=T)),
    "lessons_swap_dtd": (
        lambda s, t, y, b: KF.preparing_lessons_loss(s, t, y, correction="swap",
                                                     temperature="cosine", backend=b),
        lambda s, t, y: R.preparing_lessons_loss(s, t, y, correction="swap",
                                                 temperature=dict(weighting="cosine"))),
    "teacher_bias": (lambda s, t, y, b: KF.teacher_bias_loss(s, t, y, gamma=0.3, backend=b),
                     lambda s, t, y: R.teacher_bias_loss(s, t, y, 0.3)),
    "tfkd_reg": (lambda s, t, y, b: KF.tfkd_reg_loss(s, y, backend=b),
                 lambda s, t, y: R.tfkd_reg_loss(s, y)),
}


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
    fused, ref = METHODS[method]
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
        found[f"kdkernels-{name}"] = (lambda b: (lambda s, t, y: fused(s, t, y, b)))(name)
    found["eager-reference"] = ref
    if compiled:  # the runner resets Dynamo per case: each case gets its own compilation
        found["compile-reference"] = torch.compile(ref, dynamic=False)
    else:
        skipped["compile-reference"] = "--no-compile"
    if method == "kd":
        try:
            found["liger-kl"] = liger_kd()
        except ImportError as error:
            skipped["liger-kl"] = ("Liger-Kernel not installed" if error.name == "liger_kernel"
                                   else f"Liger-Kernel does not import: {error}")
    return found
