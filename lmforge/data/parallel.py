"""Ordered, memory-bounded map over worker processes (used by tokenizing and cleaning)."""

from __future__ import annotations

import os
from collections import deque
from typing import Callable, Iterable, Iterator


def ordered_map(fn: Callable, items: Iterable, num_workers: int, initializer: Callable, initargs: tuple,
                in_flight_per_worker: int = 2) -> Iterator:
    """Yield ``fn(item)`` in input order. num_workers <= 0: in this process (``initializer`` run here).

    At most ``in_flight_per_worker * num_workers`` items are queued, so memory stays flat however long
    ``items`` is. Workers are forked with TOKENIZERS_PARALLELISM=false (one thread each, no warnings).
    """
    if num_workers <= 0:
        initializer(*initargs)
        for item in items:
            yield fn(item)
        return
    import multiprocessing as mp

    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
        pool = ctx.Pool(num_workers, initializer=initializer, initargs=initargs)
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old
    try:
        pending: deque = deque()
        for item in items:
            pending.append(pool.apply_async(fn, (item,)))
            if len(pending) >= in_flight_per_worker * num_workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
    finally:
        pool.terminate()
        pool.join()
