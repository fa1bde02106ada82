"""Two "nodes" on one machine: two independent ``torchrun --nnodes 2 --nproc_per_node 1`` launches meet through
a c10d rendezvous, train zero3 (tests/dist_train.py loop) and write an lmforge.distributed checkpoint.

The test checks both launches exit 0 (a hang fails after a deadline, both process groups killed) and that the
checkpoint is complete and holds exactly the trained weights. Run as a script (``--worker OUT``) this file is
the per-rank training program.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
STEPS = 3
DEADLINE_S = 90


def worker(out: Path) -> None:
    sys.path.insert(0, str(HERE))
    from dist_train import build, full_params, make_cfg, train_steps

    from lmforge.distributed import destroy_distributed, init_distributed
    from lmforge.distributed.checkpoint import save_checkpoint

    torch.set_num_threads(1)
    cfg = make_cfg(strategy="zero3", timeout_s=60)
    pdims = init_distributed(cfg)
    assert pdims.dp == 2, f"expected 2 ranks from the rendezvous, got {pdims.dp}"
    model, opt = build(cfg, pdims)
    res = train_steps(model, opt, pdims, cfg, 0, STEPS)
    save_checkpoint(out / "checkpoints", STEPS, model, opt, pdims=pdims, loader_state={"rank": pdims.rank})
    params = full_params(model)
    if pdims.is_rank0:
        torch.save({"params": params, "losses": res["losses"]}, out / "final.pt")
    destroy_distributed()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_node_rendezvous_trains_and_checkpoints(tmp_path):
    port = _free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
           "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", f"twonode{port}",
           "--max_restarts", "0", str(Path(__file__).resolve()), "--worker", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)])}
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True) for _ in range(2)]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=DEADLINE_S)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        tails = [(p.communicate()[0] or "")[-2000:] for p in procs]
        pytest.fail(f"two-node run hung for {DEADLINE_S}s; killed. Output tails:\n" + "\n---\n".join(tails))
    codes = [p.returncode for p in procs]
    assert codes == [0, 0], "\n---\n".join(o[-3000:] for o in outputs)

    from lmforge.distributed.checkpoint import MARKER, find_latest, load_checkpoint

    ckpt = find_latest(tmp_path / "checkpoints")
    assert ckpt is not None and ckpt.name == f"step_{STEPS:07d}" and (ckpt / MARKER).is_file()
    assert sorted(p.name for p in ckpt.glob("rank_*.pt")) == ["rank_00000.pt", "rank_00001.pt"]
    sys.path.insert(0, str(HERE))
    from dist_train import make_cfg

    from lmforge.models import build_model

    model = build_model(make_cfg().model, seed=123)  # different init: everything must come from the checkpoint
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*single process")
        state = load_checkpoint(ckpt, model)
    assert state["step"] == STEPS
    final = torch.load(tmp_path / "final.pt")
    loaded = model.state_dict()
    assert final["params"] and set(final["params"]) <= set(loaded)
    for name, value in final["params"].items():
        torch.testing.assert_close(loaded[name], value, rtol=0, atol=0, msg=name)
    assert final["losses"][-1] < final["losses"][0]


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker(Path(sys.argv[2]))
    else:
        sys.exit("usage: test_dist_deepspeed_multinode.py --worker OUT_DIR (launched by the test under torchrun)")
