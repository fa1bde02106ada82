"""Sharded checkpoints for world size > 1, in the same run layout as single-process ones, and loading of
either format at any world size.

``run_dir/checkpoints/step_0000100/`` of a multi-process run holds DCP files (``.metadata``,
``__*.distcp``: ``model.<fqn>`` and flattened ``optim.state.<fqn>.*`` / ``optim.param_groups.<fqn>.*``
under canonical names, so any strategy / world size can load them), ``trainer.pt`` (scheduler, counters,
early stopping, loss scaler), ``rank_00000.pt``... (each rank's RNG and loader state), ``manifest.json``
(``"format": "dcp"``, world size, dims, metrics, sha256 + size of every file) and ``COMPLETE``. As for
single-process saves: written to ``step_N.tmp-<pid>/``, marker last, atomic rename, ``prune`` afterwards;
hashing and verification are spread over the ranks.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)

from lmforge.training import checkpoint as ckpt
from lmforge.training.checkpoint import CheckpointError

FLAT = StateDictOptions(flatten_optimizer_state_dict=True)


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if _dist() else (0, 1)


def _gather(obj) -> list:
    if not _dist():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _barrier() -> None:
    if _dist():
        dist.barrier()


def is_sharded(path: Path) -> bool:
    return ckpt.read_manifest(path).get("format") == "dcp"


# ----------------------------------------------------------------------------- model/optimizer state

def _is_zero(optimizer) -> bool:
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return isinstance(optimizer, ZeroRedundancyOptimizer)


def _names(model: nn.Module) -> dict[int, str]:
    from lmforge.distributed.checkpoint import _canonical_names

    return _canonical_names(model)


def _zero_flat(model: nn.Module, zero, init: bool) -> dict:
    """ZeroRedundancyOptimizer state (this rank's partition) in ``get_state_dict``'s flattened format."""
    local = zero.optim
    if init and not local.state:
        from torch.distributed.checkpoint.state_dict import _init_optim_state

        _init_optim_state(local)
    names, out = _names(model), {}
    for p, st in local.state.items():
        for k, v in st.items():
            out[f"state.{names[id(p)]}.{k}"] = v
    for g in zero.param_groups:
        for p in g["params"]:
            for k, v in g.items():
                if k != "params":
                    out[f"param_groups.{names[id(p)]}.{k}"] = v
    return out


def _load_zero_flat(model: nn.Module, zero, flat: dict) -> None:
    names = _names(model)
    for p, st in zero.optim.state.items():
        for k in list(st):
            v = flat[f"state.{names[id(p)]}.{k}"]
            if isinstance(st[k], torch.Tensor) and isinstance(v, torch.Tensor):
                st[k].copy_(v)
            else:
                st[k] = v
    for g in zero.param_groups:
        for k in list(g):
            key = f"param_groups.{names[id(g['params'][0])]}.{k}" if g["params"] else None
            if k != "params" and key in flat:
                g[k] = flat[key]


def model_optim_state(model: nn.Module, optimizer, init: bool = False) -> dict:
    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    if _is_zero(optimizer):
        return {"model": get_model_state_dict(model), "optim": _zero_flat(model, optimizer, init)}
    msd, osd = get_state_dict(model, optimizer, options=FLAT)
    return {"model": msd, "optim": osd}


def _load_dcp(path: Path, model: nn.Module, optimizer) -> None:
    """Load model (and optimizer) state from a DCP checkpoint into the live (sharded) objects."""
    state = model_optim_state(model, optimizer, init=True)
    saved = set(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)
    want = {"model": state["model"]}
    if optimizer is not None:
        # hyper-parameters the saving optimizer did not have keep their live values
        want["optim"] = {k: v for k, v in state["optim"].items()
                         if not k.startswith("param_groups.") or f"optim.{k}" in saved}
        missing = [k for k in want["optim"] if k.startswith("state.") and f"optim.{k}" not in saved]
        if missing:
            raise CheckpointError(f"{path}: no optimizer state for {missing[:3]} (saved with another optimizer?)")
    dcp.load(want, checkpoint_id=str(path))
    if optimizer is None:
        set_model_state_dict(model, want["model"])
    elif _is_zero(optimizer):
        set_model_state_dict(model, want["model"])
        _load_zero_flat(model, optimizer, want["optim"])
    else:
        set_state_dict(model, optimizer, model_state_dict=want["model"],
                       optim_state_dict={**state["optim"], **want["optim"]}, options=FLAT)


def _load_single_into_sharded(path: Path, state: dict, model: nn.Module, optimizer) -> None:
    """A single-process checkpoint (full tensors, int-keyed optimizer state) into a sharded model/optimizer."""
    from safetensors.torch import load_file

    full = load_file(str(path / "model.safetensors"))
    live = get_model_state_dict(model)
    if "output.weight" in live and "output.weight" not in full:
        full["output.weight"] = full["tok_embeddings.weight"]  # tied head stored once
    missing = sorted(set(live) - set(full))
    if missing:
        raise CheckpointError(f"{path}: model weights do not match this model (missing: {missing[:5]})")
    full = {k: full[k] for k in live}  # a pipeline stage takes its own part
    osd = state["optimizer"]
    flat = {}
    for g in osd["param_groups"]:
        names = g.get("param_names")
        if names is None:
            raise CheckpointError(f"{path}: optimizer state has no parameter names; cannot reshard it")
        for i, name in zip(g["params"], names):
            name = name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")
            if name not in live:
                continue
            for k, v in osd["state"].get(i, {}).items():
                flat[f"state.{name}.{k}"] = v
            for k, v in g.items():
                if k not in ("params", "param_names"):
                    flat[f"param_groups.{name}.{k}"] = v
    if _is_zero(optimizer):
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True))
        model_optim_state(model, optimizer, init=True)
        _load_zero_flat(model, optimizer, flat)
        return
    cur = model_optim_state(model, optimizer, init=True)["optim"]
    opts = StateDictOptions(full_state_dict=True, flatten_optimizer_state_dict=True)
    flat = {**{k: v for k, v in cur.items() if k.startswith("param_groups.")}, **flat}
    set_state_dict(model, optimizer, model_state_dict=full, optim_state_dict=flat, options=opts)


# ----------------------------------------------------------------------------- save

def _hash_share(folder: Path, rank: int, world: int) -> dict:
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name not in ("manifest.json", ckpt.MARKER))
    out = {}
    for i, name in enumerate(names):
        if i % world == rank:
            f = folder / name
            ckpt._fsync_file(f)
            out[name] = {"sha256": ckpt._sha256(f), "bytes": f.stat().st_size}
    return out


def save_sharded(run_dir: str | Path, step: int, model: nn.Module, optimizer, shared: dict, own: dict, pdims,
                 metrics: Optional[dict] = None, keep_last: int = 2, keep_best: int = 0,
                 best_metric: str = "val_loss", best_mode: str = "min") -> Path:
    """Collective. ``shared``: state every rank holds alike (written by rank 0); ``own``: this rank's."""
    rank, world = _rank_world()
    final = ckpt.step_dir(run_dir, step)
    box = [None]
    if rank == 0:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f"{final.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        box = [str(tmp)]
    if _dist():
        dist.broadcast_object_list(box, src=0)
    tmp = Path(box[0])
    dcp.save(model_optim_state(model, optimizer), checkpoint_id=str(tmp))
    torch.save(own, tmp / f"rank_{rank:05d}.pt")
    if rank == 0:
        torch.save(shared, tmp / "trainer.pt")
    _barrier()
    files: dict = {}
    for part in _gather(_hash_share(tmp, rank, world)):
        files.update(part)
    if rank == 0:
        manifest = {"format_version": ckpt.FORMAT_VERSION, "format": "dcp", "step": step, "time": time.time(),
                    "world_size": world, "strategy": pdims.strategy,
                    "dims": {k: getattr(pdims, k) for k in ("dp_replicate", "dp_shard", "tp", "pp")},
                    "files": dict(sorted(files.items())),
                    "metrics": {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float))}}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        ckpt._fsync_file(tmp / "manifest.json")
        (tmp / ckpt.MARKER).write_text(str(step))
        ckpt._fsync_file(tmp / ckpt.MARKER)
        ckpt._fsync_dir(tmp)
        if final.exists():
            old = final.parent / f"{final.name}.old-{os.getpid()}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        ckpt._fsync_dir(final.parent)
        ckpt.prune(run_dir, keep_last, keep_best, best_metric, best_mode)
    _barrier()
    return final


# ----------------------------------------------------------------------------- load

def verify_everywhere(path: str | Path) -> dict:
    """Collective ``verify``: each rank checks a share of the files; every rank raises the same error."""
    path = Path(path)
    rank, world = _rank_world()
    err, manifest = None, {}
    try:
        if not (path / ckpt.MARKER).is_file():
            raise CheckpointError(f"{path}: no {ckpt.MARKER} marker (the save did not finish)")
        manifest = ckpt.read_manifest(path)
        for i, (name, info) in enumerate(sorted(manifest["files"].items())):
            if i % world != rank:
                continue
            f = path / name
            if not f.is_file():
                raise CheckpointError(f"{f}: missing")
            if f.stat().st_size != info["bytes"]:
                raise CheckpointError(f"{f}: {f.stat().st_size} bytes, manifest says {info['bytes']} (truncated?)")
            if ckpt._sha256(f) != info["sha256"]:
                raise CheckpointError(f"{f}: sha256 mismatch with manifest.json (corrupted)")
    except CheckpointError as e:
        err = str(e)
    errors = [e for e in _gather(err) if e]
    if errors:
        raise CheckpointError(errors[0])
    return manifest


def load_any(path: str | Path, model: nn.Module, optimizer, master=None, map_location="cpu") -> dict:
    """Collective. Load a checkpoint of either format, saved at any world size / strategy, into the live
    (possibly sharded) model and optimizer. Returns the rest of the state (scheduler, loader, trainer,
    early_stop, scaler, rng, manifest); RNG and loader are this rank's when the world size is unchanged,
    else rank 0's (loaders continue from the global sample count)."""
    path = Path(path)
    manifest = verify_everywhere(path)
    rank, world = _rank_world()
    try:
        if manifest.get("format") != "dcp":
            state = torch.load(path / "state.pt", map_location=map_location, weights_only=False)
            if master is not None:
                raise CheckpointError(f"{path}: bf16 master weights resume only through the single-process path")
            _load_single_into_sharded(path, state, model, optimizer)
            state["manifest"] = manifest
            return state
        if master is not None:
            raise CheckpointError(f"{path}: a multi-process checkpoint cannot restore training.param_dtype="
                                  "bfloat16 master weights; resume with param_dtype=float32")
        _load_dcp(path, model, optimizer)
        shared = torch.load(path / "trainer.pt", map_location=map_location, weights_only=False)
        own = path / f"rank_{rank:05d}.pt"
        same = manifest.get("world_size") == world and own.is_file()
        mine = torch.load(own if same else path / "rank_00000.pt", map_location=map_location, weights_only=False)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - any decode failure means the checkpoint is unusable
        raise CheckpointError(f"{path}: cannot be read ({type(e).__name__}: {e})") from None
    return {**shared, "rng": mine["rng"], "loader": mine["loader"], "manifest": manifest}


def load_latest_any(run_dir: str | Path, model: nn.Module, optimizer, master=None, map_location="cpu"):
    """Newest checkpoint that verifies (all ranks agree); corrupted ones are skipped with a warning."""
    import warnings

    for path in reversed(ckpt.list_checkpoints(run_dir)):
        try:
            return path, load_any(path, model, optimizer, master, map_location)
        except CheckpointError as e:
            warnings.warn(f"skipping checkpoint: {e}; falling back to the previous one", stacklevel=2)
    return None, None


def load_weights(path: str | Path, model: nn.Module) -> None:
    """Weights of a DCP checkpoint into a plain (single-process) model, whatever layout saved them."""
    path = Path(path)
    msd = get_model_state_dict(model)
    try:
        dcp.load({"model": msd}, checkpoint_id=str(path))
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: model weights do not match this model ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:300]})") from None
    set_model_state_dict(model, msd)


def full_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Every model tensor of a DCP checkpoint as full tensors (canonical names), read by this process alone
    (no collective, so rank 0 can call it inside a job)."""
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    reader = dcp.FileSystemReader(str(path))
    keys = {k for k in reader.read_metadata().state_dict_metadata if k.startswith("model.")}
    sd: dict = {}
    _load_state_dict(sd, storage_reader=reader, planner=_EmptyStateDictLoadPlanner(keys=keys), no_dist=True)
    flat = sd["model"] if isinstance(sd.get("model"), dict) else {k.removeprefix("model."): v for k, v in sd.items()}
    return {k: v.detach().contiguous() for k, v in flat.items() if isinstance(v, torch.Tensor)}


def export_from_checkpoint(path: str | Path, out_file: str | Path, tied: bool) -> Path:
    """Final ``model.safetensors`` of a multi-process run from its last checkpoint (rank 0 only)."""
    from safetensors.torch import save_file

    tensors = full_weights(path)
    for name in (["output.weight"] if tied is True else tied or []):
        tensors.pop(name, None)  # tied aliases are stored once, as in single-process exports
    out = Path(out_file)
    tmp = out.with_suffix(out.suffix + f".tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"step": str(ckpt.read_manifest(Path(path))["step"])})
    os.replace(tmp, out)
    return out
