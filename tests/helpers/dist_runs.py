"""Shared helpers for the multi-process trainer tests (no tests here): configs with one global batch for
every layout, metrics/weights readers, and a subprocess launcher with a hard timeout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.helpers.runs import tiny_cfg

from tests.helpers.paths import REPO
STEPS, GLOBAL_ROWS = 5, 4
UNTIED = {"preset": "tiny", "max_seq_len": 32, "tie_embeddings": False}


MODELS = {"tied": {}, "untied": UNTIED, "gpt2": {"arch": "gpt2", "preset": "tiny", "max_seq_len": 32},
          "bert": {"arch": "bert", "preset": "tiny", "max_seq_len": 32}}


def run_cfg(run_dir: Path, data_dir: Path, dist: dict | None = None, rows_per_micro: int = 2, tied=True,
            **sections):
    """SGD+momentum, clipping on, fp32; ``rows_per_micro`` × accum × dp = GLOBAL_ROWS rows per step. ``tied``:
    True / False (Llama with tied / untied embeddings) or a key of ``MODELS``."""
    dp = int(sections.pop("dp", 1))
    accum = GLOBAL_ROWS // (rows_per_micro * dp)
    training = {"max_steps": STEPS, "micro_batch_size": rows_per_micro, "grad_accum_steps": accum,
                "eval_every": 0, "eval_batches": 2, "grad_clip": 1.0, **sections.pop("training", {})}
    model = MODELS[{True: "tied", False: "untied"}.get(tied, tied)]
    extra = {"model": model} if model else {}
    return tiny_cfg(run_dir, data_dir, optimizer={"name": "sgd", "lr": 0.3, "momentum": 0.9, "weight_decay": 0.0},
                    training=training, checkpoint={"every_steps": 0, "keep_last": 3, **sections.pop("checkpoint", {})},
                    distributed=dist or {}, **extra, **sections)


def losses(run_dir: Path) -> dict[int, float]:
    recs = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(run_dir) / "model.safetensors"))


def env() -> dict:
    e = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT")}
    return dict(e, OMP_NUM_THREADS="1", LMFORGE_PEAK_FLOPS="1e11", PYTHONPATH=str(REPO))


def popen(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], cwd=REPO, env=env(), stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float, log: Path) -> int:
    """Exit code, killing the whole process group on timeout (a hang fails the test, never blocks it)."""
    import signal

    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        raise AssertionError(f"timed out after {timeout:.0f}s; log:\n{log.read_text()[-3000:]}") from None
