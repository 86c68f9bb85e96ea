"""Progress of one model's training: a tqdm bar when stdout is a terminal, otherwise plain log
lines on stdout (so `make train > log` shows progress): one when a model finishes and one at most
every `interval` seconds while it trains."""
import sys
import time

from tqdm import tqdm


def mode(enabled, rank=0, stream=None):
    """'off' (disabled, or not rank 0), 'bar' (stdout is a terminal) or 'lines'."""
    if not enabled or rank != 0:
        return "off"
    stream = sys.stdout if stream is None else stream
    return "bar" if stream.isatty() else "lines"


class Progress:
    def __init__(self, desc, total, done=0, how="lines", interval=5.0, stream=None):
        self.desc, self.total, self.how, self.interval = desc, total, how, interval
        self.stream = sys.stdout if stream is None else stream
        self.started = self.last_line = time.monotonic()
        self.bar = None
        if how == "bar":  # disable=None: tqdm turns itself off where stderr is not a terminal
            self.bar = tqdm(total=total, initial=done, desc=desc, leave=False, disable=None)

    def epoch(self, done, test_acc):
        """Epoch `done` (1-based) finished with test accuracy `test_acc` (a fraction)."""
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(test_acc=f"{test_acc:.4f}")
        now = time.monotonic()
        if self.how == "lines" and (done == self.total or now - self.last_line >= self.interval):
            self.last_line = now
            print(f"kdkernels-train: {self.desc}: epoch {done}/{self.total}, test top-1 "
                  f"{100 * test_acc:.2f}%, {now - self.started:.1f} s", file=self.stream,
                  flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
