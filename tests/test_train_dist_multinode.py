"""Two "nodes" on one host: two torchrun launches (--nnodes 2 --nproc_per_node 1, c10d rendezvous on
127.0.0.1) of the real `lmforge train`; both exit 0, the run checkpoints and matches one process."""

from __future__ import annotations


import pytest
import torch

from tests.helpers.ranks import free_port
from tests.helpers.dist_runs import finish, losses, popen, run_cfg, weights
from tests.helpers.runs import pack_tiny

from lmforge.config import save_config

pytestmark = pytest.mark.multiprocess


def test_two_node_rendezvous_trains_and_checkpoints(tmp_path):
    from lmforge import checkpoint as ckpt
    from lmforge.training.trainer import train

    data = pack_tiny(tmp_path / "data")
    cfg = run_cfg(tmp_path / "run", data, {"strategy": "zero2"}, 1, dp=2, checkpoint={"every_steps": 3})
    save_config(cfg, tmp_path / "cfg.yaml")
    port = free_port()
    procs = []
    for node in (0, 1):
        log = tmp_path / f"node{node}.txt"
        args = ["-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",
                f"--rdzv_endpoint=127.0.0.1:{port}", f"--rdzv_id=lmforge-test-{port}", "--max_restarts=0",
                "-m", "lmforge", "train", "--config", str(tmp_path / "cfg.yaml")]
        procs.append((popen(args, log), log))
    codes = [finish(p, 180, log) for p, log in procs]
    assert codes == [0, 0], "\n".join(log.read_text()[-2000:] for _, log in procs)
    run = tmp_path / "run"
    assert [p.name for p in ckpt.complete_folders(run)] == ["step_0000003", "step_0000005"]
    man = ckpt.read_manifest(ckpt.newest_valid(run))
    assert man["world_size"] == 2 and man["dims"]["dp_shard"] == 2
    ref = tmp_path / "ref"
    train(run_cfg(ref, data))
    assert list(losses(run).values()) == pytest.approx(list(losses(ref).values()), rel=1e-5)
    for k, v in weights(ref).items():
        torch.testing.assert_close(weights(run)[k], v, rtol=1e-4, atol=2e-5)
