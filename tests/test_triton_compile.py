"""The real Triton compiler, without a GPU: every constexpr variant the launcher can pick is
compiled for sm_80 and sm_90, and must compile without spilling registers to local memory. The
interpreter (test_backends.py) checks the math; only the compiler checks what it rejects."""
import concurrent.futures
import dataclasses
import itertools
import multiprocessing
import os
import subprocess
import tempfile

import pytest

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kdkernels._options import (  # noqa: E402
    CONSTEXPR_OPTIONS,
    CORRECTIONS,
    DIVERGENCE_KL,
    DIVERGENCES,
    TEMP_COSINE,
    TEMP_MAX_PROB,
    TEMP_ROWS,
    TEMP_SCALAR,
    FusedOptions,
)
from kdkernels.ops import triton_distill  # noqa: E402

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
ARCHS = (80, 90)
# student and teacher dtypes: each alone, and the mixed pairs that occur (a bf16 student with an
# fp32 teacher, and back)
DTYPE_PAIRS = [("fp32", "fp32"), ("bf16", "bf16"), ("fp16", "fp16"), ("fp64", "fp64"),
               ("bf16", "fp32"), ("fp32", "bf16"), ("fp16", "fp32")]


def _signature(kernel, student="bf16", teacher="bf16", acc="fp32", upstream="fp32",
               **overrides):
    """Argument types as the launcher passes them: tensors by dtype, the options by their
    declared types (kdkernels/_options.py), strides and the like as ints, the rest floats."""
    pointers = {"s_ptr": student, "t_ptr": teacher, "y_ptr": "i64", "temp_ptr": acc,
                "loss_ptr": "fp32", "temp_out_ptr": "fp32", "flags_ptr": "i8", "coef_ptr": "fp32",
                "index_ptr": "i64", "up_ptr": upstream, "grad_ptr": student, "v_ptr": teacher,
                "i_ptr": "i64", "member_ptr": "fp32", "scale_ptr": "fp32", "out_ptr": "fp32",
                "rows_ptr": "fp64", "g_ptr": student, "sums_ptr": "fp64", **overrides}
    declared = {f.name: {int: "i64", float: "fp32", bool: "i1"}[f.type]
                for f in dataclasses.fields(FusedOptions)}
    signature = {}
    for name in kernel.arg_names:
        if name in pointers:
            signature[name] = "*" + pointers[name]
        elif name in ("C", "K", "N", "W", "vocab_start"):
            signature[name] = "i32"
        elif name in CONSTEXPR_OPTIONS or name.isupper():
            signature[name] = "constexpr"
        elif name in declared:
            signature[name] = declared[name]
        elif name.endswith("_stride"):
            signature[name] = "i64"
        else:
            signature[name] = "fp32"
    return signature


def _forward_flags():
    """Every combination of the forward kernel's flags that distillation_loss can ask for."""
    for temp_mode, correction, virtual, labels, ce, t2 in itertools.product(
            (TEMP_SCALAR, TEMP_ROWS, TEMP_COSINE, TEMP_MAX_PROB), CORRECTIONS.values(),
            (False, True), (False, True), (False, True), (False, True)):
        if not labels and (correction or virtual or ce):
            continue  # these need labels
        if virtual and temp_mode in (TEMP_COSINE, TEMP_MAX_PROB):
            continue  # a dynamic temperature needs a teacher tensor
        yield dict(temp_mode=temp_mode, correction=correction, t2_scale=t2, VIRTUAL=virtual,
                   HAS_LABELS=labels, HAS_CE=ce, divergence=DIVERGENCE_KL, teacher_tail=False,
                   reduction=0)


def _divergence_flags(sparse):
    """Every divergence with every correction (and, sparse, with and without a tail), and every
    temperature mode with a divergence other than KL, the other flags common."""
    common = dict(temp_mode=TEMP_SCALAR, t2_scale=True, HAS_LABELS=True, HAS_CE=True,
                  teacher_tail=False, reduction=0)
    if not sparse:
        common["VIRTUAL"] = False
    for divergence, correction, tail in itertools.product(
            DIVERGENCES.values(), CORRECTIONS.values(), (False, True) if sparse else (False,)):
        yield dict(common, divergence=divergence, correction=correction, teacher_tail=tail)
    for temp_mode in (TEMP_ROWS, TEMP_COSINE, TEMP_MAX_PROB):
        yield dict(common, temp_mode=temp_mode, correction=CORRECTIONS["swap"],
                   divergence=DIVERGENCES["jsd"])
    if sparse:  # without labels (no correction, no CE)
        yield dict(common, HAS_LABELS=False, HAS_CE=False, correction=0, divergence=0)


def _launches():
    """(kernel name, constexprs, warps, dtypes) for every variant the launcher can pick."""
    blocks = [1 << k for k in range(14)]
    configs = {kind: sorted({triton_distill.launch_config(C, kind) for C in blocks})
               for kind in ("forward", "grad")}
    common = dict(temp_mode=TEMP_SCALAR, correction=0, t2_scale=True, VIRTUAL=False,
                  HAS_LABELS=True, HAS_CE=True, divergence=DIVERGENCE_KL, teacher_tail=False,
                  reduction=0)
    largest_forward, largest_grad = configs["forward"][-1], configs["grad"][-1]
    for block, warps in configs["forward"]:  # every block size, the common flags
        yield "forward", dict(common, BLOCK=block), warps, ("bf16", "bf16")
    for flags in _forward_flags():  # every flag combination, at the largest block
        yield "forward", dict(flags, BLOCK=largest_forward[0]), largest_forward[1], ("bf16", "bf16")
    for student, teacher in DTYPE_PAIRS:
        yield ("forward", dict(common, BLOCK=largest_forward[0]), largest_forward[1],
               (student, teacher))
    for flags in _divergence_flags(sparse=False):
        yield "forward", dict(flags, BLOCK=largest_forward[0]), largest_forward[1], ("bf16", "bf16")
    grad = dict(VIRTUAL=False, HAS_CE=True, DIVERGENCE=DIVERGENCE_KL, SCALED=True)
    for (block, warps), virtual, ce in itertools.product(configs["grad"], (False, True),
                                                         (False, True)):
        yield "grad", dict(grad, BLOCK=block, VIRTUAL=virtual, HAS_CE=ce), warps, ("bf16", "bf16")
    for student, teacher in DTYPE_PAIRS:
        yield "grad", dict(grad, BLOCK=largest_grad[0]), largest_grad[1], (student, teacher)
    for divergence in DIVERGENCES.values():
        yield ("grad", dict(grad, BLOCK=largest_grad[0], DIVERGENCE=divergence), largest_grad[1],
               ("bf16", "bf16"))

    # a sparse (top-k) teacher: every k block up to the largest allowed, every flag combination
    k_blocks = sorted({triton_distill.k_block(k) for k in range(1, triton_distill.MAX_K + 1)})
    sparse = dict(common, KBLOCK=k_blocks[-1])
    del sparse["VIRTUAL"]
    for block, warps in configs["forward"]:
        yield "sparse", dict(sparse, BLOCK=block), warps, ("bf16", "bf16")
    for k_block in k_blocks:
        yield "sparse", dict(sparse, BLOCK=largest_forward[0], KBLOCK=k_block), \
            largest_forward[1], ("bf16", "bf16")
    for flags in _divergence_flags(sparse=True):
        yield ("sparse", dict(flags, BLOCK=largest_forward[0], KBLOCK=k_blocks[-1]),
               largest_forward[1], ("bf16", "bf16"))
    for student, teacher in DTYPE_PAIRS:
        yield ("sparse", dict(sparse, BLOCK=largest_forward[0]), largest_forward[1],
               (student, teacher))
    for (block, warps), k_block, ce in itertools.product(configs["grad"], k_blocks, (False, True)):
        yield ("sparse_grad", dict(BLOCK=block, KBLOCK=k_block, HAS_CE=ce, SCALED=True), warps,
               ("bf16", "bf16"))
    for labels, mean in itertools.product((False, True), (False, True)):  # "sum" and "mean"
        yield ("reduce", dict(BLOCK=1024, HAS_LABELS=labels, MEAN=mean), 4, ("fp32", "fp32"))

    # small rows: every tile the launcher picks, every flag it covers, every dtype pair
    tiles = sorted({triton_distill.rows_config(C)
                    for C in [1 << k for k in range(11)] if C <= triton_distill.SMALL_ROWS_MAX})
    rows = dict(temp_mode=TEMP_SCALAR, correction=0, t2_scale=True, VIRTUAL=False,
                HAS_LABELS=True, HAS_CE=True, divergence=DIVERGENCE_KL, teacher_tail=False,
                reduction=0)
    for block, count, warps in tiles:
        yield "rows", dict(rows, BLOCK=block, ROWS=count), warps, ("bf16", "bf16")
    block, count, warps = tiles[-1]
    for temp_mode, virtual, labels, ce, t2 in itertools.product(
            (TEMP_SCALAR, TEMP_ROWS), (False, True), (False, True), (False, True), (False, True)):
        if not labels and (virtual or ce):
            continue
        yield ("rows", dict(rows, temp_mode=temp_mode, VIRTUAL=virtual, HAS_LABELS=labels,
                            HAS_CE=ce, t2_scale=t2, BLOCK=block, ROWS=count), warps,
               ("bf16", "bf16"))
    for student, teacher in DTYPE_PAIRS:
        yield "rows", dict(rows, BLOCK=block, ROWS=count), warps, (student, teacher)
    for student, scaled in itertools.product(("fp32", "bf16", "fp16", "fp64"), (False, True)):
        yield "scale_rows", dict(BLOCK=1024, SCALED=scaled), 4, (student, student)

    # the shard entry points (vocab-parallel): every block, every flag, every dtype
    shard_configs = sorted({triton_distill.shard_config(W) for W in blocks})
    block, warps = shard_configs[-1]
    stats = dict(VIRTUAL=False, HAS_LABELS=True, HAS_CE=True, CORRECTION=0, FLOAT_MATH=True)
    for block_, warps_ in shard_configs:
        yield "shard_stats", dict(stats, BLOCK=block_), warps_, ("bf16", "bf16")
    for correction, virtual, labels, ce in itertools.product(
            CORRECTIONS.values(), (False, True), (False, True), (False, True)):
        if not labels and (correction or virtual or ce):
            continue
        yield ("shard_stats", dict(stats, BLOCK=block, CORRECTION=correction, VIRTUAL=virtual,
                                   HAS_LABELS=labels, HAS_CE=ce), warps, ("bf16", "bf16"))
    passes = dict(VIRTUAL=False, HAS_LABELS=True, HAS_CE=True, DIVERGENCE=DIVERGENCE_KL,
                  GRAD=True, FLOAT_MATH=True)
    for block_, warps_ in shard_configs:
        yield "shard_pass", dict(passes, BLOCK=block_), warps_, ("bf16", "bf16")
    for divergence, grad, virtual, ce in itertools.product(
            DIVERGENCES.values(), (False, True), (False, True), (False, True)):
        if divergence == DIVERGENCE_KL and not grad:
            continue  # the sums are for the other divergences
        yield ("shard_pass", dict(passes, BLOCK=block, DIVERGENCE=divergence, GRAD=grad,
                                  VIRTUAL=virtual, HAS_CE=ce), warps, ("bf16", "bf16"))
    for student, teacher in DTYPE_PAIRS:
        float_math = student != "fp64"
        yield ("shard_stats", dict(stats, BLOCK=block, FLOAT_MATH=float_math), warps,
               (student, teacher))
        yield ("shard_pass", dict(passes, BLOCK=block, FLOAT_MATH=float_math), warps,
               (student, teacher))


def compile_one(job):
    """Compiles one variant; returns (job, registers, local bytes) or (job, error)."""
    kind, constexprs, warps, (student, teacher), arch = job
    from kdkernels.ops import _triton_kernels as K
    from kdkernels.ops import _triton_shard as S
    kernel = {"shard_stats": S._shard_stats_kernel, "shard_pass": S._shard_pass_kernel,
              "forward": K._distill_kernel, "grad": K._distill_grad_kernel,
              "sparse": K._distill_sparse_kernel,
              "sparse_grad": K._distill_sparse_grad_kernel, "reduce": K._reduce_kernel,
              "rows": K._distill_rows_kernel, "scale_rows": K._scale_rows_kernel}[kind]
    if kind not in ("reduce", "rows", "scale_rows", "shard_stats", "shard_pass"):
        constexprs = dict(constexprs, NUM_COEF=triton_distill.NUM_COEF)
    acc = "fp64" if student == "fp64" else "fp32"
    # the small-rows kernel leaves a float32 gradient, which scale_rows writes in the dtype
    overrides = {"rows": {"grad_ptr": "fp32"},
                 "shard_stats": {"temp_ptr": "fp64", "out_ptr": "fp64"},
                 "scale_rows": {"g_ptr": "fp32", "out_ptr": student}}.get(kind, {})
    source = ASTSource(kernel, _signature(kernel, student, teacher, acc, acc, **overrides),
                       constexprs=constexprs)
    try:
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": warps})
    except Exception as error:  # noqa: BLE001 -- reported with the variant
        return job, f"{type(error).__name__}: {error}".splitlines()[0][:500], None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([CUOBJDUMP, "-res-usage", cubin.name], capture_output=True,
                               text=True, check=True).stdout
    registers = int(usage.split("REG:")[1].split()[0])
    local = int(usage.split("LOCAL:")[1].split()[0])
    return job, registers, local


@pytest.mark.skipif(not os.path.exists(CUOBJDUMP), reason="this triton wheel ships no cuobjdump")
def test_every_launchable_variant_compiles_without_spills():
    jobs = [launch + (arch,) for launch in _launches() for arch in ARCHS]
    context = multiprocessing.get_context("spawn")
    env_interpret = os.environ.pop("TRITON_INTERPRET", None)  # the compiler, not the interpreter
    try:
        with concurrent.futures.ProcessPoolExecutor(max_workers=os.cpu_count() or 1,
                                                    mp_context=context) as pool:
            results = list(pool.map(compile_one, jobs, chunksize=4))
    finally:
        if env_interpret is not None:
            os.environ["TRITON_INTERPRET"] = env_interpret
    failures = [f"{job}: {registers}" for job, registers, local in results if local is None]
    spills = [f"{job}: {registers} registers, {local} bytes local" for job, registers, local
              in results if local]
    assert not failures, "\n".join(failures[:20])
    assert not spills, "\n".join(spills[:20])
    most = max(results, key=lambda r: r[1])
    print(f"{len(results)} variants compiled; most registers: {most[1]} ({most[0]})")
    for kind in dict.fromkeys(job[0] for job, _, _ in results):
        mine = [registers for job, registers, _ in results if job[0] == kind]
        print(f"  {kind}: {len(mine)} variants, registers {min(mine)}..{max(mine)}")
