"""Mixed precision: fp16 dynamic loss scaling (overflow skipped, weights stay finite, stop at min scale) and
bf16 parameters with fp32 master weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers.runs import pack_tiny, tiny_cfg

from lmforge import checkpoint as ckpt
from lmforge.training.precision import DynamicLossScaler
from lmforge.training.trainer import train


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return pack_tiny(tmp_path_factory.mktemp("data"))


@pytest.fixture(autouse=True)
def _fixed_peak(monkeypatch):
    monkeypatch.setenv("LMFORGE_PEAK_FLOPS", "1e11")


def test_scaler_hysteresis_backoff_growth_and_min():
    s = DynamicLossScaler(init_scale=1024, window=3, hysteresis=2, min_scale=256, max_skips_at_min=2)
    assert s.update(True) is None and s.scale == 1024  # first overflow absorbed by hysteresis
    assert s.update(True) is None and s.scale == 512
    assert s.update(True) is None and s.scale == 256  # hysteresis is not restored by a halving (DeepSpeed)
    for _ in range(3):
        s.update(False)
    assert s.scale == 256  # DeepSpeed grows after window+1 clean steps following an overflow
    s.update(False)
    assert s.scale == 512 and s.cur_hysteresis == 2
    for _ in range(3):
        s.update(False)
    assert s.scale == 1024  # then every window steps
    for _ in range(3):
        s.update(True)
    assert s.scale == 256
    assert s.update(True) is None and s.scale == 256  # never below min_scale
    msg = s.update(True)
    assert msg is not None and "bf16" in msg
    st = s.state_dict()
    s2 = DynamicLossScaler()
    s2.load_state_dict(st)
    assert s2.state_dict() == st


def test_scaler_matches_deepspeed(monkeypatch):
    """The same overflow sequence through DeepSpeed's own DynamicLossScaler gives the same scales."""
    ls = pytest.importorskip("deepspeed.runtime.fp16.loss_scaler", reason="deepspeed is not installed")
    monkeypatch.setattr(ls.dist, "get_rank", lambda *a, **k: 0)
    theirs = ls.DynamicLossScaler(init_scale=2.0 ** 10, scale_window=4, min_scale=8, delayed_shift=3,
                                  consecutive_hysteresis=False, raise_error_at_min_scale=False)
    ours = DynamicLossScaler(init_scale=2.0 ** 10, window=4, hysteresis=3, min_scale=8, max_skips_at_min=10 ** 6)
    g = torch.Generator().manual_seed(0)
    for i in range(400):
        overflow = bool(torch.rand((), generator=g) < (0.5 if i < 100 else 0.15))
        theirs.update_scale(overflow)
        ours.update(overflow)
        assert ours.scale == theirs.cur_scale, i
        assert ours.cur_hysteresis == theirs.cur_hysteresis, i


def test_unscale_detects_inf_and_divides():
    p = torch.nn.Parameter(torch.ones(3))
    s = DynamicLossScaler(init_scale=4.0)
    p.grad = torch.tensor([4.0, 8.0, 12.0])
    assert s.unscale_([p]) and torch.equal(p.grad, torch.tensor([1.0, 2.0, 3.0]))
    p.grad = torch.tensor([1.0, float("inf"), 0.0])
    assert not s.unscale_([p])


def _records(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_fp16_overflow_steps_are_skipped_and_scale_backs_off(tmp_path, data_dir):
    # a loss scale of 2^40 overflows fp16 gradients until it has been halved enough
    cfg = tiny_cfg(tmp_path / "run", data_dir, training={"precision": "fp16", "max_steps": 30, "eval_every": 0,
                                                          "loss_scale_init": 2.0 ** 40, "loss_scale_hysteresis": 1,
                                                          "loss_scale_window": 1000},
                   checkpoint={"every_steps": 0})
    summary = train(cfg)
    recs = _records(tmp_path / "run")
    assert summary["stop_reason"] == "max_steps"
    assert 0 < summary["skipped_steps"] < 30
    scales = [r["loss_scale"] for r in recs]
    assert scales[0] < 2.0 ** 40 and scales == sorted(scales, reverse=True) and scales[-1] >= 1.0
    assert recs[-1]["loss"] < recs[summary["skipped_steps"]]["loss"]  # it trains once the scale fits
    st = ckpt.read_state(ckpt.newest_valid(tmp_path / "run"))["shared"]
    assert st["scaler"]["overflows"] == summary["skipped_steps"]
    from safetensors.torch import load_file

    for k, w in load_file(str(tmp_path / "run" / "model.safetensors")).items():
        assert torch.isfinite(w).all(), k


def _fresh_model(cfg):
    from lmforge.models import build_model

    c = cfg.model.model_copy(update={"vocab_size": 300})
    return build_model(c, seed=0)


def test_fp16_stops_after_skips_at_min_scale(tmp_path, data_dir):
    cfg = tiny_cfg(tmp_path / "run", data_dir, model={"init_std": 1e4},  # activations overflow fp16 at any scale
                   training={"precision": "fp16", "max_steps": 50, "eval_every": 0, "loss_scale_init": 4.0,
                             "loss_scale_min": 1.0, "loss_scale_max_skips_at_min": 3, "loss_scale_hysteresis": 1},
                   checkpoint={"every_steps": 0})
    summary = train(cfg)
    assert summary["stop_reason"] == "fp16_underflow"
    assert summary["skipped_steps"] == 2 + 3  # 4 → 2 → 1, then three skips at the minimum
    from safetensors.torch import load_file

    assert all(torch.isfinite(w).all() for w in load_file(str(tmp_path / "run" / "model.safetensors")).values())


def test_bf16_params_with_fp32_master_weights(tmp_path, data_dir):
    cfg = tiny_cfg(tmp_path / "m", data_dir, training={"param_dtype": "bfloat16", "precision": "bf16",
                                                        "max_steps": 4, "stop_at_step": 2})
    train(cfg)
    resumed = cfg.model_copy(deep=True)
    resumed.training.stop_at_step = None
    resumed.checkpoint.resume = "auto"
    train(resumed)
    full = tiny_cfg(tmp_path / "f", data_dir, training={"param_dtype": "bfloat16", "precision": "bf16",
                                                         "max_steps": 4})
    train(full)
    from safetensors.torch import load_file

    wa, wb = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("m", "f"))
    assert all(v.dtype == torch.bfloat16 for v in wa.values())
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # master weights restored on resume: bitwise equal
    master = ckpt.read_state(ckpt.newest_valid(tmp_path / "m"))["shared"]["master"]
    assert all(v.dtype == torch.float32 for k, v in master.items() if "rope" not in k)
    # bf16 weights are the rounded masters; the masters hold updates too small for bf16
    emb = master["tok_embeddings.weight"]
    assert torch.equal(emb.to(torch.bfloat16), wa["tok_embeddings.weight"])
    assert not torch.equal(emb, emb.to(torch.bfloat16).float())


def test_pure_bf16_without_master(tmp_path, data_dir):
    cfg = tiny_cfg(tmp_path / "p", data_dir, training={"param_dtype": "bfloat16", "precision": "bf16",
                                                        "master_weights": False, "max_steps": 3, "eval_every": 0})
    summary = train(cfg)
    assert summary["stop_reason"] == "max_steps"
    st = ckpt.read_state(ckpt.newest_valid(tmp_path / "p"))
    assert st["shared"].get("master") is None  # no master weights saved
    exp_avg = next(v for k, v in st["optim"].items() if k.endswith(".exp_avg"))
    assert exp_avg.dtype == torch.bfloat16
