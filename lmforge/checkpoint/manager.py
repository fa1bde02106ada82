"""``CheckpointManager``: handed every resumable object once; the loop calls only ``save(step)`` and ``load()``.

A checkpoint folder (``folder.py`` writes it) holds:
- the model and optimizer through DCP (``.metadata``, ``__<rank>_0.distcp``: ``model.<fqn>`` and
  ``optim.state.<fqn>.<key>`` / ``optim.param_groups.<fqn>.<key>``, see ``state.py``), or, with a DeepSpeed
  ``engine``, whatever ``engine.save_checkpoint(folder)`` writes (manifest ``"format": "deepspeed"``);
- ``trainer.pt``: ``{name: state_dict()}`` of the ``shared`` objects (identical on every rank; rank 0 writes);
- ``rank_XXXXX.pt``: ``{name: state_dict()}`` of each rank's ``per_rank`` objects (RNG, loader position);
- ``manifest.json`` (format_version 2, format, step, time, world_size, strategy, dims, files, metrics).

Loading reshards: DCP maps saved shards onto the live layout by canonical name (any strategy, any world
size), the shared states are the same everywhere, and each rank reads its own rank file when the world size
is unchanged, else rank 0's (loaders continue from the global sample count). The pre-refactor single-process
folders (``legacy.py``) and DCP folders (format_version 1: the same layout) load the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from lmforge.checkpoint import state as st
from lmforge.checkpoint.folder import Comm, newest_valid, problem, read_manifest, write_folder
from lmforge.checkpoint.legacy import read_single
from lmforge.errors import CheckpointError

DIMS = ("dp_replicate", "dp_shard", "tp", "pp")


class CheckpointManager:
    """Saves and restores ``model`` (+ ``optimizer``), the ``shared`` and the ``per_rank`` Statefuls
    (``state_dict()`` / ``load_state_dict(sd)``; ``None`` entries are skipped) under ``run_dir/checkpoints``.

    ``pdims``: the run's ``ParallelDims``; with world size > 1 ``save`` and ``load`` are collective over the
    default process group. ``None`` (or world size 1): this process alone, even inside a job.
    ``model_filter(name, tensor)``: which model entries are saved / expected (None: all).
    ``engine``: a DeepSpeed adapter whose ``save_checkpoint(folder)`` / ``load_checkpoint(folder)`` write /
    read model and optimizer inside the folder (``model`` and ``optimizer`` are then not touched)."""

    def __init__(self, run_dir: str | Path, *, model, optimizer=None, shared: Mapping[str, Any] = {},  # noqa: B006
                 per_rank: Mapping[str, Any] = {}, keep_last: int = 2, keep_best: int = 0,  # noqa: B006
                 best_metric: str = "val_loss", best_mode: str = "min", model_filter=None, engine=None,
                 pdims=None):
        self.run_dir, self.model, self.optimizer, self.engine = Path(run_dir), model, optimizer, engine
        self.shared, self.per_rank, self.model_filter, self.pdims = dict(shared), dict(per_rank), model_filter, pdims
        self.prune_kw = dict(keep_last=keep_last, keep_best=keep_best, best_metric=best_metric, best_mode=best_mode)
        self.comm = Comm(collective=pdims is not None and pdims.world_size > 1)
        self.last_saved: Optional[Path] = None
        self.loaded_manifest: Optional[dict] = None

    # ------------------------------------------------------------------------------------------- save
    def save(self, step: int, metrics: Optional[dict] = None) -> Path:
        """Collective. Writes ``checkpoints/step_<step>`` by the folder protocol, then prunes."""
        pd = self.pdims
        manifest = {"format": "dcp" if self.engine is None else "deepspeed", "world_size": self.comm.size,
                    "strategy": pd.strategy if pd is not None and pd.world_size > 1 else "single",
                    "dims": {k: getattr(pd, k) if pd is not None else 1 for k in DIMS},
                    "metrics": {k: v for k, v in (metrics or {}).items()
                                if isinstance(v, (int, float)) and not isinstance(v, bool)}}
        self.last_saved = write_folder(self.run_dir, step, self._write, manifest, self.comm, self.prune_kw)
        return self.last_saved

    def _write(self, tmp: Path) -> None:
        if self.engine is not None:
            self.engine.save_checkpoint(tmp)
        else:
            state = {"model": st.model_entries(self.model, self.model_filter)[0]}
            if self.optimizer is not None:
                state["optim"] = st.optim_entries(self.model, self.optimizer)
            st.dcp_io("save", state, tmp, self.comm.on)
        torch.save(_states(self.per_rank), tmp / f"rank_{self.comm.rank:05d}.pt")
        if self.comm.rank == 0:
            torch.save(_states(self.shared), tmp / "trainer.pt")

    # ------------------------------------------------------------------------------------------- load
    def load(self, spec: str | Path | None) -> Optional[Path]:
        """Collective. ``None``/"": nothing; ``"auto"``: the newest checkpoint that verifies (None when the run
        has none; ``CheckpointError`` listing each when none verifies); a path: exactly that checkpoint.
        Restores every object in place and returns the folder."""
        if spec is None or str(spec) == "":
            return None
        if str(spec) == "auto":
            folder = newest_valid(self.run_dir, self.comm)
            if folder is None:
                return None
        else:
            folder = Path(spec)
            why = problem(folder, self.comm)
            if why:
                raise CheckpointError(f"cannot resume from {spec}: {why}")
        manifest = read_manifest(folder)
        fmt = manifest.get("format")
        if manifest.get("format_version") == 0:
            raise CheckpointError(f"{folder}: an old {fmt} checkpoint without a manifest cannot resume a run "
                                  "(its weights can be read: `lmforge checkpoint consolidate`)")
        if (fmt == "deepspeed") != (self.engine is not None):
            engine = "deepspeed" if fmt == "deepspeed" else "native"
            raise CheckpointError(f"{folder}: written by the {engine} engine; resume it with "
                                  f"distributed.engine={engine}")
        shared, mine = self._load_legacy(folder) if fmt is None else self._load_current(folder, manifest)
        _restore(self.shared, shared, folder / ("state.pt" if fmt is None else "trainer.pt"))
        _restore(self.per_rank, mine, folder / ("state.pt" if fmt is None else "rank files"))
        self.loaded_manifest = manifest
        return folder

    def _load_current(self, folder: Path, manifest: dict) -> tuple[dict, dict]:
        if self.engine is not None:
            self.engine.load_checkpoint(folder)
        else:
            self._load_dcp(folder)
        own = folder / f"rank_{self.comm.rank:05d}.pt"
        same = manifest.get("world_size") == self.comm.size and own.is_file()
        return st.read_pt(folder / "trainer.pt"), st.read_pt(own if same else folder / "rank_00000.pt")

    def _load_dcp(self, folder: Path) -> None:
        saved = st.dcp_entries(folder)
        shapes = {k[len("model."):]: tuple(m.size) for k, m in saved.items()
                  if k.startswith("model.") and hasattr(m, "size")}
        want: dict = {"model": st.check_model(self.model, shapes, str(folder), self.comm, self.model_filter)}
        if self.optimizer is not None:
            want["optim"] = self._live_optim(folder, {k[len("optim."):] for k in saved if k.startswith("optim.")})
        st.dcp_io("load", want, folder, self.comm.on)
        if self.optimizer is not None:
            st.put_optim(self.model, self.optimizer, want["optim"])

    def _load_legacy(self, folder: Path) -> tuple[dict, dict]:
        weights, flat, shared, mine = read_single(folder)
        shapes = {k: tuple(v.shape) for k, v in weights.items()}
        for k, v in st.check_model(self.model, shapes, str(folder), self.comm, self.model_filter).items():
            st.fill(v, weights[k])
        if self.optimizer is not None:
            live = self._live_optim(folder, set(flat or ()))
            st.put_optim(self.model, self.optimizer, {k: flat[k] for k in live})
        return shared, mine

    def _live_optim(self, folder: Path, saved: set) -> dict:
        """The live optimizer's flattened entries that the checkpoint holds (``saved``: its optimizer keys),
        the state created first when the checkpoint has some; every rank checks that each state tensor has a
        saved value."""
        has_state = any(k.startswith("state.") for k in saved)
        flat = st.optim_entries(self.model, self.optimizer, init=has_state) if saved else {}
        missing = [k for k in flat if k.startswith("state.") and k not in saved]
        self.comm.agree(f"{folder}: holds no optimizer state (saved without an optimizer)" if not saved else
                        f"{folder}: no optimizer state for {', '.join(missing[:4])} (saved with another "
                        "optimizer?)" if missing else None)
        return {k: v for k, v in flat.items() if k in saved}


def _states(objs: Mapping[str, Any]) -> dict:
    return {name: obj.state_dict() for name, obj in objs.items() if obj is not None}


def _restore(objs: Mapping[str, Any], saved: dict, where: Path) -> None:
    for name, obj in objs.items():
        if obj is None:
            continue
        if name not in saved:
            raise CheckpointError(f"{where}: holds no {name!r} state, which this run has (saved by a run "
                                  f"configured differently?)")
        if saved[name] is not None:  # e.g. early stopping or loss scaling that the saving run did not use
            obj.load_state_dict(saved[name])
