"""Peak tensor memory of CPU code, counted the way the CUDA caching allocator's ``max_memory_allocated``
counts it (bytes of live storages), so the memory estimator can be checked without a GPU (no tests here)."""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    """While active, every storage an op returns is counted until it is freed; ``peak`` is the most bytes
    alive at once (storages registered with ``add`` included)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = self.peak = 0

    def add(self, t) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        storage = t.untyped_storage()
        key, n = storage.data_ptr(), storage.nbytes()
        if n == 0 or key in self.live:
            return
        self.live[key] = n
        self.current += n
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._drop, key)

    def _drop(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            self.add(t)
        return out


def tracked_peak(run, steps: int = 2) -> int:
    """Peak bytes over ``steps`` steps of a ``SyntheticRun`` after its first (the optimizer state exists from
    then on): parameters, optimizer state, and everything the steps allocate."""
    run.one_step()
    tracker = LiveBytes()
    for p in run.engine.model.parameters():
        tracker.add(p)
    for state in run.engine.optimizer.state.values():
        for v in state.values():
            tracker.add(v)
    tracker.peak = tracker.current
    with tracker:
        for _ in range(steps):
            run.one_step()
    return tracker.peak
