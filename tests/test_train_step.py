"""The one TrainStep: host reads happen once per step (the agreed finite/stop flags) plus the host-side target
counts of the CPU batches; the loss and the grad norm are read on logging steps only."""

from __future__ import annotations


import pytest
import torch

from tests.helpers.runs import pack_tiny, tiny_cfg

READS = ("item", "tolist", "__bool__", "__float__", "__int__")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return pack_tiny(tmp_path_factory.mktemp("data"))


def _count_reads(monkeypatch) -> dict:
    counts = {"n": 0}
    for name in READS:
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, **kw):
            counts["n"] += 1
            return _real(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return counts


def test_host_reads_per_step_are_one_plus_the_cpu_target_counts(tmp_path, data_dir, monkeypatch):
    from lmforge.training import step as step_mod
    from lmforge.training.trainer import train

    monkeypatch.setenv("LMFORGE_PEAK_FLOPS", "1e11")
    per_step: list[int] = []
    real_call = step_mod.TrainStep.__call__
    counts = _count_reads(monkeypatch)

    def timed(self, micro, requests):
        before = counts["n"]
        out = real_call(self, micro, requests)
        per_step.append(counts["n"] - before)
        return out

    monkeypatch.setattr(step_mod.TrainStep, "__call__", timed)
    accum = 3
    cfg = tiny_cfg(tmp_path / "run", data_dir, training={"max_steps": 8, "grad_accum_steps": accum, "eval_every": 0},
                   checkpoint={"every_steps": 0}, logging={"log_every": 100, "tensorboard": False, "progress": False,
                                                           "report": False})
    train(cfg)
    # one read of the agreed [non-finite, budget, signal] flags + one host-side label count per micro-batch
    # (CPU batch tensors, before they move to the device); nothing else, whatever the step
    assert per_step == [1 + accum] * 8, per_step


def test_logging_step_reads_loss_and_norm_once(tmp_path, data_dir, monkeypatch):
    """The log line's loss and grad norm come from one read of the window's device accumulators."""
    from lmforge.training import loop as loop_mod
    from lmforge.training.trainer import train

    monkeypatch.setenv("LMFORGE_PEAK_FLOPS", "1e11")
    counts = _count_reads(monkeypatch)
    reads: list[int] = []
    real_flush = loop_mod._Window.flush

    def flush(self, *a, **kw):
        before = counts["n"]
        rec = real_flush(self, *a, **kw)
        reads.append(counts["n"] - before)
        return rec

    monkeypatch.setattr(loop_mod._Window, "flush", flush)
    cfg = tiny_cfg(tmp_path / "run", data_dir, training={"max_steps": 6, "eval_every": 0},
                   checkpoint={"every_steps": 0}, logging={"log_every": 3, "tensorboard": False, "progress": False,
                                                           "report": False})
    train(cfg)
    assert reads == [1, 1]


def test_time_budget_stops_at_the_first_step_boundary_and_says_so(tmp_path, data_dir, monkeypatch, capsys):
    from lmforge.training.trainer import train

    monkeypatch.setenv("LMFORGE_PEAK_FLOPS", "1e11")
    cfg = tiny_cfg(tmp_path / "run", data_dir, training={"max_steps": 50, "max_minutes": 1e-6, "eval_every": 0},
                   checkpoint={"every_steps": 0})
    summary = train(cfg)
    assert summary["stop_reason"] == "time_budget" and summary["steps"] == 1
    assert summary["final_checkpoint"].endswith("step_0000001")
    assert "longer than training.max_minutes" in capsys.readouterr().out


def test_resolved_precision_is_recorded(tmp_path, data_dir, monkeypatch, capsys):
    """precision auto resolves on this machine: config.yaml states the dtype used, summary.json why."""
    import json

    import yaml

    from lmforge.training.trainer import train

    monkeypatch.setenv("LMFORGE_PEAK_FLOPS", "1e11")
    cfg = tiny_cfg(tmp_path / "run", data_dir, training={"max_steps": 2, "precision": "auto", "eval_every": 0},
                   checkpoint={"every_steps": 0})
    train(cfg)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["training"]["precision"]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved in ("fp32", "bf16") and summary["precision"]["precision"] == saved
    assert summary["precision"]["requested"] == "auto" and summary["precision"]["peaks"].get("fp32")
    assert summary["environment"]["cpu"]["flags"]
    assert f"precision {saved} (auto)" in capsys.readouterr().out
