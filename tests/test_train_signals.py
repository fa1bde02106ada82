"""Preemption: SIGTERM mid-run → the step finishes, a checkpoint is written, exit 0 with a resume hint;
``checkpoint.resume=auto`` then ends bitwise equal to an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers.runs import pack_tiny, tiny_cfg

from lmforge.config import save_config
from lmforge import checkpoint as ckpt
from lmforge.training.trainer import train

REPO = Path(__file__).resolve().parents[1]
RUNNER = "import sys; from lmforge.config import load_config; from lmforge.training.trainer import train; " \
         "train(load_config(sys.argv[1], sys.argv[2:]))"


def _last_step(run: Path) -> int:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [json.loads(line).get("step", 0) for line in lines if line.strip().endswith("}")]
    return max(steps, default=0)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_checkpoints_and_resume_is_bitwise(tmp_path, sig, monkeypatch):
    data = pack_tiny(tmp_path / "data")
    sections = dict(model={"dropout": 0.1}, training={"max_steps": 150, "eval_every": 0})
    cfg = tiny_cfg(tmp_path / "run", data, **sections, checkpoint={"every_steps": 0})
    save_config(cfg, tmp_path / "cfg.yaml")
    env = dict(os.environ, LMFORGE_PEAK_FLOPS="1e11", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", RUNNER, str(tmp_path / "cfg.yaml")], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while _last_step(tmp_path / "run") < 5 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    stopped = ckpt.newest_valid(tmp_path / "run")
    step = int(stopped.name.split("_")[1])
    assert 5 <= step < 150, out
    assert f"stopped by {signal.Signals(sig).name}" in out and "--resume auto" in out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stop_reason"] == f"signal_{signal.Signals(sig).name}"

    monkeypatch.setenv("LMFORGE_PEAK_FLOPS", "1e11")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # same as the subprocess: kernels may reduce in a thread-dependent order
    try:
        res = train(tiny_cfg(tmp_path / "run", data, **sections, checkpoint={"every_steps": 0, "resume": "auto"}))
        train(tiny_cfg(tmp_path / "ref", data, **sections, checkpoint={"every_steps": 0}))
    finally:
        torch.set_num_threads(threads)
    assert res["steps"] == 150 and res["resumed_from"] == str(stopped)
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "run" / "model.safetensors"))
    b = load_file(str(tmp_path / "ref" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
