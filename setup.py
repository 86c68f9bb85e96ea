"""Builds kdkernels and its C++ CPU kernel.

Install with ``pip install --no-build-isolation -e .`` (or without -e) after torch: an isolated
build would fetch another torch. As ATen does, the kernel source is compiled once per CPU
capability into the same install (kdkernels._C_default, _C_avx2 with FMA and F16C, _C_avx512),
whatever the build machine's CPU, and the import picks the best variant the running CPU supports
(torch.backends.cpu.get_cpu_capability(), which ATEN_CPU_CAPABILITY can lower).

KDKERNELS_CPU_VARIANTS=default,avx2 builds a subset; KDKERNELS_NO_EXTENSION=1 builds none. A
variant that fails to compile does not fail the install: kdkernels/_build_report.json records
what happened, kdkernels.backends() says it, and the pure-torch backend takes over.
"""
import importlib.util
import json
import os
import sys
import tempfile
import traceback
import warnings

from setuptools import setup

VARIANT_FLAGS = {
    "default": [],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"],
}
HERE = os.path.dirname(os.path.abspath(__file__))
REPORT = "_build_report.json"


def first_error_line(error):
    """The compiler's first error line, else the exception's last line."""
    text = f"{getattr(error, 'output', '') or ''}\n{error}"
    for line in text.splitlines():
        if "error:" in line.lower():
            return line.strip()[:300]
    last = (str(error).strip().splitlines() or [type(error).__name__])[-1][:300]
    return f"{last} (pip install -v shows the compiler's output)"


GENERATED = os.path.join(HERE, "build", "kdkernels-variants")


def write_if_changed(path, text):
    if not os.path.exists(path) or open(path).read() != text:
        with open(path, "w") as handle:
            handle.write(text)


def write_contract_header():
    """kdk_contract.h from the one declaration of the options (kdkernels/_options.py, loaded as
    a file: the package itself is not importable before it is built)."""
    spec = importlib.util.spec_from_file_location(
        "kdkernels_options", os.path.join(HERE, "kdkernels", "_options.py"))
    options = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = options  # dataclasses look their module up there
    spec.loader.exec_module(options)
    os.makedirs(GENERATED, exist_ok=True)
    write_if_changed(os.path.join(GENERATED, "kdk_contract.h"), options.cpp_header())


def variant_sources(name):
    """A one-line source per variant that includes csrc/distill.cpp, so that each variant gets
    its own object file."""
    folder = GENERATED
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"distill_{name}.cpp")
    write_if_changed(path, f'#include "{os.path.join(HERE, "csrc", "distill.cpp")}"\n')
    return [os.path.relpath(path, HERE)]


def write_report(folder, report):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, REPORT), "w") as handle:
        json.dump(report, handle, indent=1)


def extensions_and_cmdclass():
    if os.environ.get("KDKERNELS_NO_EXTENSION"):
        write_report(os.path.join(HERE, "kdkernels"),
                     {"skipped": "KDKERNELS_NO_EXTENSION was set at install", "variants": {}})
        return [], {}
    try:
        import torch  # noqa: F401
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        warnings.warn("torch is not importable: building kdkernels without its C++ kernel. "
                      "Install torch first, then this package with --no-build-isolation.",
                      stacklevel=1)
        write_report(os.path.join(HERE, "kdkernels"),
                     {"skipped": "torch was not importable at install (install torch first, then "
                                 "kdkernels with --no-build-isolation)", "variants": {}})
        return [], {}
    wanted = os.environ.get("KDKERNELS_CPU_VARIANTS", ",".join(VARIANT_FLAGS)).lower().split(",")
    unknown = sorted(set(wanted) - set(VARIANT_FLAGS))
    if unknown:
        raise SystemExit(f"KDKERNELS_CPU_VARIANTS: unknown {unknown}; choose from "
                         f"{list(VARIANT_FLAGS)}")
    write_contract_header()
    extensions = [
        CppExtension(f"kdkernels._C_{name}", variant_sources(name), include_dirs=[GENERATED],
                     extra_compile_args=["-O3", "-fopenmp",
                                         f'-DKDK_CPU_CAPABILITY="{name.upper()}"']
                     + VARIANT_FLAGS[name],
                     extra_link_args=["-fopenmp"])
        for name in VARIANT_FLAGS if name in wanted]

    for extension in extensions:
        extension.optional = True  # setuptools then copies only the variants that were built

    class OptionalBuildExtension(BuildExtension):
        """Builds each variant; one that fails is left out (not copied, not installed) and the
        reason goes into the build report next to the variants that did build."""

        def run(self):
            self.report = {"skipped": None, "variants": {}}
            try:
                super().run()  # one variant after another: they share the ninja build folder
            except Exception as error:  # e.g. torch's compiler check, before any variant
                for ext in self.extensions:
                    self.report["variants"].setdefault(ext.name.split("_C_")[-1],
                                                       f"compile failed: {first_error_line(error)}")
                print(f"warning: kdkernels C++ kernel not built: {first_error_line(error)}",
                      file=sys.stderr)
            # editable installs read the package from the source tree, others from build_lib
            in_source = self.inplace or getattr(self, "editable_mode", False)
            if in_source:  # a variant that failed now must not leave an older build behind
                for ext in self.extensions:
                    if self.report["variants"].get(ext.name.split("_C_")[-1]) != "built":
                        stale = os.path.join(HERE, "kdkernels",
                                             os.path.basename(self.get_ext_filename(ext.name)))
                        if os.path.exists(stale):
                            os.remove(stale)
            write_report(os.path.join(HERE, "kdkernels") if in_source else
                         os.path.join(self.build_lib, "kdkernels"), self.report)

        def build_extension(self, ext):
            name = ext.name.split("_C_")[-1]
            with tempfile.TemporaryFile() as log:  # the compiler writes to fd 1: keep a copy
                sys.stdout.flush()
                saved = os.dup(1)
                os.dup2(log.fileno(), 1)
                try:
                    super().build_extension(ext)
                    error = None
                except Exception as failure:  # no compiler, unsupported flags: install without it
                    error = failure
                finally:
                    sys.stdout.flush()
                    os.dup2(saved, 1)
                    os.close(saved)
                log.seek(0)
                output = log.read().decode(errors="replace")
            sys.stdout.write(output)
            if error is None:
                self.report["variants"][name] = "built"
            else:
                error.output = output
                self.report["variants"][name] = f"compile failed: {first_error_line(error)}"
                print(f"warning: kdkernels C++ kernel, {name} variant, not built:\n"
                      + "".join(traceback.format_exception_only(type(error), error)),
                      file=sys.stderr)

        def _get_output_mapping(self):  # editable installs: map only what was built
            for built, target in super()._get_output_mapping():
                if os.path.exists(built):
                    yield built, target

        def get_outputs(self):
            return [path for path in super().get_outputs() if os.path.exists(path)]

    return extensions, {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions_and_cmdclass()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
