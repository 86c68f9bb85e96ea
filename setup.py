"""Builds kdkernels and its C++ CPU kernel (kdkernels._C).

Install with ``pip install --no-build-isolation -e .`` after torch (an isolated build would fetch
another torch). The kernel is compiled for the CPU capability of the build machine, as torch
reports it (override: KDKERNELS_CPU_CAPABILITY=AVX512|AVX2|DEFAULT); KDKERNELS_NO_EXTENSION=1
skips it. A failed compile does not fail the install: the backend then reports why it is missing
and kdkernels falls back to pure torch.
"""
import os
import sys
import warnings

from setuptools import setup

CAPABILITY_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma",
               "-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"],
}


def extension_and_cmdclass():
    if os.environ.get("KDKERNELS_NO_EXTENSION"):
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        warnings.warn("torch is not importable: building kdkernels without its C++ kernel. "
                      "Install torch first, then this package with --no-build-isolation.")
        return [], {}
    capability = os.environ.get("KDKERNELS_CPU_CAPABILITY") or torch.backends.cpu.get_cpu_capability()
    if capability.startswith("AVX512"):
        capability = "AVX512"
    flags = CAPABILITY_FLAGS.get(capability, [])
    if not flags:
        capability = "DEFAULT"
    extension = CppExtension(
        "kdkernels._C", ["csrc/distill.cpp"],
        extra_compile_args=["-O3", "-fopenmp", f'-DKDK_CPU_CAPABILITY="{capability}"'] + flags,
        extra_link_args=["-fopenmp"])

    class OptionalBuildExtension(BuildExtension):
        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as error:  # no compiler, bad flags: install without the kernel
                print(f"warning: kdkernels C++ kernel not built ({error}); the 'cpp' backend "
                      "will be unavailable", file=sys.stderr)

    return [extension], {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_and_cmdclass()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
