"""Engines: how one step's forward/backward, clipping and update run for a built model.

``NativeEngine`` covers one process and every torch.distributed layout but pipelining (DDP, ZeRO-1, FSDP2
zero2/zero3, HSDP, TP): micro-steps run through the module ``parallelize_model`` returned, only the last one
synchronises gradients, and clipping takes the global norm over DTensor / sharded grads. ``PipelineEngine``
runs the whole accumulated batch through a ``torch.distributed.pipelining`` schedule. The DeepSpeed engine
(``distributed/deepspeed_engine.py``) is an adapter with the same methods. ``TrainStep`` drives all three.

Legend: B micro-batch size, T sequence length, V vocab.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.models.losses import IGNORE_INDEX
from lmforge.training.step import autocast_ctx, grad_norm_and_clip, schedule_step, to_device


class NativeEngine:
    def __init__(self, model: nn.Module, optimizer, scheduler, pdims, device: torch.device, precision: str,
                 scaler=None, master=None):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.pdims, self.device, self.precision = pdims, device, precision
        self.scaler, self.master = scaler, master
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.clip_params = master.master_params if master else self.params
        # the layout, not the world size, decides: FSDP2 on a 1-rank mesh has DTensor params too
        self.sharded = pdims.is_distributed or any(_is_dtensor(p) for p in self.params)

    def forward_backward(self, micro: list[dict], objective, factor: float) -> torch.Tensor:
        """Backward of ``loss_sum × factor`` per micro-batch; returns the summed loss (device, unscaled)."""
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float32)
        for i, mb in enumerate(micro):
            with self._sync(i == len(micro) - 1):
                with autocast_ctx(self.device, self.precision):
                    ce = objective.loss_sum(self.model, mb, self.device)
                (ce * factor).backward()
            loss_sum += ce.detach()
        if self.master:
            self.master.grads_to_master()
        return loss_sum

    def _sync(self, last: bool):
        if not self.sharded:
            return contextlib.nullcontext()
        from lmforge.distributed.utils import grad_sync

        return grad_sync(self.model, last)

    def clip(self, max_norm: Optional[float]) -> torch.Tensor:
        if not self.sharded:
            return grad_norm_and_clip(self.clip_params, max_norm)
        from lmforge.distributed.utils import clip_grad_norm

        return clip_grad_norm(self.clip_params, max_norm, self.pdims)

    def update(self, finite: bool) -> None:
        if finite:
            self.optimizer.step()
            if self.master:
                self.master.master_to_model()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.master:
            self.master.zero_grad()

    def schedule_step(self) -> None:
        schedule_step(self.scheduler)

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def loss_share(self, loss_sum: torch.Tensor) -> torch.Tensor:
        """This rank's part of the world sum: tensor-parallel peers hold the same loss."""
        return loss_sum / self.pdims.tp if self.pdims.tp > 1 else loss_sum

    @contextlib.contextmanager
    def eval_mode(self):
        was = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(was)

    def eval_loss_sum(self, batch: dict, objective) -> torch.Tensor:
        return objective.loss_sum(self.model, batch, self.device)


def _is_dtensor(t) -> bool:  # without importing torch.distributed.tensor where no DTensor can exist
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


class PipelineEngine(NativeEngine):
    """pp > 1: all accumulation micro-batches form one pipelined batch (``distributed.pp_microbatches``
    splits it); the last stage's loss_fn sums the CE and scales it by the step's factor."""

    def __init__(self, *args, schedule_factory, **kw):
        super().__init__(*args, **kw)
        self.pp_state = {"scale": 1.0, "ce": []}
        self.schedule = schedule_factory(self.model, self._loss_fn)

    def _loss_fn(self, logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(logits_BTV.flatten(0, 1).float(), labels_BT.flatten(), ignore_index=IGNORE_INDEX,
                             reduction="sum")
        if not ce.is_meta:  # the schedule's first step also runs shape inference on meta tensors
            self.pp_state["ce"].append(ce.detach())
        return ce * self.pp_state["scale"]

    def _ce(self) -> torch.Tensor:
        n = self.schedule._n_microbatches
        got = self.pp_state["ce"][-n:]
        return torch.stack(got).sum() if got else torch.zeros((), device=self.device)

    def forward_backward(self, micro: list[dict], objective, factor: float) -> torch.Tensor:
        from lmforge.distributed.pipeline import pipeline_step

        x_BT = to_device(torch.cat([m["input_ids"] for m in micro]), self.device)
        y_BT = to_device(torch.cat([m["labels"] for m in micro]), self.device)
        self.pp_state.update(scale=factor, ce=[])
        with autocast_ctx(self.device, self.precision):
            pipeline_step(self.schedule, self.pdims, x_BT, y_BT)
        return self._ce()

    def loss_share(self, loss_sum: torch.Tensor) -> torch.Tensor:
        if not self.pdims.is_last_stage:
            return torch.zeros_like(loss_sum)
        return super().loss_share(loss_sum)

    def eval_loss_sum(self, batch: dict, objective) -> torch.Tensor:
        """One eval batch through the schedule, padded with ignored rows to a multiple of the micro-batches
        (the loss sum and target count are unchanged)."""
        m = self.schedule._n_microbatches
        x_BT, y_BT = batch["input_ids"], batch["labels"]
        pad = -x_BT.shape[0] % m
        if pad:
            x_BT = torch.cat([x_BT, x_BT[:1].expand(pad, -1)])
            y_BT = torch.cat([y_BT, torch.full((pad, y_BT.shape[1]), IGNORE_INDEX, dtype=y_BT.dtype)])
        self.pp_state.update(scale=1.0, ce=[])
        target = to_device(y_BT, self.device) if self.pdims.is_last_stage else None
        if self.pdims.pp_rank == 0:
            self.schedule.eval(to_device(x_BT, self.device), target=target)
        else:
            self.schedule.eval(target=target)
        return self._ce()


def accumulate_gradients(model: nn.Module, micro: list[dict], device: torch.device, precision: str = "fp32"
                         ) -> torch.Tensor:
    """One step's forward/backward of an LM at world size 1, exactly as ``TrainStep`` runs it (every
    micro-batch backprops its summed CE / all valid targets of the step); for tools and tests."""
    from lmforge.distributed.mesh import ParallelDims
    from lmforge.training.step import LMObjective, count_valid_tokens

    engine = NativeEngine(model, None, None, ParallelDims(1, 1, 1, 1, 1), device, precision)
    return engine.forward_backward(micro, LMObjective(), 1.0 / max(count_valid_tokens(micro), 1))
