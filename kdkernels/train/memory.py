"""Peak memory of one step above its inputs, on the CPU: the resident high-water mark of this
process, reset just before the step (Linux /proc). Run it in a child process started with
MEASURING_ENV: glibc then maps every large block on allocation and returns it on free, so the
high-water mark sees the step's own temporaries rather than reused free memory. The benchmarks
(benchmarks/measure.py, benchmarks/lm.py) and the training driver's loss-step figures use it."""
import gc
import re

MEASURING_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}


def _status_kib(field):
    with open("/proc/self/status") as handle:
        return int(re.search(rf"{field}:\s+(\d+)", handle.read()).group(1))


def rss_kib():
    return _status_kib("VmRSS")


def hwm_kib():
    return _status_kib("VmHWM")


def peak_above_inputs_mib(step, reset=lambda: None):
    """MiB by which `step()` raises the resident set above what is resident before it (its
    inputs, and whatever else is alive). Runs `step` once to warm up (compilation, caches, lazy
    allocations), then `reset()` (e.g. drops the gradients, which the measured step then makes
    again), then `step` once measured, then `reset()`."""
    step()
    reset()
    gc.collect()
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # resets the high-water mark to the current resident set
    base = rss_kib()
    step()
    peak = (hwm_kib() - base) / 1024
    reset()
    return peak
