"""Multi-process test harness: spawn ``world_size`` gloo ranks on 127.0.0.1 with a hard timeout.

``run_ranks(fn, world_size, tmp_path, timeout_s, *args)`` starts ``fn(rank, world_size, out_dir, *args)`` in
fresh processes with the torchrun environment set (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).
Each rank returns a picklable result, collected into a list. A rank that raises, exits non-zero or
outlives the timeout fails the test (everything left is killed first).
"""

from __future__ import annotations

import os
import pickle
import socket
import time
import traceback
from pathlib import Path

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank, world_size, port, out_dir, args, env):
    os.environ.update(env)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch

    torch.set_num_threads(1)
    out = Path(out_dir)
    try:
        result = fn(rank, world_size, out, *args)
    except BaseException:
        (out / f"error_{rank}.txt").write_text(traceback.format_exc())
        raise
    with open(out / f"result_{rank}.pkl", "wb") as f:
        pickle.dump(result, f)


def spawn_ranks(fn, world_size: int, out_dir: Path, *args, env: dict | None = None):
    """Start the ranks; returns the processes (for tests that kill one)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world_size, port, str(out_dir), args, env or {}),
                         daemon=False) for r in range(world_size)]
    for p in procs:
        p.start()
    return procs


def wait_ranks(procs, timeout_s: float) -> tuple[list[int | None], float]:
    """Join with a deadline; kill anything still alive. Returns (exit codes, seconds waited)."""
    t0 = time.monotonic()
    for p in procs:
        p.join(max(0.0, timeout_s - (time.monotonic() - t0)))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5)
    return [p.exitcode for p in procs], time.monotonic() - t0


def run_ranks(fn, world_size: int, out_dir: Path, timeout_s: float, *args, env: dict | None = None) -> list:
    procs = spawn_ranks(fn, world_size, out_dir, *args, env=env)
    codes, waited = wait_ranks(procs, timeout_s)
    errors = [f"--- rank {r} ---\n{(out_dir / f'error_{r}.txt').read_text()}"
              for r in range(world_size) if (out_dir / f"error_{r}.txt").exists()]
    if any(c != 0 for c in codes):
        hung = waited >= timeout_s
        raise AssertionError(f"ranks exited with {codes}{' (timed out after %.0fs)' % timeout_s if hung else ''}\n"
                             + "\n".join(errors))
    results = []
    for r in range(world_size):
        with open(out_dir / f"result_{r}.pkl", "rb") as f:
            results.append(pickle.load(f))
    return results
