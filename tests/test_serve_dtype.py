"""``--dtype auto`` for ``lmforge serve`` and ``lmforge generate``: the decision is the trainer's
(``hardware.precision.resolve_dtype`` over ``resolve_precision``) with the probe results injected (the issue's
AVX2 EPYC → float32, an AMX Xeon → bfloat16), a compressed folder stays float32, explicit names are honoured
unprobed, a bad name is a ConfigError naming ``--dtype``; then the loader, the model card and the generate
command end to end on a tiny run. Nothing here assumes bf16 is fast or slow on the machine running the tests."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from lmforge.cli import main
from lmforge.errors import ConfigError
from lmforge.hardware import facts, matmul
from lmforge.hardware.matmul import ProbeResult
from lmforge.hardware.precision import resolve_dtype, resolve_precision
from lmforge.serve.loader import load_model, serving_dtype
from lmforge.serve.settings import ServeSettings

G = 1e9
AVX2 = ProbeResult("cpu", {"fp32": 43.7 * G, "bf16": 0.7 * G, "fp16": 1.1 * G})
AMX = ProbeResult("cpu", {"fp32": 330 * G, "bf16": 1350 * G, "fp16": 260 * G})
EPYC, XEON = "AMD EPYC 7B13 64-Core Processor", "Intel(R) Xeon(R) Platinum 8481C"


@pytest.fixture
def machine(monkeypatch):
    """``machine(probe, cpu_model)`` makes the cached probe and the CPU facts answer as that machine does;
    ``machine.calls`` counts the probes asked for."""
    calls = []

    def set_machine(probe, model):
        def fake_probe(device, *a, **k):
            calls.append(str(device))
            return probe

        monkeypatch.setattr(matmul, "probe", fake_probe)
        monkeypatch.setattr(facts, "cpu_facts", lambda *a, **k: {"model": model, "flags": []})

    set_machine.calls = calls
    return set_machine


@pytest.fixture
def compressed(tiny_run, tmp_path):
    """The tiny run as a compressed folder (a ``compression.json`` with no step that changes the model)."""
    folder = shutil.copytree(tiny_run, tmp_path / "compressed")
    (folder / "compression.json").write_text(json.dumps({"format_version": 1, "steps": []}))
    return folder


# ----- the decision -----

def test_avx2_cpu_serves_float32_and_says_why(machine, tiny_run):
    machine(AVX2, EPYC)
    c = serving_dtype("auto", tiny_run)
    assert (c.dtype, c.dtype_name, c.requested, c.warning) == (torch.float32, "float32", "auto", None)
    assert c.dtype_log_line().startswith("dtype float32 (auto): CPU bf16 matmul") and "43.7" in c.reason


def test_amx_cpu_serves_bfloat16(machine, tiny_run):
    machine(AMX, XEON)
    c = serving_dtype("auto", tiny_run)
    assert c.dtype is torch.bfloat16 and c.dtype_log_line().startswith("dtype bfloat16 (auto): CPU bf16 matmul 4.1×")


def test_auto_is_the_trainers_decision():
    for probe, model in ((AVX2, EPYC), (AMX, XEON)):
        train = resolve_precision("auto", "cpu", probe=probe, cpu_model=model)
        serve = resolve_dtype("auto", "cpu", probe=probe, cpu_model=model)
        assert (serve.precision, serve.reason, serve.peaks) == (train.precision, train.reason, train.peaks)


def test_cuda_without_native_bf16_serves_fp16_without_loss_scaling():
    c = resolve_dtype("auto", "cuda", probe=AMX, bf16_supported=False)
    assert c.dtype_name == "float16" and not c.loss_scaling and "loss scaling" not in c.reason
    assert resolve_dtype("auto", "cuda", probe=AMX, bf16_supported=True).dtype_name == "bfloat16"
    assert resolve_precision("auto", "cuda", probe=AMX, bf16_supported=False).loss_scaling  # training unchanged


def test_compressed_folder_stays_float32_unprobed(machine, compressed):
    machine(AMX, XEON)
    c = serving_dtype("auto", compressed)
    assert c.dtype is torch.float32 and "compression.json" in c.reason and machine.calls == []


@pytest.mark.parametrize("name", ["float32", "bfloat16", "float16"])
def test_explicit_dtype_is_honoured_unprobed(machine, tiny_run, compressed, name):
    machine(AVX2, EPYC)
    c = serving_dtype(name, tiny_run)
    assert (c.dtype_name, c.requested, c.reason) == (name, name, "requested")
    if name == "float32":
        assert serving_dtype(name, compressed).dtype is torch.float32
    else:  # a compressed folder's kernels and scales are float32: half precision is refused, naming why
        with pytest.raises(ConfigError, match=f"--dtype {name}: compressed folder"):
            serving_dtype(name, compressed)
    assert machine.calls == []


@pytest.mark.parametrize("bad", ["bf16", "fp32", "half", ""])
def test_bad_dtype_is_a_config_error_naming_the_flag(bad):
    with pytest.raises(ConfigError, match="--dtype"):
        serving_dtype(bad)
    with pytest.raises(ConfigError, match="--dtype"):
        ServeSettings(dtype=bad).check()


def test_serve_defaults_to_auto():
    from lmforge.cli import build_parser

    assert ServeSettings().dtype == "auto" and build_parser().parse_args(["serve", "x"]).dtype == "auto"
    assert build_parser().parse_args(["generate", "--run", "x", "--prompt", "a"]).dtype == "auto"


# ----- the loader and the model card -----

def test_load_model_resolves_auto_logs_it_and_the_card_shows_it(machine, tiny_run, caplog):
    machine(AMX, XEON)
    logger = logging.getLogger("lmforge.serve")
    logger.addHandler(caplog.handler)  # the server's logger may not propagate to the root
    caplog.set_level(logging.INFO, logger="lmforge.serve")
    try:
        loaded = load_model(tiny_run)
    finally:
        logger.removeHandler(caplog.handler)
    assert loaded.precision.dtype_name == "bfloat16"
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    assert any(r.getMessage().startswith("dtype bfloat16 (auto): CPU bf16 matmul") for r in caplog.records)
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from lmforge.serve.app import ServerState, create_app
    from lmforge.serve.metrics import ServeMetrics

    state = ServerState(ServeSettings(access_log=False), ServeMetrics(loaded.name), phase="ready", loaded=loaded)
    with TestClient(create_app(state, keys=None)) as client:
        assert client.get("/v1/models").json()["data"][0]["dtype"] == "bfloat16"


def test_load_model_keeps_float32_on_avx2_and_for_a_compressed_folder(machine, tiny_run, compressed):
    machine(AVX2, EPYC)
    assert next(load_model(tiny_run, "auto").model.parameters()).dtype is torch.float32
    machine(AMX, XEON)
    assert load_model(compressed, "auto").precision.dtype_name == "float32"
    assert next(load_model(tiny_run, "float16").model.parameters()).dtype is torch.float16


# ----- lmforge generate -----

GEN = ["--prompt", "add 1", "--max-new-tokens", "4", "--temperature", "0"]


@pytest.mark.parametrize("probe,model,want", [(AMX, XEON, "bfloat16"), (AVX2, EPYC, "float32")], ids=["amx", "avx2"])
def test_generate_dtype_auto_runs(machine, tiny_run, capsys, probe, model, want):
    machine(probe, model)
    assert main(["generate", "--run", str(tiny_run), "--dtype", "auto", *GEN]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("add 1") and f"dtype {want} (auto): CPU bf16 matmul" in err


def test_generate_compressed_folder_auto_is_float32_and_bad_dtype_is_refused(machine, compressed, capsys):
    machine(AMX, XEON)
    assert main(["generate", "--run", str(compressed), *GEN]) == 0
    assert "dtype float32 (auto): compressed folder (compression.json)" in capsys.readouterr().err
    assert main(["generate", "--run", str(compressed), "--dtype", "bf16", *GEN]) == 2
    err = capsys.readouterr().err
    assert "lmforge generate: error: --dtype 'bf16'" in err and "Traceback" not in err
    assert main(["generate", "--run", str(compressed), "--dtype", "float16", *GEN]) == 2
    err = capsys.readouterr().err  # half precision would cast its float32 scales: refused, naming why
    assert "--dtype float16: compressed folder" in err and "Traceback" not in err
    assert main(["generate", "--run", str(compressed), "--dtype", "float32", *GEN]) == 0
    assert "dtype" not in capsys.readouterr().err  # an explicit choice has nothing to explain
