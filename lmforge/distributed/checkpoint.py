"""Distributed checkpoints with ``torch.distributed.checkpoint`` (DCP), reshardable across world sizes and
strategies (zero3 ↔ ddp ↔ zero1 ↔ tp ↔ pp): model and optimizer state are stored under canonical FQNs.

Layout of ``<root>/step_0000123/``: DCP files (``.metadata``, ``__*.distcp``) holding ``model.*`` and
``optim.*``; ``rank_00000.pt``... (RNG, scheduler, data-loader state, extra, per rank); ``meta.json``;
``COMPLETE`` (written last). Everything goes to ``<root>/.tmp_step_0000123`` first and rank 0 renames it
after a barrier, so a crash never leaves a folder that looks complete.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from lmforge.distributed.mesh import ParallelDims

MARKER = "COMPLETE"


def _barrier(pdims: ParallelDims) -> None:
    if pdims.is_distributed and dist.is_initialized():
        dist.barrier()


def _is_zero(optimizer) -> bool:
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return isinstance(optimizer, ZeroRedundancyOptimizer)


def _canonical_names(model: nn.Module) -> dict[int, str]:
    """id(param) → canonical FQN (DDP ``module.`` and checkpoint-wrapper prefixes removed)."""
    out = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        name = name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")
        out.setdefault(id(p), name.removeprefix("module."))
    return out


def _zero_state(model: nn.Module, zero, init: bool) -> dict:
    """ZeroRedundancyOptimizer state in the FQN-keyed format of ``get_state_dict`` (this rank's shard only)."""
    local = zero.optim
    if init and not local.state:
        from torch.distributed.checkpoint.state_dict import _init_optim_state

        _init_optim_state(local)
    names = _canonical_names(model)
    state = {names[id(p)]: dict(local.state[p]) for g in local.param_groups for p in g["params"] if p in local.state}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[id(p)] for p in g["params"]]}
              for g in zero.param_groups]
    return {"state": state, "param_groups": groups}


def _load_zero_state(model: nn.Module, zero, sd: dict) -> None:
    local = zero.optim
    names = _canonical_names(model)
    by_name: dict[str, nn.Parameter] = {}
    for p in model.parameters():
        by_name.setdefault(names[id(p)], p)
    for name, st in sd["state"].items():
        slot = local.state[by_name[name]]
        for k, v in st.items():
            if isinstance(slot.get(k), torch.Tensor) and isinstance(v, torch.Tensor):
                slot[k].copy_(v)
            else:
                slot[k] = v
    for g_live, g_saved in zip(zero.param_groups, sd["param_groups"]):
        g_live.update({k: v for k, v in g_saved.items() if k != "params"})  # synced to the shard on step()


def _model_optim_state(model: nn.Module, optimizer, init: bool) -> dict:
    if optimizer is not None and _is_zero(optimizer):
        msd, _ = get_state_dict(model, [])
        return {"model": msd, "optim": _zero_state(model, optimizer, init)}
    if optimizer is None:
        msd, _ = get_state_dict(model, [])
        return {"model": msd}
    msd, osd = get_state_dict(model, optimizer)
    return {"model": msd, "optim": osd}


def _rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:07d}"


def save_checkpoint(root: str | Path, step: int, model: nn.Module, optimizer=None, scheduler=None,
                    loader_state: Optional[dict] = None, pdims: Optional[ParallelDims] = None,
                    extra: Optional[dict] = None, keep_last: Optional[int] = None) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint folder."""
    pdims = pdims or ParallelDims(1, 1, 1, 1, 1)
    final, tmp = step_dir(root, step), Path(root) / f".tmp_step_{step:07d}"
    if pdims.is_rank0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier(pdims)
    dcp.save(_model_optim_state(model, optimizer, init=False), checkpoint_id=str(tmp))
    torch.save({"rng": _rng_state(), "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "loader": loader_state, "extra": extra or {}}, tmp / f"rank_{pdims.rank:05d}.pt")
    _barrier(pdims)
    if pdims.is_rank0:
        meta = {"step": step, "world_size": pdims.world_size, "strategy": pdims.strategy,
                "dims": {k: getattr(pdims, k) for k in ("dp_replicate", "dp_shard", "tp", "pp")},
                "has_optimizer": optimizer is not None, "time": time.time()}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        (tmp / MARKER).write_text("ok\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if keep_last:
            for old in list_checkpoints(root)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier(pdims)
    return final


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step_*") if (p / MARKER).is_file()]
    return sorted(done, key=lambda p: int(p.name.split("_")[1]))


def find_latest(root: str | Path) -> Optional[Path]:
    ckpts = list_checkpoints(root)
    return ckpts[-1] if ckpts else None


def load_checkpoint(path: str | Path, model: nn.Module, optimizer=None, scheduler=None,
                    pdims: Optional[ParallelDims] = None, restore_rng: bool = True) -> dict[str, Any]:
    """Collective. Loads into the (already parallelized) model/optimizer, whatever layout it was saved with.
    Returns ``{"step", "loader", "extra", "resharded", "meta"}``; ``loader`` is this rank's loader state when
    the world size is unchanged, else rank 0's (loaders resume from a global sample count)."""
    pdims = pdims or ParallelDims(1, 1, 1, 1, 1)
    path = Path(path)
    if not (path / MARKER).is_file():
        raise FileNotFoundError(f"{path} is not a complete lmforge checkpoint (no {MARKER} marker)")
    meta = json.loads((path / "meta.json").read_text())
    if optimizer is not None and not meta.get("has_optimizer", True):
        raise ValueError(f"{path} holds no optimizer state (saved without one); load with optimizer=None")
    state = _model_optim_state(model, optimizer, init=True)
    dcp.load(state, checkpoint_id=str(path))
    if optimizer is not None and _is_zero(optimizer):
        set_state_dict(model, [], model_state_dict=state["model"], optim_state_dict={})
        _load_zero_state(model, optimizer, state["optim"])
    elif optimizer is not None:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    else:
        set_state_dict(model, [], model_state_dict=state["model"], optim_state_dict={})
    same_world = meta["world_size"] == pdims.world_size
    own = path / f"rank_{pdims.rank:05d}.pt"
    per_rank = torch.load(own if same_world and own.exists() else path / "rank_00000.pt", weights_only=False)
    if scheduler is not None and per_rank["scheduler"] is not None:
        scheduler.load_state_dict(per_rank["scheduler"])
    if restore_rng and same_world:
        _set_rng_state(per_rank["rng"])
    return {"step": meta["step"], "loader": per_rank["loader"], "extra": per_rank["extra"],
            "resharded": not same_world or meta["dims"] != {k: getattr(pdims, k) for k in meta["dims"]},
            "meta": meta}


def consolidate(ckpt_dir: str | Path, out_file: str | Path) -> Path:
    """Merge a (sharded) checkpoint's model weights into one safetensors file (single process). Accepts this
    module's layout and ``lmforge train`` checkpoints of any world size."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    ckpt_dir, out_file = Path(ckpt_dir), Path(out_file)
    if not (ckpt_dir / MARKER).is_file():
        raise FileNotFoundError(f"{ckpt_dir} is not a complete lmforge checkpoint (no {MARKER} marker)")
    if (ckpt_dir / "manifest.json").is_file():  # a `lmforge train` checkpoint (either world size)
        from lmforge.training import checkpoint_sharded

        manifest = checkpoint_sharded.verify_everywhere(ckpt_dir)
        out_file.parent.mkdir(parents=True, exist_ok=True)
        if manifest.get("format") != "dcp":
            shutil.copyfile(ckpt_dir / "model.safetensors", out_file)
            return out_file
        tensors = checkpoint_sharded.full_weights(ckpt_dir)
        tied = "output.weight" in tensors and torch.equal(tensors["output.weight"], tensors["tok_embeddings.weight"])
        return checkpoint_sharded.export_from_checkpoint(ckpt_dir, out_file, tied=tied)
    tmp = out_file.with_suffix(".tmp.pt")
    try:
        dcp_to_torch_save(ckpt_dir, tmp)
        full = torch.load(tmp, weights_only=False)
    finally:
        tmp.unlink(missing_ok=True)
    tensors = {k: v.detach().contiguous().clone() for k, v in full["model"].items() if isinstance(v, torch.Tensor)}
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_file), metadata={"format": "pt", "source": str(ckpt_dir)})
    return out_file
