"""Run guards: preemption signals, gradient-norm spike detection, early stopping."""

from __future__ import annotations

import math
import signal
import threading
from typing import Optional


class SignalCatcher:
    """While active, SIGTERM/SIGINT only set ``caught`` (the loop finishes its step, checkpoints and exits 0).
    A second SIGINT raises KeyboardInterrupt as usual. No-op outside the main thread."""

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.signals, self.caught, self._old = signals, None, {}

    def _handler(self, signum, frame):
        if self.caught and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.caught = signal.Signals(signum).name

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}
        return False


class SpikeDetector:
    """Flags a grad norm above ``factor`` x its running mean (EMA, after 10 samples); spikes are folded into
    the mean clipped to the threshold so one spike does not mask the next."""

    def __init__(self, factor: Optional[float], beta: float = 0.98, warmup: int = 10):
        self.factor, self.beta, self.warmup = factor, beta, warmup
        self.mean, self.n = 0.0, 0

    def update(self, norm: float) -> bool:
        if self.factor is None or not math.isfinite(norm):
            return False
        spike = self.n >= self.warmup and norm > self.factor * self.mean
        value = min(norm, self.factor * self.mean) if spike else norm
        self.mean = value if self.n == 0 else self.beta * self.mean + (1 - self.beta) * value
        self.n += 1
        return spike


class EarlyStopper:
    """Stop after ``patience`` evaluations whose ``metric`` did not improve on the best by ``min_delta``."""

    def __init__(self, metric: str, patience: int, min_delta: float = 0.0, mode: str = "min"):
        self.metric, self.patience, self.min_delta, self.mode = metric, patience, min_delta, mode
        self.best: Optional[float] = None
        self.bad = 0

    @classmethod
    def from_config(cls, tc) -> Optional["EarlyStopper"]:
        if not tc.early_stop_metric:
            return None
        return cls(tc.early_stop_metric, tc.early_stop_patience, tc.early_stop_min_delta, tc.early_stop_mode)

    def update(self, metrics: dict) -> bool:
        v = metrics.get(self.metric)
        if v is None:
            return False
        better = self.best is None or (v < self.best - self.min_delta if self.mode == "min"
                                       else v > self.best + self.min_delta)
        if better:
            self.best, self.bad = v, 0
        else:
            self.bad += 1
        return self.bad >= self.patience

    def describe(self) -> str:
        return (f"{self.metric} did not improve on {self.best:.4g} by more than {self.min_delta} for "
                f"{self.bad} evaluations")

    def state_dict(self) -> dict:
        return {"best": self.best, "bad": self.bad}

    def load_state_dict(self, st: dict) -> None:
        self.best, self.bad = st["best"], st["bad"]
