"""The install runs on any x86-64 CPU: every C++ variant this CPU can execute passes the backend
tests, and an install whose C++ build is switched off or fails still installs (editable too) and
falls back to pure torch, saying why."""
import json
import os
import shutil
import site
import subprocess
import sys

import pytest
import torch

import kdkernels
from kdkernels.ops import cpp_distill

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _runnable_variants():
    """Variants built into this install that this CPU can execute."""
    cpu = cpp_distill._runtime_capability()
    built = os.listdir(os.path.dirname(kdkernels.__file__))
    return [v for v in cpp_distill.VARIANTS[cpp_distill.VARIANTS.index(cpu):]
            if any(f.startswith(f"_C_{v}.") for f in built)]


def test_the_best_variant_for_this_cpu_was_built_and_loaded():
    assert cpp_distill._VARIANT == cpp_distill._runtime_capability(), kdkernels.backends()["cpp"]


@pytest.mark.parametrize("variant", _runnable_variants())
def test_every_cpu_variant_passes_the_backend_tests(variant, tmp_path):
    # a fresh inductor cache per setting: torch reuses kernels compiled for another
    # ATEN_CPU_CAPABILITY from a shared cache (wrong values or a crash)
    env = dict(os.environ, ATEN_CPU_CAPABILITY=variant,
               TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    probe = subprocess.run(
        [sys.executable, "-c", "import kdkernels; print(kdkernels.backends()['cpp'].reason)"],
        env=env, capture_output=True, text=True, cwd=ROOT)
    assert f"{variant} variant" in probe.stdout, probe.stdout + probe.stderr
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_backends.py",
         "tests/test_shard_entry_points.py", "-k",
         "cpp and (every_option or dtypes or strided or virtual or largest or masked or shard)"],
        env=env, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "failed" not in done.stdout


def _fresh_install(tmp_path, env_extra):
    """This source tree, copied, installed editable into a new environment that shares this
    one's packages (torch, pip); returns that environment's python."""
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.so", "_build_report.json", "__pycache__", "*.egg-info",
        ".hypothesis", "runs", "out", ".whl"))
    env_dir = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    python = env_dir / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(purelib, "parent_environment.pth"), "w") as handle:
        handle.write("\n".join(site.getsitepackages()) + "\n")
    env = dict(os.environ, **env_extra)
    env.pop("PYTHONPATH", None)
    done = subprocess.run([str(python), "-m", "pip", "install", "--no-build-isolation", "--no-deps",
                           "--no-index", "-e", str(source)],
                          env=env, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return python, source


CHECK = """
import torch, kdkernels
import kdkernels.functional as F
info = kdkernels.backends()['cpp']
assert not info.available
print(info.reason)
s, t = torch.randn(4, 9, dtype=torch.float64), torch.randn(4, 9, dtype=torch.float64)
y = torch.tensor([1, 2, 3, 4])
torch.testing.assert_close(F.kd_loss(s, t, y), F.kd_loss(s, t, y, backend='torch'))
print(kdkernels.__file__)
"""


@pytest.mark.slow
def test_install_with_the_extension_switched_off(tmp_path):
    python, source = _fresh_install(tmp_path, {"KDKERNELS_NO_EXTENSION": "1"})
    done = subprocess.run([str(python), "-c", CHECK], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "skipped at install: KDKERNELS_NO_EXTENSION" in done.stdout
    assert str(source) in done.stdout  # the fresh copy, not this tree


@pytest.mark.slow
def test_install_with_a_failing_compile(tmp_path):
    """A compiler that answers its version check but fails every compile."""
    compiler = tmp_path / "broken-c++"
    compiler.write_text('#!/bin/sh\ncase " $* " in *" -c "*) '
                        'echo "distill.cpp:1:1: error: simulated compiler failure" >&2; exit 1;; '
                        f'esac\nexec {shutil.which("g++") or "c++"} "$@"\n')
    compiler.chmod(0o755)
    python, _ = _fresh_install(tmp_path, {"CXX": str(compiler)})
    done = subprocess.run([str(python), "-c", CHECK], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "the build failed" in done.stdout and "simulated compiler failure" in done.stdout, \
        done.stdout


INTEGRATED = ("transformers", "trl", "torchtune", "torchao", "accelerate", "datasets",
              "liger_kernel", "modelopt", "megatron", "peft", "sklearn", "matplotlib")


def test_import_is_light():
    """``import kdkernels`` (its functional form and the integrations' modules too) imports none
    of the libraries kdkernels.integrations and the driver work with, on every machine; and,
    with no GPU and no interpreter, neither triton nor inductor."""
    code = ("import json, sys, kdkernels, kdkernels.functional, kdkernels.integrations.trl, "
            "kdkernels.integrations.hf, kdkernels.integrations.torchtune; "
            f"print(json.dumps(sorted(m for m in ('triton', 'torch._inductor') + {INTEGRATED!r} "
            "if m in sys.modules)))")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert not set(loaded) & set(INTEGRATED), loaded
    if torch.cuda.is_available():
        pytest.skip("the triton part only: a GPU machine imports the Triton kernels at once")
    assert loaded == [], loaded


def test_driver_without_scikit_learn_says_what_to_install(tmp_path):
    """A plain install has no scikit-learn (the extra kdkernels[train]): a message, exit 2."""
    code = ("import sys; sys.modules['sklearn'] = None; from kdkernels.train import cli; "
            f"sys.exit(cli.main(['--seeds', '1', '--epochs', '1', '--no-progress', '--out', "
            f"{str(tmp_path / 'run')!r}]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "kdkernels[train]" in done.stderr and "Traceback" not in done.stderr, done.stderr
