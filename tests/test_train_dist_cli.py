"""`lmforge train --nproc 2` end to end (torchrun subprocess, hard timeout), and a killed rank failing the job."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.helpers.dist_runs import finish, popen, run_cfg
from tests.helpers.runs import pack_tiny

from lmforge.config import save_config

pytestmark = pytest.mark.multiprocess


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return pack_tiny(tmp_path_factory.mktemp("data"))


def test_cli_nproc_two_trains_checkpoints_and_generates(tmp_path, data_dir):
    from lmforge import checkpoint as ckpt

    cfg = run_cfg(tmp_path / "run", data_dir, {"strategy": "zero3"}, 1, dp=2, checkpoint={"every_steps": 2})
    save_config(cfg, tmp_path / "cfg.yaml")
    log = tmp_path / "log.txt"
    proc = popen(["-m", "lmforge", "train", "--nproc", "2", "--config", str(tmp_path / "cfg.yaml")], log)
    assert finish(proc, 180, log) == 0, log.read_text()[-3000:]
    run = tmp_path / "run"
    names = [p.name for p in ckpt.complete_folders(run)]
    assert names == ["step_0000002", "step_0000004", "step_0000005"]
    man = ckpt.read_manifest(run / "checkpoints" / names[-1])
    assert man["format"] == "dcp" and man["world_size"] == 2 and man["strategy"] == "zero3"
    assert (run / "model.safetensors").is_file() and (run / "summary.json").is_file()
    assert "distributed: world 2" in log.read_text()
    from lmforge.inference import load_run

    model, _, _, used = load_run(run)
    assert used.name == "step_0000005"


def _worker_pids(root_pid: int) -> dict[int, int]:
    """RANK → pid of the torchrun workers descending from ``root_pid`` (via /proc)."""
    parent, env = {}, {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            parent[int(d.name)] = int(stat[stat.rindex(")") + 2:].split()[1])
            env[int(d.name)] = (d / "environ").read_bytes().decode(errors="ignore").split("\0")
        except (OSError, ValueError):
            continue

    def descends(pid: int) -> bool:
        while pid > 1:
            if pid == root_pid:
                return True
            pid = parent.get(pid, 0)
        return False

    out = {}
    for pid, kvs in env.items():
        ranks = [kv[5:] for kv in kvs if kv.startswith("RANK=")]
        if ranks and pid != root_pid and descends(pid):
            out[int(ranks[0])] = pid
    return out


def test_killed_rank_fails_the_job_quickly(tmp_path, data_dir):
    cfg = run_cfg(tmp_path / "run", data_dir, {"strategy": "ddp", "timeout_s": 10}, 1, dp=2,
                  training={"max_steps": 100000}, logging={"log_every": 1})
    save_config(cfg, tmp_path / "cfg.yaml")
    log = tmp_path / "log.txt"
    proc = popen(["-m", "lmforge", "train", "--nproc", "2", "--config", str(tmp_path / "cfg.yaml")], log)
    t0 = time.time()
    while not (tmp_path / "run" / "metrics.jsonl").exists() and time.time() - t0 < 120 and proc.poll() is None:
        time.sleep(0.2)
    pids = _worker_pids(proc.pid)
    assert 1 in pids, (pids, log.read_text()[-2000:])
    os.kill(pids[1], signal.SIGKILL)
    t_kill = time.time()
    code = finish(proc, 60, log)
    assert code != 0
    assert time.time() - t_kill < 45
