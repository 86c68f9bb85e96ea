"""tests/conftest.py with KDKERNELS_REQUIRE_INTEGRATIONS=1 (what ``make test`` sets): a skip
because trl, transformers, torchtune, liger_kernel, modelopt (...) cannot be imported fails the
run, at collection or in a test; other skips (CUDA-only tests, other modules) stay skips.
Checked in a child pytest on hand-made test files, the libraries hidden there."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODULE_SKIP = """
import sys
import pytest
sys.modules["trl"] = None  # not importable here
gkd = pytest.importorskip("trl.experimental.gkd")

def test_uses_trl():
    pass
"""

TEST_SKIPS = """
import sys
import pytest
for name in ("modelopt", "transformers", "liger_kernel", "torchtune"):
    sys.modules[name] = None

def test_modelopt_plugin():
    pytest.importorskip("modelopt.torch.distill.plugins.megatron")

@pytest.mark.parametrize("name", ["transformers", "liger_kernel.transformers", "torchtune"])
def test_library(name):
    pytest.importorskip(name)

def test_cuda_only():
    pytest.skip("needs CUDA")

@pytest.mark.skipif(True, reason="could not import 'trl' in a skipif reason is no importorskip")
def test_marked():
    pass

def test_other_module():
    pytest.importorskip("not_a_module_kdkernels_needs")
"""


def _pytest(tmp_path, source, required):
    (tmp_path / "test_case.py").write_text(source)
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "tests"))
    env.pop("KDKERNELS_REQUIRE_INTEGRATIONS", None)
    if required:
        env["KDKERNELS_REQUIRE_INTEGRATIONS"] = "1"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "conftest", "-p",
                           "no:cacheprovider", "test_case.py"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    return done.returncode, done.stdout + done.stderr


@pytest.mark.parametrize("required", [False, True])
def test_module_level_skip(tmp_path, required):
    rc, out = _pytest(tmp_path, MODULE_SKIP, required)
    if required:
        assert rc != 0 and "1 error" in out, out
        assert "KDKERNELS_REQUIRE_INTEGRATIONS=1, but could not import 'trl.experimental.gkd'" \
            in out, out
    else:  # 5: no test collected, the module skipped
        assert rc == 5 and "1 skipped" in out, out


@pytest.mark.parametrize("required", [False, True])
def test_test_level_skips(tmp_path, required):
    rc, out = _pytest(tmp_path, TEST_SKIPS, required)
    if required:
        assert rc == 1 and "4 failed, 3 skipped" in out, out
        for name in ("test_modelopt_plugin", "test_library[transformers]",
                     "test_library[liger_kernel.transformers]", "test_library[torchtune]"):
            assert f"FAILED test_case.py::{name}" in out, out
    else:
        assert rc == 0 and "7 skipped" in out, out
    for name in ("test_cuda_only", "test_marked", "test_other_module"):
        assert "SKIPPED" in out and name not in "".join(
            line for line in out.splitlines() if line.startswith("FAILED")), out
