"""One rank started by a real launcher (``mpirun -np 2 python tests/launch_worker.py OUT``), no tests here.

It joins the job through ``lmforge.distributed.mesh.init_distributed`` (which discovers rank, world size and
master address/port from the launcher's variables), all-reduces its rank over gloo and writes what it saw to
``OUT/rank_<rank>.json``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from lmforge.config import build_config
from lmforge.distributed.launch_env import discover
from lmforge.distributed.mesh import destroy_distributed, init_distributed


def main(out: Path) -> None:
    torch.set_num_threads(1)
    launch = discover()
    cfg = build_config({"training": {"device": "cpu"}, "distributed": {"strategy": "ddp", "timeout_s": 60}})
    pdims = init_distributed(cfg, heartbeat_interval_s=0.5)
    t = torch.tensor([float(pdims.rank + 1)])
    dist.all_reduce(t)
    rec = {"launch": launch.to_dict(), "rank": pdims.rank, "world": pdims.world_size, "sum": t.item(),
           "backend": dist.get_backend(), "env": {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                                "MASTER_ADDR", "MASTER_PORT")}}
    destroy_distributed()
    (out / f"rank_{rec['rank']}.json").write_text(json.dumps(rec))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
