"""Pipeline parallelism with ``torch.distributed.pipelining``.

``split_for_pipeline(model, pdims)`` keeps only this stage's part of a Llama in a ``PipelineStageModule``
whose parameter names are the canonical ones (``tok_embeddings.*``, ``layers.<i>.*``, ``norm.*``,
``output.*``), so checkpoints reshard between pipelined and non-pipelined runs. ``build_schedule`` wraps the
(already data/tensor-parallelised) stage in a ``PipelineStage`` and a ``ScheduleGPipe``/``Schedule1F1B``.

Legend: B batch, T tokens, D d_model, V vocab.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from lmforge.config import ConfigError
from lmforge.distributed.mesh import ParallelDims
from lmforge.distributed.parallelize import blocks


def stage_layers(n_layers: int, pp: int, stage: int) -> list[int]:
    """Contiguous, balanced block indices of ``stage`` (earlier stages take the remainder)."""
    if pp > n_layers:
        raise ConfigError(f"distributed.pp={pp} exceeds model.n_layers={n_layers} (each stage needs a block)")
    base, extra = divmod(n_layers, pp)
    start = stage * base + min(stage, extra)
    return list(range(start, start + base + (1 if stage < extra else 0)))


class PipelineStageModule(nn.Module):
    """One stage of a Llama: (embeddings on the first stage) → its blocks → (norm + output on the last)."""

    def __init__(self, model: nn.Module, layer_ids: list[int], first: bool, last: bool):
        super().__init__()
        all_blocks = dict(blocks(model))
        self.tok_embeddings = model.tok_embeddings if first else None
        self.layers = nn.ModuleDict({str(i): all_blocks[str(i)] for i in layer_ids})
        self.norm = model.norm if last else None
        self.output = model.output if last else None
        self.register_buffer("rope_cos", model.rope_cos, persistent=False)
        self.register_buffer("rope_sin", model.rope_sin, persistent=False)
        self.first, self.last = first, last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """First stage: token ids [B, T]; later stages: hidden states [B, T, D]. Last returns logits_BTV."""
        h_BTD = self.tok_embeddings(x) if self.first else x
        T = h_BTD.shape[1]
        if T > self.rope_cos.shape[0]:
            raise ValueError(f"sequence of {T} tokens exceeds the model's max_seq_len={self.rope_cos.shape[0]}")
        cos, sin = self.rope_cos[:T, None], self.rope_sin[:T, None]
        for block in self.layers.values():
            h_BTD = block(h_BTD, cos, sin, None)
        if self.last:
            return self.output(self.norm(h_BTD)).float()
        return h_BTD


def split_for_pipeline(model: nn.Module, pdims: ParallelDims) -> PipelineStageModule:
    cfg = getattr(model, "cfg", None)
    if cfg is not None and cfg.tie_embeddings:
        raise ConfigError(f"distributed.pp={pdims.pp} needs model.tie_embeddings=false (the embedding and the "
                          "output head live on different pipeline stages)")
    n_layers = len(blocks(model))
    stage = pdims.pp_rank
    ids = stage_layers(n_layers, pdims.pp, stage)
    return PipelineStageModule(model, ids, first=stage == 0, last=stage == pdims.pp - 1)


def build_schedule(stage_module: nn.Module, pdims: ParallelDims, cfg,
                   loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
    """``loss_fn(logits_BTV, labels_BT)`` per micro-batch; gradients are *summed* over micro-batches
    (``scale_grads=False``), so the loss carries the step's normalisation (``training/engine.PipelineEngine``)."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    dcfg = cfg.distributed
    stage = PipelineStage(stage_module, pdims.pp_rank, pdims.pp, pdims.device, group=pdims.group("pp"))
    cls = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[dcfg.pp_schedule]
    return cls(stage, n_microbatches=dcfg.pp_microbatches, loss_fn=loss_fn, scale_grads=False)


def pipeline_step(schedule, pdims: ParallelDims, input_ids_BT: torch.Tensor, labels_BT: torch.Tensor
                  ) -> list[torch.Tensor]:
    """Run one forward+backward over the whole local batch; returns per-micro-batch losses on the last stage
    (empty elsewhere)."""
    n_mb = schedule._n_microbatches
    if input_ids_BT.shape[0] % n_mb:
        raise ConfigError(f"the per-rank batch ({input_ids_BT.shape[0]}) must be divisible by "
                          f"distributed.pp_microbatches={n_mb}")
    losses: list[torch.Tensor] = []
    first, last = pdims.pp_rank == 0, pdims.is_last_stage
    args = (input_ids_BT,) if first else ()
    if last:
        schedule.step(*args, target=labels_BT, losses=losses)
    else:
        schedule.step(*args)
    return losses
