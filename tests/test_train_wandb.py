"""Weights & Biases logging in offline mode (needs no network); skipped when wandb is not installed."""

import pytest

from lmforge.training.trainer import train
from tests.helpers.runs import pack_tiny, tiny_cfg


def test_wandb_offline_run_written(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is not installed")
    monkeypatch.setenv("WANDB_SILENT", "true")
    data = pack_tiny(tmp_path / "data")
    cfg = tiny_cfg(tmp_path / "run", data, training={"max_steps": 6}, logging={"wandb": True, "log_every": 2})
    train(cfg)
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("*.wandb")) and runs[0].joinpath("files").is_dir()
