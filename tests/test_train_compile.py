"""training.compile: per-block torch.compile trains to the same losses as eager and fills its cache dir."""

import json

import pytest

from lmforge.training.trainer import train
from tests.helpers.runs import pack_tiny, tiny_cfg


def _losses(run):
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_compiled_blocks_match_eager(tmp_path, monkeypatch):
    data = pack_tiny(tmp_path / "data")
    sections = dict(training={"max_steps": 3, "eval_every": 0, "grad_accum_steps": 1},
                    checkpoint={"every_steps": 0})
    train(tiny_cfg(tmp_path / "eager", data, **sections))
    cache = tmp_path / "inductor-cache"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache))  # restored after the test (the trainer sets it)
    sections["training"] = {**sections["training"], "compile": True, "compile_cache_dir": str(cache)}
    train(tiny_cfg(tmp_path / "compiled", data, **sections))
    assert _losses(tmp_path / "compiled") == pytest.approx(_losses(tmp_path / "eager"), rel=1e-4)
    assert cache.is_dir() and any(cache.rglob("*")), "compile cache directory was not used"
