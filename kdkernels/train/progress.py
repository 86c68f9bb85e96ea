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
    def __init__(self, desc, total, done=0, how="lines", interval=5.0, stream=None,
                 unit="epoch", metric=("test top-1", lambda v: f"{100 * v:.2f}%")):
        self.desc, self.total, self.how, self.interval = desc, total, how, interval
        self.unit, self.metric = unit, metric  # metric: (name, format of its value)
        self.stream = sys.stdout if stream is None else stream
        self.started = self.last_line = time.monotonic()
        self.bar = None
        if how == "bar":  # disable=None: tqdm turns itself off where stderr is not a terminal
            self.bar = tqdm(total=total, initial=done, desc=desc, leave=False, disable=None)

    def epoch(self, done, value, advanced=1):
        """Epoch (or step) `done` (1-based, `advanced` since the last call) finished with the
        metric at `value` (default: test accuracy, a fraction)."""
        name, fmt = self.metric
        if self.bar is not None:
            self.bar.update(advanced)
            self.bar.set_postfix({name.replace(" ", "_"): fmt(value)})
        now = time.monotonic()
        if self.how == "lines" and (done == self.total or now - self.last_line >= self.interval):
            self.last_line = now
            print(f"kdkernels-train: {self.desc}: {self.unit} {done}/{self.total}, {name} "
                  f"{fmt(value)}, {now - self.started:.1f} s", file=self.stream, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
