"""`lmforge env`: the JSON schema (keys and types), the text report, and environment_facts() for summary.json."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge import environment
from lmforge.cli import main
from lmforge.hardware.matmul import ProbeResult

REPO = Path(__file__).resolve().parents[1]
OPT_STR, OPT_NUM = (str, type(None)), (int, float, type(None))
SCHEMA = {"schema": int, "lmforge": OPT_STR, "python": str, "platform": str, "torch": dict, "cpu": dict,
          "memory_gb": OPT_NUM, "devices": dict, "device": str, "probe": (dict, type(None)),
          "mfu_peak": (dict, type(None)), "precision_auto": (dict, type(None)), "distributed": dict,
          "launch": dict, "extras": dict}


def check_schema(f: dict, probed: bool) -> None:
    assert set(f) == set(SCHEMA), set(f) ^ set(SCHEMA)
    for key, typ in SCHEMA.items():
        assert isinstance(f[key], typ), (key, f[key])
    assert f["schema"] == environment.SCHEMA_VERSION
    assert set(f["torch"]) == {"version", "cuda", "hip", "cudnn", "nccl"} and isinstance(f["torch"]["version"], str)
    c = f["cpu"]
    assert {"model", "arch", "flags", "native_bf16", "capability", "logical_cpus", "usable_cpus", "torch_threads",
            "torch_interop_threads"} == set(c)
    assert isinstance(c["native_bf16"], bool) and isinstance(c["torch_threads"], int)
    assert c["arch"] not in ("x86_64", "amd64") or {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"} <= set(
        c["flags"])
    assert all(isinstance(v, bool) for v in c["flags"].values())
    cuda = f["devices"]["cuda"]
    assert isinstance(cuda["available"], bool) and isinstance(cuda["devices"], list)
    for d in cuda["devices"]:
        assert {"index", "name", "capability", "memory_gb", "bf16"} == set(d)
    assert set(f["devices"]["mps"]) == {"built", "available"}
    d = f["distributed"]
    assert set(d) == {"gloo", "nccl", "mpi"}
    assert set(d["gloo"]) == {"available", "works", "error"} and isinstance(d["gloo"]["available"], bool)
    assert set(d["nccl"]) == {"available", "usable", "version"} and set(d["mpi"]) == {"available", "launcher"}
    assert set(d["mpi"]["launcher"]) == {"path", "version"}
    assert "error" in f["launch"] or {"rank", "world_size", "local_rank", "local_world_size", "master_addr",
                                      "master_port", "source"} == set(f["launch"])
    for name, e in f["extras"].items():
        assert isinstance(e["installed"], bool) and all(isinstance(p, str) for p in e["packages"])
        assert all(v is None or isinstance(v, str) for v in e["packages"].values())
    if not probed:
        assert f["probe"] is f["mfu_peak"] is f["precision_auto"] is None
        return
    p = f["probe"]
    assert set(p["peaks"]) == {"fp32", "bf16", "fp16"} and all(isinstance(v, OPT_NUM) for v in p["peaks"].values())
    assert set(f["mfu_peak"]) == {"fp32", "bf16", "fp16"}
    for v in f["mfu_peak"].values():
        assert isinstance(v["flops"], float) and v["source"] in ("measured", "datasheet", "env")
    a = f["precision_auto"]
    assert a["precision"] in ("fp32", "bf16", "fp16") and a["requested"] == "auto" and isinstance(a["reason"], str)


@pytest.fixture
def fake_probe(monkeypatch, tmp_path):
    """A fixed probe result (an AVX2-like CPU) so these tests do not time matmuls."""
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LMFORGE_PEAK_FLOPS", raising=False)
    result = ProbeResult("cpu", {"fp32": 43.7e9, "bf16": 0.7e9, "fp16": 1.1e9}, {"fp32": "1024×1024×1024"}, 2,
                         0.4, "test-key", cpu_share=0.97)
    import lmforge.hardware as hw

    monkeypatch.setattr(hw, "probe", lambda device="cpu", refresh=False: result)
    return result


def test_facts_schema_and_json_roundtrip(fake_probe):
    f = environment.environment_facts(device="cpu")
    check_schema(f, probed=True)
    assert json.loads(json.dumps(f)) == f
    assert f["precision_auto"]["precision"] == "fp32"  # the injected AVX2 numbers
    assert f["mfu_peak"]["bf16"] == {"flops": 0.7e9, "source": "measured"}
    assert f["distributed"]["gloo"]["works"] is True, f["distributed"]["gloo"]
    assert "finetune" in f["extras"] and "peft" in f["extras"]["finetune"]["packages"]


def test_facts_without_probe_or_gloo_check():
    f = environment.environment_facts(probe=False, check_gloo=False)
    check_schema(f, probed=False)
    assert f["distributed"]["gloo"]["works"] is None


def test_text_report_names_every_section(fake_probe, capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    for label in ("torch", "cpu flags", "threads", "memory", "cuda", "matmul peak", "MFU peak", "precision",
                  "gloo", "nccl", "mpi", "launch", "extra finetune"):
        assert any(line.startswith(label + " ") for line in out.splitlines()), (label, out)
    assert "auto → fp32" in out and "43.7" in out and "+avx2" in out.replace("-avx2", "+avx2")


def test_json_to_stdout_and_to_a_file(fake_probe, capsys, tmp_path):
    assert main(["env", "--json", "--no-gloo"]) == 0
    check_schema(json.loads(capsys.readouterr().out), probed=True)
    out = tmp_path / "env.json"
    assert main(["env", "--out", str(out), "--no-probe"]) == 0
    check_schema(json.loads(out.read_text()), probed=False)


def test_env_command_end_to_end_with_the_real_probe(tmp_path):
    """The installed command on this machine, probe included (cached under a temporary LMFORGE_CACHE)."""
    env = {"PATH": "/usr/bin:/bin", "LMFORGE_CACHE": str(tmp_path), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO)}
    out = tmp_path / "env.json"
    r = subprocess.run([sys.executable, "-m", "lmforge", "env", "--out", str(out)], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    f = json.loads(out.read_text())
    check_schema(f, probed=True)
    assert f["cpu"]["torch_threads"] == 1 and f["probe"]["peaks"]["fp32"] > 1e8
    r = subprocess.run([sys.executable, "-m", "lmforge", "env"], env=env, cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "precision" in r.stdout
    assert "cached" in r.stdout or "disturbed" in r.stdout  # the first run stored it unless neighbours were busy


def test_unexpected_arguments_are_a_user_error(capsys):
    assert main(["env", "--bogus"]) == 2
    assert "env: unexpected arguments --bogus" in capsys.readouterr().err
