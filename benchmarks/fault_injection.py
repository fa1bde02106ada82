"""Fault injection: SIGKILL a training process at random points (some timed to land inside checkpoint writes),
resume each with ``checkpoint.resume=auto``, and check every resumed run ends bitwise equal to an uninterrupted
run (weights, optimizer state, scheduler, data-loader position).

    .venv/bin/python benchmarks/fault_injection.py --trials 20

Prints one line per trial and the count of bitwise-equal runs. Runs on CPU, one thread per process.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RUNNER = ("import sys; from lmforge.config import load_config; from lmforge.training.trainer import train; "
          "train(load_config(sys.argv[1], sys.argv[2:]))")
ENV = dict(os.environ, OMP_NUM_THREADS="1", LMFORGE_PEAK_FLOPS="1e11", PYTHONPATH=str(REPO))


def _start(cfg_path: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", RUNNER, str(cfg_path), *overrides], cwd=REPO, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _final(run: Path) -> dict:
    """Everything the run's newest valid checkpoint holds (any format), as full tensors by name."""
    from lmforge.checkpoint import read_state, resolve_source

    path = resolve_source(run)
    return {**read_state(path), "name": path.name}


def _equal(a: dict, b: dict) -> bool:
    import torch

    def same(x, y) -> bool:
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            return isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and torch.equal(x, y)
        return x == y

    tensors = [(a[p], b[p]) for p in ("model", "optim")]
    if a["name"] != b["name"] or any(x.keys() != y.keys() or not all(same(x[k], y[k]) for k in x) for x, y in tensors):
        return False
    return a["shared"]["scheduler"] == b["shared"]["scheduler"] and a["rank0"]["loader"] == b["rank0"]["loader"]


def _wait_started(proc: subprocess.Popen, run: Path, timeout: float = 120) -> None:
    t0 = time.time()
    while not (run / "metrics.jsonl").exists() and proc.poll() is None and time.time() - t0 < timeout:
        time.sleep(0.005)


def _kill_during_save(proc: subprocess.Popen, ckpt_root: Path, skip: int, timeout: float = 60) -> str:
    """SIGKILL as soon as the ``skip``-th new temporary checkpoint folder is seen."""
    seen: set[str] = set()
    t0 = time.time()
    while proc.poll() is None and time.time() - t0 < timeout:
        if ckpt_root.is_dir():
            for p in ckpt_root.iterdir():
                if ".tmp-" in p.name and p.name not in seen:
                    seen.add(p.name)
                    if len(seen) > skip:
                        proc.send_signal(signal.SIGKILL)
                        return f"during save of {p.name.split('.')[0]}"
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    return "at timeout"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args()

    from lmforge.config import save_config
    from tests.helpers.runs import pack_tiny, tiny_cfg

    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="lmforge-faults-"))
    data = pack_tiny(work / "data")
    sections = dict(model={"dropout": 0.1}, training={"max_steps": args.steps, "eval_every": 10},
                    checkpoint={"every_steps": 1, "keep_last": 2})

    def cfg_file(name: str) -> Path:
        cfg = tiny_cfg(work / name, data, **sections)
        path = work / f"{name}.yaml"
        save_config(cfg, path)
        return path

    ref = _start(cfg_file("ref"))
    _wait_started(ref, work / "ref")
    t0 = time.time()
    if ref.wait() != 0:
        print(ref.stderr.read())
        return 1
    ref_time = time.time() - t0
    reference = _final(work / "ref")
    print(f"reference run: {args.steps} steps in {ref_time:.1f}s after the first logged step")

    ok = 0
    for t in range(args.trials):
        name = f"trial{t:02d}"
        path = cfg_file(name)
        proc = _start(path)
        if t % 2 == 0:  # half the kills land inside a checkpoint write
            where = _kill_during_save(proc, work / name / "checkpoints", skip=rng.randrange(args.steps - 1))
        else:
            _wait_started(proc, work / name)
            delay = rng.uniform(0.0, ref_time)
            time.sleep(delay)
            where = f"{delay:.2f}s after step 1"
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        leftovers = sorted(p.name for p in (work / name / "checkpoints").glob("*")) \
            if (work / name / "checkpoints").is_dir() else []
        resumed = _start(path, "--checkpoint.resume=auto")
        if resumed.wait() != 0:
            print(f"{name}: killed {where}; resume FAILED:\n{resumed.stderr.read()[-2000:]}")
            continue
        same = _equal(_final(work / name), reference)
        ok += same
        print(f"{name}: killed {where:<32} left {leftovers} -> resumed run {'bitwise equal' if same else 'DIFFERS'}")
        if not args.keep:
            shutil.rmtree(work / name, ignore_errors=True)
    print(f"\n{ok}/{args.trials} killed-and-resumed runs ended bitwise equal to the uninterrupted run")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok == args.trials else 1


if __name__ == "__main__":
    sys.exit(main())
