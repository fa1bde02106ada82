"""Checkpoints: atomic layout, marker/tmp handling, checksum verification and fallback, pruning, tied weights."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

from lmforge.config import build_config
from lmforge.models import build_model
from lmforge.training import checkpoint as ckpt


def _model(seed=0):
    cfg = build_config({"model": {"preset": "tiny", "vocab_size": 64, "max_seq_len": 16}})
    return build_model(cfg.model, seed=seed)


def _save(run, step, model, **kw):
    return ckpt.save_checkpoint(run, step, model, {"trainer": {"step": step}, "rng": ckpt.rng_state()}, **kw)


def test_layout_manifest_and_roundtrip_with_tied_weights(tmp_path):
    m = _model(0)
    path = _save(tmp_path, 100, m, metrics={"val_loss": 2.5})
    assert path == tmp_path / "checkpoints" / "step_0000100"
    assert sorted(os.listdir(path)) == ["COMPLETE", "manifest.json", "model.safetensors", "state.pt"]
    man = json.loads((path / "manifest.json").read_text())
    assert man["step"] == 100 and man["metrics"] == {"val_loss": 2.5}
    assert set(man["files"]) == {"model.safetensors", "state.pt"}
    assert all(len(f["sha256"]) == 64 for f in man["files"].values())
    m2 = _model(1)
    state = ckpt.load_checkpoint(path, m2)
    assert state["trainer"]["step"] == 100
    for (n, a), (_, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), n
    assert m2.output.weight is m2.tok_embeddings.weight  # tie survives loading
    assert not list((tmp_path / "checkpoints").glob("*.tmp-*"))


def test_incomplete_and_tmp_dirs_are_ignored(tmp_path):
    m = _model()
    _save(tmp_path, 2, m)
    root = tmp_path / "checkpoints"
    (root / "step_0000009").mkdir()  # crashed after rename is impossible; a copy without marker must not count
    (root / "step_0000009" / "model.safetensors").write_bytes(b"junk")
    (root / "step_0000008.tmp-99999").mkdir()  # a save killed mid-write
    (root / "step_0000008.tmp-99999" / "COMPLETE").write_text("8")
    assert ckpt.find_latest(tmp_path).name == "step_0000002"
    with pytest.raises(ckpt.CheckpointError, match="COMPLETE"):
        ckpt.verify(root / "step_0000009")
    _save(tmp_path, 4, m)  # a later save cleans the leftovers
    assert sorted(p.name for p in root.iterdir()) == ["step_0000002", "step_0000004"]


@pytest.mark.parametrize("victim", ["model.safetensors", "state.pt"])
def test_corrupted_newest_falls_back(tmp_path, victim):
    m = _model(0)
    _save(tmp_path, 1, m)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)
    newest = _save(tmp_path, 2, m)
    data = bytearray((newest / victim).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (newest / victim).write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match=f"{victim}: sha256 mismatch"):
        ckpt.verify(newest)
    fresh = _model(3)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        path, state = ckpt.load_latest(tmp_path, fresh)
    assert path.name == "step_0000001" and state["trainer"]["step"] == 1
    assert any(victim in str(x.message) and "falling back" in str(x.message) for x in w)
    assert torch.equal(fresh.norm.weight, torch.ones_like(fresh.norm.weight))  # step-1 weights (before +1)


def test_truncated_file_detected(tmp_path):
    path = _save(tmp_path, 1, _model())
    f = path / "state.pt"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(ckpt.CheckpointError, match="truncated"):
        ckpt.verify(path)


def test_keep_last_and_keep_best(tmp_path):
    m = _model()
    losses = {1: 3.0, 2: 1.0, 3: 2.0, 4: 2.5, 5: 2.8}
    for s, v in losses.items():
        _save(tmp_path, s, m, metrics={"val_loss": v}, keep_last=2, keep_best=1)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_0000002", "step_0000004", "step_0000005"]
    assert ckpt.best_checkpoint(tmp_path).name == "step_0000002"


def test_resave_same_step_replaces(tmp_path):
    m = _model()
    _save(tmp_path, 3, m, metrics={"val_loss": 1.0})
    _save(tmp_path, 3, m, metrics={"val_loss": 0.5})
    assert ckpt.read_manifest(ckpt.find_latest(tmp_path))["metrics"]["val_loss"] == 0.5
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000003"]


def test_weights_only_load_and_export(tmp_path):
    m = _model(0)
    path = _save(tmp_path, 1, m)
    m2 = _model(5)
    ckpt.load_model_weights(path, m2)
    assert torch.equal(m2.tok_embeddings.weight, m.tok_embeddings.weight)
    out = ckpt.export_safetensors(m, tmp_path / "w.safetensors")
    from safetensors.torch import load_file

    sd = load_file(str(out))
    assert "output.weight" not in sd and "tok_embeddings.weight" in sd  # tied head stored once
    m3 = _model(9)
    ckpt.load_model_weights(out, m3)
    assert torch.equal(m3.layers[0].attention.wq.weight, m.layers[0].attention.wq.weight)
    with pytest.raises(ckpt.CheckpointError, match="do not match"):
        big = build_model(build_config({"model": {"preset": "tiny", "vocab_size": 64, "n_layers": 3}}).model)
        ckpt.load_model_weights(path, big)
