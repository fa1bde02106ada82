"""What fine-tuning adds to the one step and loop when it runs data parallel (ddp / zero2 / zero3).

The step itself (loss normalised over the global batch, clipping, the agreed finite check) is the training
spine's (``training/step.py``); the rows of each global batch are split per rank by ``data.TaskBatches`` (every
rank builds the same global batches as one process). What stays here is fine-tuning specific:

- ``start(cfg)``: the run's ``ParallelDims`` (world size 1 without a launcher; under torchrun, or in ranks whose
  process group a caller initialised, it joins the group); ``training_view`` for ``parallelize_model``.
- ``BestWeights``: under FSDP the adapter tensors are gathered in full (``DTensor.full_tensor``) so rank 0
  writes ``best/`` in the single-process format; every rank keeps a CPU copy of its own part to restore.
  ``merged/`` and the sft export come from an unsharded copy rank 0 takes before sharding.
- evaluation: every rank scores the whole set (FSDP needs every rank in each forward); rank 0's numbers are
  broadcast (``agree``) so best-weights and early-stop decisions agree.

Not supported (clear errors): tensor/pipeline parallel, zero1, the DeepSpeed engine (config validation), and
AdaLoRA under zero2/zero3 (its rank allocator ranks all singular values together: it needs full tensors).
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor

from lmforge.config import ConfigError
from lmforge.finetune.methods import Applied, adapter_tensors, load_adapter, save_adapter


def training_view(cfg):
    """The fields of a pre-training ``Config`` that ``init_distributed`` and ``parallelize_model`` read, filled
    from a ``FinetuneConfig`` (no activation checkpointing or compile in fine-tuning)."""
    training = SimpleNamespace(device=cfg.train.device, precision=cfg.train.precision,
                               activation_checkpointing=False, compile=False)
    return SimpleNamespace(distributed=cfg.distributed, training=training)


def check_method(cfg) -> None:
    """Method/strategy combinations that cannot run sharded (the config alone cannot tell: world size 1
    ignores ``distributed``)."""
    if cfg.method.name == "adalora" and cfg.distributed.strategy in ("zero2", "zero3"):
        raise ConfigError(f"method.name=adalora with distributed.strategy={cfg.distributed.strategy}: AdaLoRA's "
                          "rank allocator needs full (unsharded) tensors; use distributed.strategy=ddp")


def start(cfg):
    """This process's ``ParallelDims`` (and device), joining the launcher's process group when world size > 1."""
    from lmforge.distributed.launch_env import discover
    from lmforge.distributed.mesh import init_distributed

    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but CUDA is not available")
    if discover().world_size > 1:  # torchrun, MPI or Slurm
        check_method(cfg)
    return init_distributed(training_view(cfg))


def agree(value, pdims):
    """Rank 0's ``value`` on every rank (a picklable object)."""
    if not pdims.is_distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class BestWeights:
    """The best evaluation so far (``best`` in checkpoints): value and step; ``best/`` (rank 0 writes it: a
    temporary folder renamed over the old one); under data parallel every rank's CPU copy of its own part of
    the best tensors (FSDP shards: rank 0 gathers the full tensors for ``best/``). The state carries the best
    tensors in full, so a resumed run rewrites ``best/`` as of its checkpoint (the killed run may have written
    a later one, which the resumed run rewrites again when it gets there)."""

    def __init__(self, applied: Applied, folder: Path, metric: str, mode: str, meta: dict, pdims):
        self.applied, self.folder, self.metric, self.mode, self.meta = applied, folder, metric, mode, meta
        self.pdims, self.key = pdims, metric if metric == "val_loss" else f"val_{metric}"
        self.value, self.step, self._mine = None, 0, {}

    def update(self, step: int, metrics: dict) -> bool:
        """Collective (every rank, the same agreed metrics): True when ``metrics`` is a new best."""
        v, best = metrics.get(self.key), self.value
        if v is None or (best is not None and not (v < best if self.mode == "min" else v > best)):
            return False
        self.value, self.step = v, step
        full, self._mine = {}, {}
        for k, t in adapter_tensors(self.applied).items() if self.pdims.is_distributed else ():
            t = t.detach()
            self._mine[k] = (t.to_local() if isinstance(t, DTensor) else t).to("cpu", copy=True)
            t = t.full_tensor() if isinstance(t, DTensor) else t  # a collective: every rank, same order
            if self.pdims.is_rank0:
                full[k] = t.contiguous().cpu()
        if self.pdims.is_rank0:
            self._write(full or None)  # None: save_adapter reads the (unsharded) model
        return True

    def _write(self, tensors: Optional[dict]) -> None:
        parent = self.folder.parent
        for old in parent.glob(f"{self.folder.name}.tmp-*"):  # a killed run's leftovers too
            shutil.rmtree(old)
        tmp = parent / f"{self.folder.name}.tmp-{os.getpid()}"
        save_adapter(self.applied, tmp, {**self.meta, "step": self.step, self.metric: self.value}, tensors)
        if self.folder.exists():
            shutil.rmtree(self.folder)
        os.rename(tmp, self.folder)

    def state_dict(self) -> dict:
        sd = {"value": self.value, "step": self.step}
        if self.value is not None and self.pdims.is_rank0:
            from safetensors.torch import load_file

            sd["tensors"] = load_file(str(self.folder / "adapter.safetensors"))
        return sd

    def load_state_dict(self, sd: dict) -> None:
        self.value, self.step, tensors = sd["value"], sd["step"], sd.get("tensors")
        if self.pdims.is_rank0 and tensors is not None:
            self._write(tensors)
        elif self.pdims.is_rank0 and self.folder.exists():
            shutil.rmtree(self.folder)  # written after the checkpoint by the run that was killed
        if self.pdims.is_distributed and tensors is not None:
            live = adapter_tensors(self.applied)
            self._mine = {k: _local_part(live[k], t) for k, t in tensors.items()}

    def restore(self) -> None:
        """Every rank: put the best weights back into the live model (one process: from ``best/``)."""
        if self.value is not None and not self.pdims.is_distributed:
            load_adapter(self.applied, self.folder)
            return
        live = adapter_tensors(self.applied)
        with torch.no_grad():
            for k, saved in self._mine.items():
                (live[k].to_local() if isinstance(live[k], DTensor) else live[k]).copy_(saved)


def _local_part(live: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """This rank's part of a full tensor, laid out like ``live`` (a DTensor shard, or the whole tensor)."""
    if not isinstance(live, DTensor):
        return full.clone()
    placed = distribute_tensor(full.to(live.device), live.device_mesh, live.placements, src_data_rank=None)
    return placed.to_local().to("cpu", copy=True)


def unsharded_copy(applied: Applied, cfg, pdims) -> Optional[Applied]:
    """Rank 0 of a distributed run, before sharding: a CPU copy of the model for ``merged/`` and the sft
    export (only when the run writes one of them)."""
    needed = cfg.method.name in ("lora", "adalora") or (cfg.task == "sft" and cfg.method.name == "full")
    if pdims.is_distributed and pdims.is_rank0 and needed:
        return Applied(copy.deepcopy(applied.model).cpu(), applied.cfg)
    return None
