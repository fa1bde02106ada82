"""Data-parallel fine-tuning (ddp / zero2 / zero3) around the one loop in ``trainer.py``.

``FTDist.start(cfg)`` reads the launcher's environment. With world size 1 every hook below is the
single-process code (the run is unchanged); under torchrun, or in ranks whose process group a caller already
initialised, it joins the group (``distributed.mesh.init_distributed``) and the trainer asks it wherever ranks
differ:

- model: the method is applied first (peft layers, adapters, prefix on the plain module tree), then
  ``distributed.parallelize.parallelize_model`` shards it (FSDP2 per block then root; frozen and trainable
  parameters share the groups) or wraps it in DDP. The trainer keeps the plain module; forward for the loss
  goes through the DDP wrapper. Weights come from the same seed on every rank; dropout then draws per rank.
- data: ``train.batch_size`` is the global batch. Every rank builds the same global batches as one process
  and keeps a contiguous 1/dp slice of the rows; a rank left with no rows takes one row with every target
  ignored, so all ranks run the same forward/backward collectives.
- loss: each rank backprops ``sum of its target losses × dp / global target weight`` (weight: the number of
  labelled targets, or the sum of their class weights, all-reduced over dp). DDP/FSDP average gradients over
  dp, so the gradient is the single-process gradient of the mean over the global batch, whatever the split.
  The logged loss is that global mean.
- clipping: global norm over sharded gradients (``distributed.utils.clip_grad_norm``).
- evaluation: every rank scores the whole evaluation set (FSDP needs every rank in each forward; the numbers
  are the single-process ones); rank 0's metrics are broadcast so best-weights and early-stop decisions agree.
- saving: the adapter tensors are gathered in full (``DTensor.full_tensor``) and rank 0 writes ``best/`` in
  the single-process format. Each rank keeps a CPU copy of its own shards of the best weights and restores them
  before the final evaluation. ``merged/`` and the sft export come from an unsharded CPU copy rank 0 takes
  before sharding, with ``best/`` loaded into it.

Not supported (clear errors): tensor/pipeline parallel, zero1, the DeepSpeed engine (config validation), and
AdaLoRA under zero2/zero3 (its rank allocator ranks all singular values together: it needs full tensors; ddp
works).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Iterable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lmforge.config import ConfigError
from lmforge.data.tasks import IGNORE
from lmforge.finetune.methods import Applied, adapter_tensors, load_adapter


def launcher_world_size() -> int:
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable WORLD_SIZE={raw!r} is not an integer") from None


def _as_training_cfg(cfg):
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


def summed_loss(model: nn.Module, logits: torch.Tensor, batch: dict, class_weights: Optional[torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the per-target losses, target weight) over the targets ``TaskModel.loss`` averages: its mean is
    ``sum / weight`` (the number of labelled targets, or the sum of their class weights)."""
    z, y, w = model.targets(logits, batch, class_weights)
    ce_sum = F.cross_entropy(z, y, weight=w, ignore_index=IGNORE, reduction="sum")
    valid = y != IGNORE
    weight = w[y[valid]].sum() if w is not None else valid.sum()
    return ce_sum, weight


def rank_rows(batch: dict, rank: int, world: int) -> dict:
    """This rank's contiguous share of a collated global batch (sizes differ by at most one row), trimmed to
    its longest row; an empty share becomes one row whose targets are all ignored."""
    n = batch["input_ids"].shape[0]
    idx = torch.arange(n).tensor_split(world)[rank]
    if len(idx):
        part = {k: v[idx] for k, v in batch.items()}
    else:
        part = {k: v[:1].clone() for k, v in batch.items()}
        for k in ("label", "labels"):
            if k in part:
                part[k].fill_(IGNORE)
    T = max(1, int(part["attention_mask"].sum(1).max()))
    return {k: v[:, :T] if v.dim() == 2 else v for k, v in part.items()}


class FTDist:
    """The trainer's view of the process layout; every method is the single-process code when world size is 1."""

    def __init__(self, cfg, pdims=None):
        self.cfg, self.pdims = cfg, pdims
        self.forward_model: Optional[nn.Module] = None  # the DDP wrapper, or the FSDP-sharded model itself
        self._best_shards: Optional[dict[str, torch.Tensor]] = None
        self._unsharded: Optional[Applied] = None

    @classmethod
    def start(cls, cfg) -> "FTDist":
        if launcher_world_size() <= 1:
            return cls(cfg)
        from lmforge.distributed.mesh import init_distributed

        check_method(cfg)
        return cls(cfg, init_distributed(_as_training_cfg(cfg)))

    def close(self, failed: bool = False) -> None:
        if self.distributed:
            from lmforge.distributed.mesh import destroy_distributed

            destroy_distributed(abort=failed)

    @property
    def distributed(self) -> bool:
        return self.pdims is not None

    @property
    def is_main(self) -> bool:
        return self.pdims is None or self.pdims.is_rank0

    @property
    def device(self) -> torch.device:
        return self.pdims.device

    def describe(self) -> str:
        p = self.pdims
        return (f"distributed: world {p.world_size}, strategy {p.strategy}, dp {p.dp} (replicate {p.dp_replicate} "
                f"× shard {p.dp_shard}); {self.cfg.train.batch_size} examples per step over all ranks")

    # ----- model
    def keep_unsharded_copy(self, applied: Applied) -> None:
        """Rank 0, before sharding: a CPU copy of the model for ``merged/`` and the sft export (only when the
        run writes one of them)."""
        cfg = self.cfg
        needed = cfg.method.name in ("lora", "adalora") or (cfg.task == "sft" and cfg.method.name == "full")
        if self.distributed and self.is_main and needed:
            self._unsharded = Applied(copy.deepcopy(applied.model).cpu(), applied.cfg)

    def parallelize(self, model: nn.Module) -> nn.Module:
        """Shard (zero2/zero3, in place) or DDP-wrap ``model`` (already on this rank's device). Returns the plain
        module for everything but the training forward. Every rank built the same weights from the same seed;
        from here on each rank draws its own dropout masks (seed + dp rank), as one process does for its rows."""
        if not self.distributed:
            return model
        from lmforge.distributed.parallelize import parallelize_model

        self.forward_model = parallelize_model(model, self.pdims, _as_training_cfg(self.cfg))
        torch.manual_seed(self.cfg.train.seed + self.pdims.dp_rank)
        return model

    # ----- step
    def shard(self, batches: Iterable[dict]) -> Iterable[dict]:
        if not self.distributed:
            return batches
        return (rank_rows(b, self.pdims.dp_rank, self.pdims.dp) for b in batches)

    def loss(self, model: nn.Module, batch: dict, class_weights: Optional[torch.Tensor]) -> tuple[torch.Tensor, float]:
        """(loss to backprop, loss of the global batch to log)."""
        if not self.distributed:
            loss, _ = model.loss(batch, class_weights)
            return loss, loss.item()
        logits = self.forward_model(batch["input_ids"], batch["attention_mask"])
        ce_sum, weight = summed_loss(model, logits, batch, class_weights)
        totals = torch.stack([ce_sum.detach().double(), weight.double()])
        dist.all_reduce(totals, group=self.pdims.group("dp"))
        global_sum, global_weight = totals.tolist()
        global_weight = global_weight if global_weight > 0 else 1.0  # nothing labelled: a zero loss
        return ce_sum * (self.pdims.dp / global_weight), global_sum / global_weight

    def clip_grad_norm(self, params: list[torch.Tensor], max_norm: Optional[float]) -> float:
        if not self.distributed:
            return float(torch.nn.utils.clip_grad_norm_(params, max_norm or float("inf")))
        from lmforge.distributed.utils import clip_grad_norm

        return clip_grad_norm(params, max_norm, self.pdims)

    def agree(self, value):
        """Rank 0's ``value`` on every rank (a picklable object)."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    # ----- best weights
    def best_tensors(self, applied: Applied) -> Optional[dict[str, torch.Tensor]]:
        """Every rank, at a new best evaluation: the tensors ``best/`` must hold. None in one process
        (``save_adapter`` reads the model); full CPU tensors on rank 0, {} on the others. Also keeps this rank's
        shards to restore in ``load_best``."""
        if not self.distributed:
            return None
        from torch.distributed.tensor import DTensor

        full, shards = {}, {}
        for k, t in adapter_tensors(applied).items():
            t = t.detach()
            if isinstance(t, DTensor):
                shards[k] = t.to_local().to("cpu", copy=True)
                t = t.to(self.device).full_tensor()  # a collective: every rank, same order
            else:
                shards[k] = t.to("cpu", copy=True)
            if self.is_main:
                full[k] = t.contiguous().cpu()
        self._best_shards = shards
        return full

    def load_best(self, applied: Applied, folder: Path) -> None:
        """Put the best weights back: ``load_adapter`` in one process; every rank its own saved shards."""
        if not self.distributed:
            load_adapter(applied, folder)
            return
        from torch.distributed.tensor import DTensor

        dist.barrier()  # rank 0 has finished writing best/ before any rank moves on to the final evaluation
        live = adapter_tensors(applied)
        with torch.no_grad():
            for k, saved in self._best_shards.items():
                t = live[k]
                (t.to_local() if isinstance(t, DTensor) else t).copy_(saved)

    def unsharded_best(self, folder: Path) -> Optional[Applied]:
        """Rank 0: the unsharded copy with ``best/`` loaded (what ``lmforge evaluate`` rebuilds); None when the
        run writes neither ``merged/`` nor an sft export."""
        if self._unsharded is not None:
            load_adapter(self._unsharded, folder)
        return self._unsharded
