"""Process groups and the named device mesh.

``init_distributed(cfg)`` reads the launcher's environment (torchrun's RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/
PORT, else Open MPI / MPICH / PMI / Slurm variables: ``launch_env.discover``),
creates the default process group (gloo on CPU, nccl on CUDA) with a bounded timeout, starts a heartbeat
watchdog that names a rank that stopped responding, and returns a ``ParallelDims``. Without a launcher it
returns a world-size-1 ``ParallelDims`` and creates no process group.

Mesh dims, outermost first: "pp", "dp_replicate", "dp_shard", "tp"; "dp" is dp_replicate×dp_shard flattened
(data loading, loss reduction, DDP). Everyone asks ``pdims.mesh(name)`` for sub-meshes.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from lmforge.config import ConfigError, DistributedConfig
from lmforge.distributed.launch_env import discover

DIM_NAMES = ("pp", "dp_replicate", "dp_shard", "tp")


@dataclass
class ParallelDims:
    """Validated parallel degrees plus (when world_size > 1) the named ``DeviceMesh``."""

    dp_replicate: int
    dp_shard: int
    tp: int
    pp: int
    world_size: int
    strategy: str = "zero3"
    rank: int = 0
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    world_mesh: Optional[object] = None  # DeviceMesh when built
    host_group: Optional[object] = None  # a gloo group for host-side agreements (None: the default group)

    @classmethod
    def from_config(cls, dcfg: DistributedConfig, world_size: int, rank: int = 0, local_rank: int = 0,
                    device: torch.device | str = "cpu") -> "ParallelDims":
        """Resolve one -1 degree and check the product equals ``world_size``; errors show the arithmetic."""
        degrees = {"dp_replicate": dcfg.dp_replicate, "dp_shard": dcfg.dp_shard, "tp": dcfg.tp, "pp": dcfg.pp}
        unknown = [k for k, v in degrees.items() if v == -1]
        if len(unknown) > 1:
            raise ConfigError("only one of distributed.{dp_replicate,dp_shard,tp,pp} may be -1; got -1 for "
                              + ", ".join(f"distributed.{k}" for k in unknown))
        known = 1
        for k, v in degrees.items():
            if v != -1:
                known *= v
        shown = " × ".join(f"{k}={v}" for k, v in degrees.items())
        if unknown:
            if world_size % known:
                raise ConfigError(f"cannot infer distributed.{unknown[0]}: world size {world_size} is not divisible "
                                  f"by the product of the other degrees ({shown.replace('-1', '?')} → {known})")
            degrees[unknown[0]] = world_size // known
        elif known != world_size:
            raise ConfigError(f"distributed degrees do not match the world size: {shown} = {known}, but "
                              f"WORLD_SIZE={world_size} (set one of them to -1 to infer it)")
        if dcfg.strategy in ("ddp", "zero1") and dcfg.cpu_offload:
            raise ConfigError(f"distributed.cpu_offload=true needs distributed.strategy zero2 or zero3 "
                              f"(got {dcfg.strategy})")
        if dcfg.strategy == "zero2" and dcfg.reshard_after_forward:
            raise ConfigError("distributed.reshard_after_forward=true contradicts distributed.strategy=zero2 "
                              "(zero2 keeps parameters gathered until backward); use zero3")
        return cls(world_size=world_size, strategy=dcfg.strategy, rank=rank, local_rank=local_rank,
                   device=torch.device(device), **degrees)

    # ----- degrees -----
    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_rank0(self) -> bool:
        """Rank-0-only logging flag."""
        return self.rank == 0

    @property
    def fsdp_enabled(self) -> bool:
        return self.strategy in ("zero2", "zero3") and self.dp > 1

    @property
    def coords(self) -> dict[str, int]:
        """This rank's coordinate along each mesh dim (row-major over DIM_NAMES)."""
        out, r = {}, self.rank
        for name in reversed(DIM_NAMES):
            size = getattr(self, name)
            out[name] = r % size
            r //= size
        return out

    @property
    def dp_rank(self) -> int:
        c = self.coords
        return c["dp_replicate"] * self.dp_shard + c["dp_shard"]

    @property
    def pp_rank(self) -> int:
        return self.coords["pp"]

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    # ----- mesh -----
    def build_mesh(self) -> None:
        """Create the world ``DeviceMesh`` (all ranks must call this together) and the flattened "dp" dim."""
        from torch.distributed.device_mesh import init_device_mesh

        shape = tuple(getattr(self, n) for n in DIM_NAMES)
        self.world_mesh = init_device_mesh(self.device.type, shape, mesh_dim_names=DIM_NAMES)
        self.world_mesh["dp_replicate", "dp_shard"]._flatten("dp")

    def mesh(self, name: str | tuple[str, ...]):
        """Sub-mesh by name, e.g. ``"tp"``, ``"dp"``, ``("dp_replicate", "dp_shard")``."""
        if self.world_mesh is None:
            raise RuntimeError("ParallelDims.mesh() needs build_mesh() (world size > 1)")
        return self.world_mesh[name]

    def group(self, name: str):
        """Process group of a 1-D mesh dim, or None when single-process (cached: called every step)."""
        if self.world_mesh is None:
            return None
        cache = self.__dict__.setdefault("_groups", {})
        if name not in cache:
            cache[name] = self.world_mesh[name].get_group()
        return cache[name]


# ---------------------------------------------------------------------------------------------
# Process-group setup
# ---------------------------------------------------------------------------------------------

_WATCHDOG: Optional["_Heartbeat"] = None
_OWN_GROUP = False  # True when init_distributed created the default process group (and so destroys it)


class _Heartbeat:
    """Each rank bumps a counter in the store; a rank whose counter stops moving for ``timeout_s`` is named
    on stderr and the process exits non-zero, so a dead peer fails the job in bounded time."""

    def __init__(self, store, rank: int, world_size: int, timeout_s: float, interval_s: float):
        self.store, self.rank, self.world = store, rank, world_size
        self.timeout_s, self.interval_s = timeout_s, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lmforge-heartbeat", daemon=True)

    def start(self) -> None:
        self.store.set(f"lmforge/hb/{self.rank}", "0")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        try:
            self.store.set(f"lmforge/hb/{self.rank}", "done")
        except Exception:
            pass

    def _run(self) -> None:
        last_seen = {r: (None, time.monotonic()) for r in range(self.world) if r != self.rank}
        beat = 0
        while not self._stop.wait(self.interval_s):
            beat += 1
            try:
                self.store.set(f"lmforge/hb/{self.rank}", str(beat))
                for r in list(last_seen):
                    key = f"lmforge/hb/{r}"
                    val = self.store.get(key).decode() if self.store.check([key]) else None
                    if val == "done":
                        del last_seen[r]
                        continue
                    prev, t = last_seen[r]
                    now = time.monotonic()
                    if val != prev:
                        last_seen[r] = (val, now)
                    elif now - t > self.timeout_s:
                        self._die(f"rank {r} sent no heartbeat for {now - t:.0f}s (> distributed.timeout_s="
                                  f"{self.timeout_s:g}); it has probably died. Aborting rank {self.rank}.")
            except Exception as e:  # the store lives on rank 0: losing it means rank 0 is gone
                if self._stop.is_set():
                    return
                self._die(f"lost the rendezvous store hosted by rank 0 ({type(e).__name__}: {e}); "
                          f"rank 0 has probably died. Aborting rank {self.rank}.")

    def _die(self, msg: str) -> None:
        print(f"[lmforge.distributed] ERROR: {msg}", file=sys.stderr, flush=True)
        os._exit(3)


def init_distributed(cfg, heartbeat_interval_s: float = 1.0) -> ParallelDims:
    """Start (or skip, for world size 1) the process group and build the mesh. ``cfg``: a ``Config``."""
    global _WATCHDOG
    dcfg: DistributedConfig = cfg.distributed
    launch = discover()  # torchrun, Open MPI, MPICH/PMI or Slurm variables; SetupError names a missing one
    launch.export()  # torchrun's names (MASTER_ADDR/PORT for env://) for everything that reads them
    world, rank, local_rank = launch.world_size, launch.rank, launch.local_rank
    want = cfg.training.device
    use_cuda = torch.cuda.is_available() and want in ("auto", "cuda")
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("training.device=cuda but CUDA is not available")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    pdims = ParallelDims.from_config(dcfg, world, rank, local_rank, device)
    if world == 1:
        return pdims
    backend = dcfg.backend if dcfg.backend != "auto" else ("nccl" if use_cuda else "gloo")
    if backend == "nccl" and not use_cuda:
        raise ConfigError("distributed.backend=nccl needs CUDA; use gloo (or auto) on CPU")
    global _OWN_GROUP
    if not dist.is_initialized():
        _OWN_GROUP = True
        dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                timeout=timedelta(seconds=dcfg.timeout_s))
    pdims.build_mesh()
    if dist.get_backend() != "gloo":  # counts and flags agreed on the host never touch the device stream
        pdims.host_group = dist.new_group(backend="gloo")
    store = dist.distributed_c10d._get_default_store()
    _WATCHDOG = _Heartbeat(store, rank, world, dcfg.timeout_s, heartbeat_interval_s)
    _WATCHDOG.start()
    return pdims


def destroy_distributed(abort: bool = False) -> None:
    """Stop the heartbeat and tear down the process group if ``init_distributed`` created it (call at the end
    of every run). ``abort`` (a rank failing): no barriers, and the heartbeat just stops, so peers' watchdogs
    (or torchrun) end the job."""
    global _WATCHDOG, _OWN_GROUP
    if abort:
        if _WATCHDOG is not None:
            _WATCHDOG._stop.set()
            _WATCHDOG = None
        if dist.is_initialized() and _OWN_GROUP:
            dist.destroy_process_group()
            _OWN_GROUP = False
        return
    if dist.is_initialized():
        dist.barrier()  # everyone is done: peers going quiet from here on is not a failure
    if _WATCHDOG is not None:
        _WATCHDOG.stop()
        _WATCHDOG = None
    if dist.is_initialized():
        dist.barrier()  # every watchdog stopped before rank 0's store goes away
        if _OWN_GROUP:
            dist.destroy_process_group()
            _OWN_GROUP = False
