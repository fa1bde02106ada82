"""Where a process sits in a job, from its launcher's environment: torchrun, Open MPI, MPICH / Intel MPI
(PMI), or Slurm's srun. ``discover() -> LaunchEnv``; ``LaunchEnv.export()`` writes torchrun's variables so
``init_process_group(init_method="env://")``, DeepSpeed and every ``os.environ["RANK"]`` reader agree.

Precedence (first match wins):
  torchrun   RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT
  openmpi    OMPI_COMM_WORLD_RANK / _SIZE / _LOCAL_RANK / _LOCAL_SIZE
  pmi        PMI_RANK, PMI_SIZE, MPI_LOCALRANKID / PMI_LOCAL_RANK, MPI_LOCALNRANKS / PMI_LOCAL_SIZE
             (MPICH and Intel MPI's Hydra, srun --mpi=pmi2)
  slurm      SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID, SLURM_STEP_TASKS_PER_NODE, SLURM_NODEID
             (srun sets these for each task of a step; SLURM_NTASKS is the allocation's count and is also
             set in the batch script itself, where only one process runs, so it never defines the world)
MPI goes before Slurm because ``mpirun`` inside an allocation leaves its daemons' Slurm variables behind.
MASTER_ADDR / MASTER_PORT given in the environment always win. Otherwise the address is 127.0.0.1 when every
rank is on this node, the first host of SLURM_STEP_NODELIST / SLURM_JOB_NODELIST under Slurm, and an error
naming MASTER_ADDR for a multi-node MPI job; the port is derived from the job's id (SLURM_JOB_ID + step,
Open MPI's job id, the PMIx namespace) into [20000, 60000), else an error naming MASTER_PORT.
A multi-rank world missing any variable it needs raises ``SetupError`` naming that variable.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import zlib
from dataclasses import asdict, dataclass
from typing import Mapping, MutableMapping, Optional

from lmforge.errors import SetupError

PORT_RANGE = (20000, 60000)


@dataclass(frozen=True)
class LaunchEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: Optional[str] = None
    master_port: Optional[int] = None
    source: str = "none"  # "none" | "torchrun" | "openmpi" | "pmi" | "slurm"

    def to_dict(self) -> dict:
        return asdict(self)

    def export(self, environ: Optional[MutableMapping[str, str]] = None) -> None:
        """Set torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT)
        in ``environ`` (default ``os.environ``) for a multi-rank world; values already there are kept."""
        env = os.environ if environ is None else environ
        if self.world_size == 1 and self.source == "none":
            return
        values = {"RANK": self.rank, "WORLD_SIZE": self.world_size, "LOCAL_RANK": self.local_rank,
                  "LOCAL_WORLD_SIZE": self.local_world_size, "MASTER_ADDR": self.master_addr,
                  "MASTER_PORT": self.master_port}
        for name, value in values.items():
            if value is not None and name not in env:
                env[name] = str(value)


def _int(env: Mapping[str, str], name: str, source: str) -> int:
    raw = env[name]
    try:
        return int(raw)
    except ValueError:
        raise SetupError(f"{source}: environment variable {name}={raw!r} is not an integer") from None


def _need(env: Mapping[str, str], name: str, source: str, why: str) -> int:
    if name not in env:
        raise SetupError(f"{source} launch detected but {name} is not set ({why})")
    return _int(env, name, source)


def _first(env: Mapping[str, str], *names: str) -> Optional[str]:
    return next((n for n in names if n in env), None)


def _port(env: Mapping[str, str], source: str, *job_vars: str) -> int:
    if "MASTER_PORT" in env:
        return _int(env, "MASTER_PORT", source)
    job = [env[v] for v in job_vars if v in env]
    if not job:
        raise SetupError(f"{source}: MASTER_PORT is not set and no job id to derive it from ({', '.join(job_vars)}); "
                         f"export MASTER_PORT (a free TCP port on rank 0's host) to every rank")
    lo, hi = PORT_RANGE
    return lo + zlib.crc32("|".join(job).encode()) % (hi - lo)


def _torchrun(env: Mapping[str, str]) -> LaunchEnv:
    src = "torchrun"
    if "WORLD_SIZE" not in env:
        raise SetupError(f"{src}: RANK is set but WORLD_SIZE is not")
    world = _int(env, "WORLD_SIZE", src)
    rank = _int(env, "RANK", src) if "RANK" in env else 0
    if "RANK" not in env and world > 1:
        raise SetupError(f"{src}: WORLD_SIZE={world} but RANK is not set")
    if world == 1:
        local = _int(env, "LOCAL_RANK", src) if "LOCAL_RANK" in env else 0
        return LaunchEnv(rank, 1, local, 1, env.get("MASTER_ADDR"), _int(env, "MASTER_PORT", src)
                         if "MASTER_PORT" in env else None, src)
    local = _need(env, "LOCAL_RANK", src, f"WORLD_SIZE={world}: which device this rank uses")
    local_world = _int(env, "LOCAL_WORLD_SIZE", src) if "LOCAL_WORLD_SIZE" in env else None
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in env:
            raise SetupError(f"{src}: WORLD_SIZE={world} but {name} is not set; launch with torchrun, or export "
                             f"MASTER_ADDR (rank 0's host) and MASTER_PORT to every rank")
    return LaunchEnv(rank, world, local, local_world or world, env["MASTER_ADDR"],
                     _int(env, "MASTER_PORT", src), src)


def _mpi(env: Mapping[str, str], src: str, rank_v: str, size_v: str, local_vs: tuple, local_size_vs: tuple,
         job_vars: tuple) -> LaunchEnv:
    rank = _int(env, rank_v, src)
    world = _need(env, size_v, src, f"{rank_v} is set")
    local_v, local_size_v = _first(env, *local_vs), _first(env, *local_size_vs)
    if world > 1 and local_v is None:
        raise SetupError(f"{src} launch detected but {local_vs[0]} is not set (which device this rank uses)")
    local = _int(env, local_v, src) if local_v else 0
    local_world = _int(env, local_size_v, src) if local_size_v else None
    if world == 1:
        return LaunchEnv(rank, 1, local, 1, env.get("MASTER_ADDR"), None, src)
    addr = env.get("MASTER_ADDR")
    if addr is None:
        if local_world != world:
            raise SetupError(f"{src}: {world} ranks over several nodes but MASTER_ADDR is not set; pass rank 0's "
                             f"host to every rank (mpirun -x MASTER_ADDR=<host> -x MASTER_PORT=<port> ...)")
        addr = "127.0.0.1"
    return LaunchEnv(rank, world, local, local_world or world, addr, _port(env, src, *job_vars), src)


def _slurm(env: Mapping[str, str]) -> LaunchEnv:
    src = "slurm"
    rank = _int(env, "SLURM_PROCID", src)
    world = _need(env, "SLURM_STEP_NUM_TASKS", src, "SLURM_PROCID is set")
    if world == 1:
        return LaunchEnv(rank, 1, 0, 1, env.get("MASTER_ADDR"), None, src)
    local = _need(env, "SLURM_LOCALID", src, "which device this rank uses")
    local_world = _tasks_on_node(env)
    addr = env.get("MASTER_ADDR")
    if addr is None:
        nodelist_v = _first(env, "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
        if nodelist_v is None:
            raise SetupError(f"slurm: {world} tasks but neither MASTER_ADDR nor SLURM_JOB_NODELIST is set")
        addr = first_host(env[nodelist_v])
    port = _port(env, src, "SLURM_JOB_ID", "SLURM_STEP_ID")
    return LaunchEnv(rank, world, local, local_world or world, addr, port, src)


def _tasks_on_node(env: Mapping[str, str]) -> Optional[int]:
    """Tasks on this node from SLURM_STEP_TASKS_PER_NODE / SLURM_TASKS_PER_NODE ("2(x3),1") and SLURM_NODEID."""
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if not spec:
        return None
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            return None
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    node = int(env.get("SLURM_NODEID", "0") or 0)
    return counts[node] if node < len(counts) else None


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compact host list → host names: ``node[01-03,07],gpu5`` → node01, node02, node03, node07, gpu5.
    Handles zero padding, several bracket groups per name (``r[1-2]n[1-2]``) and plain names."""
    hosts, depth, start = [], 0, 0
    parts = []
    for i, ch in enumerate(nodelist):  # split on commas outside brackets
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            parts.append(nodelist[start:i])
            start = i + 1
    parts.append(nodelist[start:])
    for part in (p.strip() for p in parts):
        if part:
            hosts += _expand_one(part)
    return hosts


def _expand_one(name: str) -> list[str]:
    m = re.search(r"\[([^\]]*)\]", name)
    if not m:
        return [name]
    head, tail = name[: m.start()], name[m.end():]
    out = []
    for rng in m.group(1).split(","):
        lo, _, hi = rng.partition("-")
        if not hi:
            out += [f"{head}{lo}{t}" for t in _expand_one(tail)]
            continue
        width = len(lo)
        for n in range(int(lo), int(hi) + 1):
            out += [f"{head}{n:0{width}d}{t}" for t in _expand_one(tail)]
    return out


def first_host(nodelist: str) -> str:
    """First host of a Slurm node list: ``scontrol show hostnames`` when available, else ``expand_nodelist``."""
    scontrol = shutil.which("scontrol")
    if scontrol:
        try:
            out = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True, text=True,
                                 timeout=10)
            if out.returncode == 0 and out.stdout.split():
                return out.stdout.split()[0]
        except (OSError, subprocess.SubprocessError):
            pass
    hosts = expand_nodelist(nodelist)
    if not hosts:
        raise SetupError(f"slurm: cannot read a host from SLURM_JOB_NODELIST={nodelist!r}; set MASTER_ADDR")
    return hosts[0]


def discover(environ: Optional[Mapping[str, str]] = None) -> LaunchEnv:
    """This process's place in the job (see the module docstring); a world of 1 when no launcher is found."""
    env = os.environ if environ is None else environ
    if "RANK" in env or "WORLD_SIZE" in env:
        return _torchrun(env)
    if "OMPI_COMM_WORLD_RANK" in env:
        return _mpi(env, "openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
                    ("OMPI_COMM_WORLD_LOCAL_RANK",), ("OMPI_COMM_WORLD_LOCAL_SIZE",),
                    ("OMPI_MCA_ess_base_jobid", "PMIX_NAMESPACE", "SLURM_JOB_ID"))
    if "PMI_RANK" in env:
        return _mpi(env, "pmi", "PMI_RANK", "PMI_SIZE", ("MPI_LOCALRANKID", "PMI_LOCAL_RANK"),
                    ("MPI_LOCALNRANKS", "PMI_LOCAL_SIZE"), ("PMI_KVSNAME", "PMIX_NAMESPACE", "SLURM_JOB_ID"))
    if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
        return _slurm(env)
    return LaunchEnv()
