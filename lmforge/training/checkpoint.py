"""Crash-safe checkpoints (single-process format; multi-process runs: ``checkpoint_sharded``).

Layout of ``run_dir/checkpoints/step_0000100/``: ``model.safetensors`` (weights, canonical names),
``state.pt`` (optimizer, scheduler, RNG of torch/numpy/python/cuda, loader state, trainer counters),
``manifest.json`` (step, metrics, sha256 + size of every file), then ``COMPLETE``. Everything is written to
``step_0000100.tmp-<pid>/``, fsynced, and atomically renamed; a folder without ``COMPLETE`` (a crash mid-save)
or a ``.tmp-`` folder is never picked up. Loading verifies every checksum; ``load_latest`` falls back to the
previous complete checkpoint (with a warning naming the problem) when the newest is corrupted.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from lmforge.errors import CheckpointError

MARKER = "COMPLETE"
FORMAT_VERSION = 1
_STEP_RE = re.compile(r"^step_(\d{7,})$")


def step_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:07d}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Canonical state dict (compile/checkpoint-wrapper prefixes removed), tied tensors stored once."""
    sd = model.state_dict()
    out, seen = {}, {}
    for k, v in sd.items():
        k = k.replace("_orig_mod.", "").replace("_checkpoint_wrapped_module.", "")
        key = _storage_key(v)
        if key in seen:
            continue  # tied weight (e.g. output.weight is tok_embeddings.weight)
        seen[key] = k
        out[k] = v.detach().contiguous().cpu()
    return out


def _storage_key(v: torch.Tensor) -> tuple:
    return (v.untyped_storage().data_ptr(), v.storage_offset(), v.shape, v.dtype)


def load_model_state(model: nn.Module, sd: dict[str, torch.Tensor], path: Path) -> None:
    own = model.state_dict()
    canon = {k.replace("_orig_mod.", "").replace("_checkpoint_wrapped_module.", ""): k for k in own}
    stored = {_storage_key(own[canon[ck]]) for ck in canon if ck in sd}
    missing = []
    with torch.no_grad():
        for ck, real in canon.items():
            if ck in sd:
                own[real].copy_(sd[ck])
            elif _storage_key(own[real]) not in stored:  # a tied alias (e.g. output.weight) is stored once
                missing.append(ck)
    unexpected = sorted(set(sd) - set(canon))
    if missing or unexpected:
        raise CheckpointError(f"{path}: model weights do not match this model (missing: {missing[:5]}, "
                              f"unexpected: {unexpected[:5]}); was it saved with a different model config?")


def save_checkpoint(run_dir: str | Path, step: int, model: nn.Module, state: dict[str, Any],
                    metrics: Optional[dict] = None, keep_last: int = 2, keep_best: int = 0,
                    best_metric: str = "val_loss", best_mode: str = "min") -> Path:
    """Write checkpoint ``step`` atomically, then prune. ``state`` holds everything but the weights
    (optimizer/scheduler state dicts, rng, loader, trainer counters)."""
    from safetensors.torch import save_file

    final = step_dir(run_dir, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f"{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(model_state(model), str(tmp / "model.safetensors"), metadata={"step": str(step)})
    torch.save(state, tmp / "state.pt")
    files = {}
    for name in ("model.safetensors", "state.pt"):
        _fsync_file(tmp / name)
        files[name] = {"sha256": _sha256(tmp / name), "bytes": (tmp / name).stat().st_size}
    manifest = {"format_version": FORMAT_VERSION, "step": step, "time": time.time(), "files": files,
                "metrics": {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float))}}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    _fsync_file(tmp / "manifest.json")
    (tmp / MARKER).write_text(str(step))
    _fsync_file(tmp / MARKER)
    _fsync_dir(tmp)
    if final.exists():  # re-saving a step (e.g. a run resumed from it): swap out the old folder
        old = final.parent / f"{final.name}.old-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_dir(final.parent)
    prune(run_dir, keep_last, keep_best, best_metric, best_mode)
    return final


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_RE.match(p.name))
             and (p / MARKER).is_file()]
    return [p for _, p in sorted(found)]


def find_latest(run_dir: str | Path) -> Optional[Path]:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def read_manifest(path: Path) -> dict:
    try:
        return json.loads((path / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}/manifest.json unreadable: {e}") from None


def verify(path: str | Path) -> dict:
    """Check the marker and every file's size and sha256; returns the manifest."""
    path = Path(path)
    if not (path / MARKER).is_file():
        raise CheckpointError(f"{path}: no {MARKER} marker (the save did not finish)")
    manifest = read_manifest(path)
    for name, info in manifest["files"].items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f}: missing")
        if f.stat().st_size != info["bytes"]:
            raise CheckpointError(f"{f}: {f.stat().st_size} bytes, manifest says {info['bytes']} (truncated?)")
        if _sha256(f) != info["sha256"]:
            raise CheckpointError(f"{f}: sha256 mismatch with manifest.json (corrupted)")
    return manifest


def load_checkpoint(path: str | Path, model: nn.Module, map_location: str | torch.device = "cpu") -> dict:
    """Verify, load weights into ``model``; return the non-weight state (plus ``manifest``)."""
    from safetensors.torch import load_file

    path = Path(path)
    manifest = verify(path)
    try:
        sd = load_file(str(path / "model.safetensors"))
        state = torch.load(path / "state.pt", map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001 - any decode failure means the checkpoint is unusable
        raise CheckpointError(f"{path}: cannot be read ({type(e).__name__}: {e})") from None
    load_model_state(model, sd, path)
    state["manifest"] = manifest
    return state


def load_model_weights(path: str | Path, model: nn.Module) -> dict:
    """Weights only (for inference/export): checks the marker and the weights file's sha256 (every file's for
    a multi-process checkpoint). ``path`` may also be a bare ``.safetensors`` file. Returns the manifest
    (empty for a bare file)."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_file():
        load_model_state(model, load_file(str(path)), path)
        return {}
    if not (path / MARKER).is_file():
        raise CheckpointError(f"{path}: no {MARKER} marker (the save did not finish)")
    manifest = read_manifest(path)
    if manifest.get("format") == "dcp":  # written by a multi-process run: any layout loads into one process
        from lmforge.training import checkpoint_sharded

        checkpoint_sharded.verify_everywhere(path)
        checkpoint_sharded.load_weights(path, model)
        return manifest
    f = path / "model.safetensors"
    info = manifest["files"].get("model.safetensors")
    if not f.is_file() or info is None or _sha256(f) != info["sha256"]:
        raise CheckpointError(f"{f}: missing or sha256 mismatch with manifest.json (corrupted)")
    load_model_state(model, load_file(str(f)), path)
    return manifest


def load_latest(run_dir: str | Path, model: nn.Module, map_location="cpu") -> tuple[Optional[Path], Optional[dict]]:
    """Newest checkpoint that verifies; corrupted ones are skipped with a warning naming the problem."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return path, load_checkpoint(path, model, map_location)
        except CheckpointError as e:
            warnings.warn(f"skipping checkpoint: {e}; falling back to the previous one", stacklevel=2)
    return None, None


def prune(run_dir: str | Path, keep_last: int, keep_best: int = 0, best_metric: str = "val_loss",
          best_mode: str = "min") -> list[Path]:
    """Delete complete checkpoints beyond the newest ``keep_last`` (sparing the ``keep_best`` best by
    ``best_metric``), stale tmp folders of other processes and leftovers without a marker."""
    ckpts = list_checkpoints(run_dir)
    keep = set(ckpts[-keep_last:]) if keep_last > 0 else set()
    if keep_best > 0:
        scored = []
        for p in ckpts:
            try:
                v = read_manifest(p).get("metrics", {}).get(best_metric)
            except CheckpointError:
                continue
            if v is not None:
                scored.append((v if best_mode == "min" else -v, p))
        keep.update(p for _, p in sorted(scored, key=lambda t: t[0])[:keep_best])
    removed = [p for p in ckpts if p not in keep]
    root = Path(run_dir) / "checkpoints"
    mine = f".tmp-{os.getpid()}"
    for p in root.iterdir() if root.is_dir() else []:
        stale = (".tmp-" in p.name and not p.name.endswith(mine)) or ".old-" in p.name
        if p.is_dir() and (stale or (_STEP_RE.match(p.name) and not (p / MARKER).is_file())):
            removed.append(p)
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed


def best_checkpoint(run_dir: str | Path, metric: str = "val_loss", mode: str = "min") -> Optional[Path]:
    scored = []
    for p in list_checkpoints(run_dir):
        v = read_manifest(p).get("metrics", {}).get(metric)
        if v is not None:
            scored.append((v if mode == "min" else -v, p))
    return min(scored, key=lambda t: t[0])[1] if scored else None


def export_safetensors(model: nn.Module, out_file: str | Path, metadata: Optional[dict] = None) -> Path:
    """Weights only, canonical names (tied output head stored once), for serving / HF conversion."""
    from safetensors.torch import save_file

    out = Path(out_file)
    tmp = out.with_suffix(out.suffix + f".tmp-{os.getpid()}")
    save_file(model_state(model), str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})
    os.replace(tmp, out)
    return out
