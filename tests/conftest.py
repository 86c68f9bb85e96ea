"""Test set-up: the Triton interpreter on CPU-only machines (TRITON_INTERPRET must be set before
the triton kernels are decorated); and, with KDKERNELS_REQUIRE_INTEGRATIONS=1 (``make test``), a
test skipped because a library the integrations are tested against cannot be imported fails
instead, so that a run without them cannot pass for one with them."""
import os
import re

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import settings  # noqa: E402

settings.register_profile("kdkernels", deadline=None, print_blob=True)
settings.load_profile("kdkernels")

REQUIRED = ("trl", "transformers", "torchtune", "liger_kernel", "modelopt", "megatron",
            "datasets", "accelerate")
# pytest.importorskip's message: "could not import 'trl.experimental.gkd': ..."
_NOT_IMPORTED = re.compile(r"could not import '(%s)[.']" % "|".join(REQUIRED))


def _required():
    return os.environ.get("KDKERNELS_REQUIRE_INTEGRATIONS") == "1"


def _fail_if_required_missing(report, reason):
    """Turns importorskip's skip for a required library into a failure (a CUDA-only test
    skipped on a CPU stays skipped)."""
    if _required() and report.skipped and not hasattr(report, "wasxfail") \
            and _NOT_IMPORTED.search(reason):
        report.outcome = "failed"
        report.longrepr = ("KDKERNELS_REQUIRE_INTEGRATIONS=1, but "
                           + reason.removeprefix("Skipped: "))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    # importorskip's Skipped allows module level; a skipif mark's or pytest.skip()'s does not
    if call.excinfo is not None and call.excinfo.errisinstance(pytest.skip.Exception) \
            and call.excinfo.value.allow_module_level:
        _fail_if_required_missing(report, str(call.excinfo.value))
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    report = yield  # a module-level importorskip skips the whole module at collection
    if report.skipped:
        longrepr = report.longrepr
        _fail_if_required_missing(report, longrepr[2] if isinstance(longrepr, tuple)
                                  else str(longrepr))
    return report
