"""State of the live objects under canonical names, independent of the parallel layout.

Model entries are ``get_model_state_dict`` (canonical FQNs: no ``module.`` / ``_orig_mod.`` /
``_checkpoint_wrapped_module.``; DTensors under FSDP2 / TP; this stage's part under pp), minus the aliases of
tied weights (``output.weight`` of a tied head is stored once, as ``tok_embeddings.weight``). Optimizer entries
are flattened per parameter: ``state.<fqn>.<key>`` (tensors shaped like the parameter, sharded like it) and
``param_groups.<fqn>.<hyper-parameter>``; the same flattening serves torch optimizers, the ZeRO-1
``ZeroRedundancyOptimizer`` (this rank's partition of the state; every group) and optimizers over bf16
master copies (parameters named by their groups' ``param_names``). Any layout can therefore fill any
other: ``fill`` copies a full tensor into a live (possibly sharded) one.
"""

from __future__ import annotations

import random
import sys
import warnings
from typing import Callable, Mapping, Optional

import numpy as np
import torch
from torch import nn

from lmforge.errors import CheckpointError

ModelFilter = Callable[[str, torch.Tensor], bool]
_WRAPPERS = ("_orig_mod.", "_checkpoint_wrapped_module.")


class RNGState:
    """Stateful of the process's generators: torch, numpy, python (and every CUDA device when present)."""

    def state_dict(self) -> dict:
        st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            st["cuda"] = torch.cuda.get_rng_state_all()
        return st

    def load_state_dict(self, st: dict) -> None:
        torch.set_rng_state(st["torch"])
        np.random.set_state(st["numpy"])
        random.setstate(st["python"])
        if "cuda" in st and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(st["cuda"])


class DictState:
    """Stateful view of a plain dict (e.g. the trainer's counters): loading updates it in place."""

    def __init__(self, data: dict):
        self.data = data

    def state_dict(self) -> dict:
        return dict(self.data)

    def load_state_dict(self, st: dict) -> None:
        self.data.update(st)


def canonical(name: str) -> str:
    for w in _WRAPPERS:
        name = name.replace(w, "")
    return name.removeprefix("module.")


def _is_dtensor(t) -> bool:  # without importing torch.distributed.tensor (~1 s) where no DTensor can exist
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


def aliases(entries: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Entry → the earlier entry it shares storage with (tied weights)."""
    first: dict[tuple, str] = {}
    out = {}
    for k, v in entries.items():
        loc = v.to_local() if _is_dtensor(v) else v
        key = None if loc.is_meta or not loc.numel() else \
            (loc.untyped_storage().data_ptr(), loc.storage_offset(), tuple(loc.shape))
        if key is not None and first.setdefault(key, k) != k:
            out[k] = first[key]
    return out


def model_entries(model: nn.Module, model_filter: Optional[ModelFilter] = None) -> tuple[dict, list[str]]:
    """(this rank's entries, minus tied aliases and what ``model_filter`` rejects; every entry name)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    sd = get_model_state_dict(model)
    tied = aliases(sd)
    return {k: v for k, v in sd.items() if k not in tied and (model_filter is None or model_filter(k, v))}, list(sd)


def _inner(optimizer):
    """The optimizer holding the state: ZeRO-1's local one (its partition), else the optimizer itself."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return optimizer.optim if isinstance(optimizer, ZeroRedundancyOptimizer) else optimizer


def _param_names(model: nn.Module, optimizer) -> dict[int, str]:
    names: dict[int, str] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), canonical(n))
    for g in optimizer.param_groups:  # an optimizer over master copies names them in its groups
        for p, n in zip(g["params"], g.get("param_names", ())):
            names.setdefault(id(p), canonical(n))
    return names


def optim_entries(model: nn.Module, optimizer, init: bool = False) -> dict:
    """Flattened optimizer state; ``init`` first creates the state of a fresh optimizer (a zero step)."""
    from torch.distributed.checkpoint.state_dict import _init_optim_state

    local = _inner(optimizer)
    if init and not local.state:
        _init_optim_state(local)
    names, out = _param_names(model, optimizer), {}
    try:
        for p, st in local.state.items():
            out.update({f"state.{names[id(p)]}.{k}": v for k, v in st.items()})
        for g in optimizer.param_groups:
            for p in g["params"]:
                out.update({f"param_groups.{names[id(p)]}.{k}": v for k, v in g.items()
                            if k not in ("params", "param_names")})
    except KeyError:
        raise CheckpointError("the optimizer steps a tensor that is not a parameter of the model and has no "
                              "param_names entry in its group; it cannot be checkpointed by name") from None
    return out


def fill(dest: torch.Tensor, full: torch.Tensor) -> None:
    """Copy the full tensor ``full`` into ``dest`` (plain, or a DTensor: its local shard)."""
    with torch.no_grad():
        if _is_dtensor(dest):
            from torch.distributed.tensor import distribute_tensor

            src = distribute_tensor(full.to(dest.device, dest.dtype), dest.device_mesh, dest.placements,
                                    src_data_rank=None)  # every rank slices its own shard, no communication
            dest.to_local().copy_(src.to_local())
        else:
            dest.copy_(full)


def put_optim(model: nn.Module, optimizer, flat: Mapping) -> None:
    """Write flattened values (loaded in place, or full tensors) back into the live optimizer."""
    local = _inner(optimizer)
    names = _param_names(model, optimizer)
    for p, st in local.state.items():
        for k in list(st):
            v = flat[f"state.{names[id(p)]}.{k}"]
            if isinstance(st[k], torch.Tensor) and isinstance(v, torch.Tensor):
                if v is not st[k]:
                    fill(st[k], v)
            else:
                st[k] = v
    for g in optimizer.param_groups:  # ZeRO-1 syncs its groups to the partition on step()
        for k in [k for k in g if k not in ("params", "param_names")]:
            key = f"param_groups.{names[id(g['params'][0])]}.{k}" if g["params"] else None
            if key in flat:
                g[k] = flat[key]


def check_model(model: nn.Module, saved: Mapping[str, tuple], where: str, comm,
                model_filter: Optional[ModelFilter] = None) -> dict[str, torch.Tensor]:
    """The live entries to fill from ``saved`` (name → shape), after checking on every rank (collective with a
    collective ``comm``) that nothing is missing, no shape differs and every saved tensor has a home
    somewhere (a pipeline stage holds only its part). Raises one ``CheckpointError`` naming the tensors."""
    live, names = model_entries(model, model_filter)
    missing = [k for k in live if k not in saved]
    shapes = [f"{k} {tuple(saved[k])} in the checkpoint, {tuple(live[k].shape)} in the model"
              for k in live if k in saved and tuple(saved[k]) != tuple(live[k].shape)]
    parts = comm.gather((missing, shapes, names))
    known = {k for _, _, names in parts for k in names}
    problems = {"missing from the checkpoint": [k for m, _, _ in parts for k in m],
                "shape": [x for _, s, _ in parts for x in s],
                "not in the model": sorted(k for k in saved if k not in known)}
    text = [f"{what}: {'; '.join(dict.fromkeys(names[:8]))}{' ...' if len(names) > 8 else ''}"
            for what, names in problems.items() if names]
    if text:
        raise CheckpointError(f"{where}: model weights do not match this model ({' | '.join(text)}); was it "
                              "saved with a different model config?")
    return live


# ----------------------------------------------------------------------------- DCP files


def dcp_io(op: str, state: dict, folder, collective: bool) -> None:
    """``dcp.save`` / ``dcp.load`` (in place, resharding as needed) of ``state``; collective over the default
    group if asked, else by this process alone."""
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():  # DCP warns on every process-local call, even when asked for one
        warnings.filterwarnings("ignore", message=".*assuming the intent is to (save|load) in a single process")
        getattr(dcp, op)(state, checkpoint_id=str(folder), no_dist=not collective)


def read_pt(path, map_location="cpu"):
    """A ``torch.save`` file of a verified checkpoint; a decode failure is a ``CheckpointError``."""
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001 - any decode failure makes the checkpoint unusable
        raise CheckpointError(f"{path}: cannot be read ({type(e).__name__}: {e})") from None


def dcp_entries(folder) -> dict:
    """Saved key (``model.<fqn>``, ``optim.state.<fqn>.<key>``, ...) → its metadata."""
    import torch.distributed.checkpoint as dcp

    return dict(dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata)


def dcp_read(folder, prefix: str) -> dict:
    """Every saved entry under ``prefix`` (``"model"`` / ``"optim"``) as full tensors / objects, read by this
    process alone (no collective: rank 0 may call it inside a job)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    want = {k[len(prefix) + 1:]: torch.empty(m.size, dtype=m.properties.dtype)
            if isinstance(m, TensorStorageMetadata) else None
            for k, m in dcp_entries(folder).items() if k.startswith(prefix + ".")}
    dcp_io("load", {prefix: want}, folder, collective=False)
    return want
