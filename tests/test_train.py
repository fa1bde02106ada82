"""Trainer: gradient-accumulation exactness, bitwise resume, metrics, guards, early stopping."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers.runs import pack_tiny, tiny_cfg

from lmforge.config import build_config
from lmforge.models import build_model
from lmforge import checkpoint as ckpt
from lmforge.training.engine import NativeEngine, accumulate_gradients
from lmforge.training.trainer import train


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return pack_tiny(tmp_path_factory.mktemp("data"))


@pytest.fixture(autouse=True)
def _fixed_peak(monkeypatch):
    monkeypatch.setenv("LMFORGE_PEAK_FLOPS", "1e11")  # skip the matmul probe in tests


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_grad_accumulation_matches_full_batch_with_uneven_ignored_labels():
    torch.manual_seed(0)
    cfg = build_config({"model": {"preset": "tiny", "vocab_size": 64, "max_seq_len": 16}})
    model = build_model(cfg.model, seed=0)
    seq = torch.randint(0, 64, (8, 17))
    x, y = seq[:, :-1].clone(), seq[:, 1:].clone()
    y[0, :10] = -100  # micro-batch 0 has far fewer valid targets than the others
    y[1, :] = -100
    y[5, 3:7] = -100
    full = [{"input_ids": x, "labels": y}]
    loss_full = accumulate_gradients(model, full, torch.device("cpu"))
    g_full = _grads(model)
    for split in ([2, 2, 2, 2], [1, 3, 4], [5, 3]):
        model.zero_grad(set_to_none=True)
        micro, start = [], 0
        for n in split:
            micro.append({"input_ids": x[start:start + n], "labels": y[start:start + n]})
            start += n
        loss = accumulate_gradients(model, micro, torch.device("cpu"))
        torch.testing.assert_close(loss, loss_full, rtol=1e-6, atol=1e-6)
        for name, g in _grads(model).items():
            torch.testing.assert_close(g, g_full[name], rtol=0, atol=1e-6, msg=f"{split}: {name}")
    # a naive per-micro-batch mean would differ here: make sure the check above is meaningful
    model.zero_grad(set_to_none=True)
    for mb in ({"input_ids": x[:2], "labels": y[:2]}, {"input_ids": x[2:], "labels": y[2:]}):
        logits = model(mb["input_ids"])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), mb["labels"].flatten()).div(2).backward()
    assert max((g - g_full[n]).abs().max().item() for n, g in _grads(model).items()) > 1e-4


def _final_state(run_dir: Path):
    path = ckpt.newest_valid(run_dir)
    state = ckpt.read_state(path)
    return path, state["model"], {**state["shared"], **state["rank0"], "optimizer": state["optim"]}


def _assert_bitwise_equal(a_dir: Path, b_dir: Path):
    pa, wa, sa = _final_state(a_dir)
    pb, wb, sb = _final_state(b_dir)
    assert pa.name == pb.name
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    oa, ob = sa["optimizer"], sb["optimizer"]  # flattened: state.<param>.<key> / param_groups.<param>.<key>
    assert oa.keys() == ob.keys() and any(k.startswith("state.") for k in oa)
    for k in oa:
        same = torch.equal(oa[k], ob[k]) if isinstance(oa[k], torch.Tensor) else oa[k] == ob[k]
        assert same, k
    assert sa["scheduler"]["last_epoch"] == sb["scheduler"]["last_epoch"]
    assert sa["loader"] == sb["loader"]


def test_bitwise_resume_with_dropout(tmp_path, data_dir):
    full = tiny_cfg(tmp_path / "full", data_dir, model={"dropout": 0.1})
    s_full = train(full)
    assert s_full["stop_reason"] == "max_steps" and s_full["steps"] == 6
    part = tiny_cfg(tmp_path / "part", data_dir, model={"dropout": 0.1}, training={"stop_at_step": 3})
    s_part = train(part)
    assert s_part["stop_reason"] == "stop_at_step" and s_part["steps"] == 3
    assert ckpt.newest_valid(tmp_path / "part").name == "step_0000003"
    assert "stop_at_step: null" in (tmp_path / "part" / "config.yaml").read_text()  # per-invocation only
    resumed = tiny_cfg(tmp_path / "part", data_dir, model={"dropout": 0.1}, checkpoint={"resume": "auto"})
    s_res = train(resumed)
    assert s_res["resumed_from"].endswith("step_0000003") and s_res["steps"] == 6
    _assert_bitwise_equal(tmp_path / "full", tmp_path / "part")
    assert s_res["val_loss"] == s_full["val_loss"]
    # the resumed run's metrics.jsonl continues without duplicated steps
    steps = [r["step"] for r in map(json.loads, (tmp_path / "part" / "metrics.jsonl").read_text().splitlines())
             if "loss" in r]
    assert steps == list(range(1, 7))


def test_run_folder_metrics_and_resolved_config(tmp_path, data_dir):
    cfg = tiny_cfg(tmp_path / "run", data_dir, logging={"tensorboard": True, "report": True})
    summary = train(cfg)
    run = tmp_path / "run"
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in recs if "loss" in r]
    assert [r["step"] for r in train_recs] == list(range(1, 7))
    for r in train_recs:
        assert r["loss"] > 0 and r["lr"] > 0 and r["tokens_per_s"] > 0 and 0 < r["mfu"]
    assert train_recs[-1]["tokens"] == 6 * 2 * 2 * 32
    assert any("val_loss" in r for r in recs) and summary["val_ppl"] > 1
    assert list((run / "tensorboard").iterdir())
    from lmforge.config import load_config

    saved = load_config(run / "config.yaml")
    assert saved.model.vocab_size == 300  # resolved from the data manifest
    html = (run / "report.html").read_text()
    assert "data:image/png;base64," in html and "vocab_size: 300" in html
    # keep_last pruning: every_steps=2 with keep_last=10 keeps all three
    assert [p.name for p in ckpt.complete_folders(run)] == ["step_0000002", "step_0000004", "step_0000006"]
    assert (run / "model.safetensors").is_file()


def test_keep_last_prunes(tmp_path, data_dir):
    train(tiny_cfg(tmp_path / "run", data_dir, checkpoint={"every_steps": 1, "keep_last": 2}))
    assert [p.name for p in ckpt.complete_folders(tmp_path / "run")] == ["step_0000005", "step_0000006"]


def test_non_finite_guard_skips_then_stops(tmp_path, data_dir, monkeypatch):
    real = NativeEngine.forward_backward
    calls = {"n": 0}

    def poisoned(self, micro, objective, factor):
        calls["n"] += 1
        loss = real(self, micro, objective, factor)
        if calls["n"] >= 3:  # from step 3 on, every gradient is NaN
            for p in self.model.parameters():
                p.grad.fill_(float("nan"))
        return loss

    monkeypatch.setattr(NativeEngine, "forward_backward", poisoned)
    cfg = tiny_cfg(tmp_path / "run", data_dir, training={"max_steps": 20, "max_bad_steps": 3},
                   checkpoint={"every_steps": 1})
    summary = train(cfg)
    assert summary["stop_reason"] == "non_finite" and summary["skipped_steps"] == 3 and summary["steps"] == 5
    path, weights, _ = _final_state(tmp_path / "run")
    assert path.name == "step_0000002"  # the last good checkpoint is kept; nothing saved after NaNs
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_early_stopping(tmp_path, data_dir):
    cfg = tiny_cfg(tmp_path / "run", data_dir, optimizer={"lr": 1e-9},
                   training={"max_steps": 40, "eval_every": 1, "early_stop_metric": "val_loss",
                             "early_stop_patience": 2, "early_stop_min_delta": 0.5})
    summary = train(cfg)
    assert summary["stop_reason"] == "early_stop" and summary["steps"] == 3
    assert ckpt.newest_valid(tmp_path / "run").name == "step_0000003"


def test_bad_config_errors(tmp_path, data_dir):
    from lmforge.config import ConfigError

    with pytest.raises(ConfigError, match="data.path"):
        train(tiny_cfg(tmp_path / "r", tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="model.vocab_size=100"):
        train(tiny_cfg(tmp_path / "r", data_dir, model={"vocab_size": 100}))
    with pytest.raises(ConfigError, match="checkpoint.resume"):
        train(tiny_cfg(tmp_path / "r", data_dir, checkpoint={"resume": str(tmp_path / "missing")}))
