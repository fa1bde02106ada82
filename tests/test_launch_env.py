"""Launcher discovery (lmforge.distributed.launch_env): every launcher's variables simulated, torchrun's
precedence, partial environments failing with the missing variable named, Slurm node lists; and a real
``mpirun -np 2`` job over gloo (init_distributed, then ``lmforge train``) where Open MPI is installed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.distributed import launch_env
from lmforge.distributed.launch_env import LaunchEnv, discover, expand_nodelist, first_host
from lmforge.errors import SetupError

REPO = Path(__file__).resolve().parents[1]
from tests.helpers.dist_runs import finish, run_cfg
from tests.helpers.runs import pack_tiny

TORCHRUN = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "n0",
            "MASTER_PORT": "29500"}
OMPI = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "OMPI_MCA_ess_base_jobid": "1221525505"}
PMI = {"PMI_RANK": "5", "PMI_SIZE": "8", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "4", "PMI_KVSNAME": "kvs_77_0",
       "MASTER_ADDR": "head"}
SLURM = {"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
         "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "4242",
         "SLURM_STEP_ID": "0", "SLURM_NTASKS": "8"}


@pytest.fixture(autouse=True)
def no_scontrol(monkeypatch):
    """The node-list parser is tested, not a cluster's scontrol (none on CI anyway)."""
    monkeypatch.setattr(launch_env.shutil, "which", lambda name: None)


def test_no_launcher_is_a_world_of_one():
    assert discover({}) == LaunchEnv()
    assert discover({"SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_JOB_ID": "9"}) == LaunchEnv()  # a batch script


def test_torchrun():
    e = discover(TORCHRUN)
    assert e == LaunchEnv(3, 8, 1, 2, "n0", 29500, "torchrun")


def test_torchrun_takes_precedence_over_mpi_and_slurm():
    assert discover({**SLURM, **OMPI, **PMI, **TORCHRUN}).source == "torchrun"
    assert discover({**SLURM, **PMI, **OMPI}).source == "openmpi"
    assert discover({**SLURM, **PMI}).source == "pmi"


def test_open_mpi_on_one_node_derives_address_and_port():
    e = discover(OMPI)
    assert (e.rank, e.world_size, e.local_rank, e.local_world_size, e.master_addr, e.source) == (
        1, 2, 1, 2, "127.0.0.1", "openmpi")
    lo, hi = launch_env.PORT_RANGE
    assert lo <= e.master_port < hi
    assert discover({**OMPI, "OMPI_COMM_WORLD_RANK": "0"}).master_port == e.master_port  # same on every rank
    other_job = discover({**OMPI, "OMPI_MCA_ess_base_jobid": "1221525506"}).master_port
    assert other_job != e.master_port


def test_explicit_master_variables_win():
    e = discover({**OMPI, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234"})
    assert (e.master_addr, e.master_port) == ("10.0.0.1", 1234)


def test_mpich_intel_mpi_pmi():
    e = discover(PMI)
    assert e == LaunchEnv(5, 8, 1, 4, "head", e.master_port, "pmi") and e.master_port
    alt = {"PMI_RANK": "1", "PMI_SIZE": "2", "PMI_LOCAL_RANK": "1", "PMI_LOCAL_SIZE": "2", "PMIX_NAMESPACE": "x"}
    assert discover(alt).local_rank == 1 and discover(alt).master_addr == "127.0.0.1"


def test_slurm_srun():
    e = discover(SLURM)
    assert (e.rank, e.world_size, e.local_rank, e.local_world_size, e.master_addr, e.source) == (
        5, 8, 1, 4, "gpu07", "slurm")
    assert e.master_port == discover({**SLURM, "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}).master_port
    step1 = discover({**SLURM, "SLURM_STEP_ID": "1"}).master_port
    assert step1 != e.master_port  # two steps of one job get different ports
    uneven = discover({**SLURM, "SLURM_STEP_TASKS_PER_NODE": "5,3", "SLURM_NODEID": "1"})
    assert uneven.local_world_size == 3
    assert discover({**SLURM, "SLURM_STEP_NODELIST": "cpu[3-4]"}).master_addr == "cpu3"  # the step's nodes


def test_scontrol_is_asked_first_when_present(monkeypatch, tmp_path):
    fake = tmp_path / "scontrol"
    fake.write_text("#!/bin/sh\necho realhead01\necho realhead02\n")
    fake.chmod(0o755)
    monkeypatch.setattr(launch_env.shutil, "which", lambda name: str(fake) if name == "scontrol" else None)
    assert first_host("gpu[07-08]") == "realhead01"


@pytest.mark.parametrize("nodelist,hosts", [
    ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
    ("a1,b[2-3],c", ["a1", "b2", "b3", "c"]),
    ("r[1-2]n[08-09]", ["r1n08", "r1n09", "r2n08", "r2n09"]),
    ("gpu-[9-11]", ["gpu-9", "gpu-10", "gpu-11"]),
    ("single", ["single"]),
])
def test_nodelist_expansion(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("env,missing", [
    ({"RANK": "0"}, "WORLD_SIZE"),
    ({"WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "a", "MASTER_PORT": "1"}, "RANK"),
    ({k: v for k, v in TORCHRUN.items() if k != "MASTER_ADDR"}, "MASTER_ADDR"),
    ({k: v for k, v in TORCHRUN.items() if k != "MASTER_PORT"}, "MASTER_PORT"),
    ({k: v for k, v in TORCHRUN.items() if k != "LOCAL_RANK"}, "LOCAL_RANK"),
    ({"OMPI_COMM_WORLD_RANK": "0"}, "OMPI_COMM_WORLD_SIZE"),
    ({**OMPI, "OMPI_COMM_WORLD_LOCAL_SIZE": "1"}, "MASTER_ADDR"),  # two nodes, no address
    ({k: v for k, v in OMPI.items() if k != "OMPI_COMM_WORLD_LOCAL_RANK"}, "OMPI_COMM_WORLD_LOCAL_RANK"),
    ({k: v for k, v in OMPI.items() if k != "OMPI_MCA_ess_base_jobid"}, "MASTER_PORT"),
    ({"PMI_RANK": "0", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "2"}, "MASTER_ADDR"),
    ({k: v for k, v in SLURM.items() if k != "SLURM_LOCALID"}, "SLURM_LOCALID"),
    ({k: v for k, v in SLURM.items() if k != "SLURM_JOB_NODELIST"}, "SLURM_JOB_NODELIST"),
    ({**TORCHRUN, "RANK": "three"}, "RANK"),
])
def test_partial_discovery_names_the_missing_variable(env, missing):
    with pytest.raises(SetupError, match=missing):
        discover(env)


def test_export_writes_torchrun_names_and_keeps_existing_ones():
    env = dict(OMPI, MASTER_PORT="4000")
    discover(env).export(env)
    assert {k: env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                                "MASTER_PORT")} == {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1",
                                                    "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                                    "MASTER_PORT": "4000"}
    assert discover(env).source == "torchrun" and discover(env).world_size == 2  # consistent afterwards
    alone: dict = {}
    discover(alone).export(alone)
    assert alone == {}


def test_init_distributed_raises_the_setup_error(monkeypatch):
    from lmforge.config import build_config
    from lmforge.distributed.mesh import init_distributed

    for k in list(os.environ):
        if k in TORCHRUN or k.startswith(("OMPI_", "PMI_", "SLURM_", "PMIX_")):
            monkeypatch.delenv(k)
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "0")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    with pytest.raises(SetupError, match="OMPI_COMM_WORLD_LOCAL_RANK"):
        init_distributed(build_config({"training": {"device": "cpu"}}))


# ----- a real Open MPI launch -----

MPIRUN = shutil.which("mpirun")
needs_mpirun = pytest.mark.skipif(MPIRUN is None, reason="mpirun not on PATH (Debian: apt-get install openmpi-bin)")
multiprocess = pytest.mark.multiprocess


def _mpirun(args: list[str], log: Path, timeout: float) -> int:
    """``mpirun -np 2 <python> args`` in its own session; a hang kills the whole group and fails the test."""
    cmd = [MPIRUN, "-np", "2", "--oversubscribe", "--bind-to", "none"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN and not k.startswith(("OMPI_", "PMI", "SLURM_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), LMFORGE_PEAK_FLOPS="1e11")
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd + [sys.executable, *args], cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        return finish(proc, timeout, log)


@needs_mpirun
@multiprocess
def test_mpirun_two_ranks_join_over_gloo(tmp_path):
    log = tmp_path / "log.txt"
    assert _mpirun([str(REPO / "tests" / "launch_worker.py"), str(tmp_path)], log, 120) == 0, log.read_text()[-3000:]
    recs = [json.loads((tmp_path / f"rank_{r}.json").read_text()) for r in range(2)]
    assert [r["rank"] for r in recs] == [0, 1] and all(r["world"] == 2 and r["sum"] == 3.0 for r in recs)
    assert all(r["launch"]["source"] == "openmpi" and r["backend"] == "gloo" for r in recs)
    assert recs[0]["env"]["MASTER_ADDR"] == "127.0.0.1" and recs[0]["env"]["MASTER_PORT"] == recs[1]["env"][
        "MASTER_PORT"]


@needs_mpirun
@multiprocess
def test_mpirun_lmforge_train_without_torchrun(tmp_path):
    from lmforge.config import save_config

    data = pack_tiny(tmp_path / "data")
    cfg = run_cfg(tmp_path / "run", data, {"strategy": "ddp", "timeout_s": 60}, 1, dp=2)
    save_config(cfg, tmp_path / "cfg.yaml")
    log = tmp_path / "log.txt"
    code = _mpirun(["-m", "lmforge", "train", "--config", str(tmp_path / "cfg.yaml")], log, 240)
    assert code == 0, log.read_text()[-3000:]
    assert "distributed: world 2" in log.read_text()
    assert (tmp_path / "run" / "model.safetensors").is_file() and (tmp_path / "run" / "summary.json").is_file()
