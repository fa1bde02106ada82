"""Building a run's pieces under a ``ParallelDims``: data, model (parallelised), optimizer, schedule, loaders.

World size 1 keeps the plain single-process path (model built and initialised on the device, optional bf16
master weights, activation checkpointing / compile from ``training.*``). World size > 1 builds the model on
the meta device, applies ``parallelize_model`` (pipeline split → TP → AC → compile → FSDP2/DDP), then
materialises and initialises the weights after sharding: every rank draws the same full tensors from the
seed and keeps its shard, so the values equal the single-process init.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lmforge.config import Config, ConfigError


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def open_data(cfg: Config):
    from lmforge.data.loader import TokenShards

    if not cfg.data.path:
        raise ConfigError("data.path is not set (a folder written by `lmforge data prepare`)")
    if not (Path(cfg.data.path) / "manifest.json").is_file():
        raise ConfigError(f"data.path={cfg.data.path}: no manifest.json there (run `lmforge data prepare`)")
    train = TokenShards(cfg.data.path, "train")
    val = None
    if cfg.training.eval_every >= 0:
        try:
            val = TokenShards(cfg.data.path, "val")
            if len(val) <= cfg.data.seq_len:
                val = None
        except KeyError:
            val = None
    return train, val


def resolve_model_cfg(cfg: Config, train_shards) -> None:
    data_vocab = train_shards.vocab_size
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = data_vocab
    elif cfg.model.vocab_size < data_vocab:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the data's tokenizer "
                          f"vocabulary ({data_vocab}, {cfg.data.path}/manifest.json)")
    if cfg.data.seq_len > cfg.model.max_seq_len:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}")


def check_distributed(cfg: Config, pdims) -> None:
    """Reject combinations the multi-process trainer cannot run, naming the key and the fix."""
    tc = cfg.training
    if not pdims.is_distributed:
        return
    if tc.param_dtype == "bfloat16":
        raise ConfigError("training.param_dtype=bfloat16 is single-process only; with several processes use "
                          "distributed.param_dtype=bfloat16 (FSDP2 computes in bf16 over sharded fp32 weights, "
                          "strategy zero2/zero3)")
    if cfg.model.arch != "llama":
        raise ConfigError(f"distributed training supports model.arch=llama (got {cfg.model.arch!r})")
    if pdims.pp > 1 and cfg.model.tie_embeddings:
        raise ConfigError(f"distributed.pp={pdims.pp} needs model.tie_embeddings=false (the embedding and the "
                          "output head live on different pipeline stages)")
    if pdims.pp > 1:
        rows = tc.micro_batch_size * tc.grad_accum_steps
        m = cfg.distributed.pp_microbatches
        if rows % m:
            raise ConfigError(f"distributed.pp_microbatches={m} must divide training.micro_batch_size × "
                              f"grad_accum_steps = {tc.micro_batch_size} × {tc.grad_accum_steps} = {rows} "
                              "(with pp > 1 all accumulation micro-batches form one pipelined batch)")


@dataclass
class Parts:
    """What the loop drives. ``model``: module to run (DDP wrapper / FSDP model / pipeline stage);
    ``base``: the unwrapped Llama (FLOPs, config; under pp other stages' weights stay on meta)."""

    model: nn.Module
    base: nn.Module
    optimizer: Any
    scheduler: Any
    scaler: Any = None
    master: Any = None
    schedule: Any = None  # pipeline schedule when pp > 1
    pp_state: dict = field(default_factory=dict)  # the pipeline loss_fn's scale and collected CE sums
    model_is_sharded: bool = False  # built under a process group (checkpoints go through DCP)

    @property
    def params(self) -> list[torch.Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad]


def _wrap_model(model, tc) -> None:
    from lmforge.training.wrap import apply_activation_checkpointing, apply_compile

    if tc.activation_checkpointing:
        apply_activation_checkpointing(model, every=tc.ac_every, selective=tc.ac_selective)
    if tc.compile:
        apply_compile(model, cache_dir=tc.compile_cache_dir)


def materialize(base: nn.Module, module: nn.Module, seed: int, device: torch.device) -> None:
    """Allocate ``module`` (the whole model, or this rank's pipeline stage) on ``device`` and initialise it
    with the single-process values: ``base.init_weights`` draws every full tensor in order (other stages'
    meta tensors just consume their draws) and DTensor params keep their shard."""
    module.to_empty(device=device)
    if getattr(module, "rope_cos", None) is not None and base.rope_cos.is_meta:
        base.rope_cos = torch.empty_like(base.rope_cos, device=device)  # init_weights writes the real tables
        base.rope_sin = torch.empty_like(base.rope_sin, device=device)
    base.init_weights(seed)
    if module is not base and hasattr(module, "rope_cos"):
        module.rope_cos, module.rope_sin = base.rope_cos, base.rope_sin


def build_parts(cfg: Config, pdims, device: torch.device) -> Parts:
    from lmforge.models import build_model
    from lmforge.training.optim import build_optimizer
    from lmforge.training.precision import MasterWeights, make_loss_scaler
    from lmforge.training.schedule import build_scheduler

    tc = cfg.training
    if not pdims.is_distributed:
        model = build_model(cfg.model, device=device, seed=tc.seed)
        master = MasterWeights.maybe(model, tc)
        _wrap_model(model, tc)
        optimizer = build_optimizer(master.model_for_optimizer() if master else model, cfg.optimizer)
        scheduler = build_scheduler(optimizer, cfg.scheduler, tc.max_steps)
        return Parts(model, model, optimizer, scheduler, make_loss_scaler(tc), master)
    from lmforge.distributed.parallelize import parallelize_model, shard_optimizer

    base = build_model(cfg.model, device="meta")
    model = parallelize_model(base, pdims, cfg, init_fn=lambda m: materialize(base, m, tc.seed, device))
    optimizer = shard_optimizer(build_optimizer(model, cfg.optimizer), pdims, cfg)
    scheduler = build_scheduler(optimizer, cfg.scheduler, tc.max_steps)
    parts = Parts(model, base, optimizer, scheduler, make_loss_scaler(tc), model_is_sharded=True)
    if pdims.pp > 1:
        parts.schedule = _pipeline_schedule(parts, pdims, cfg)
    return parts


def _pipeline_schedule(parts: Parts, pdims, cfg):
    import torch.nn.functional as F

    from lmforge.distributed.pipeline import build_schedule
    from lmforge.training.step import IGNORE

    st = parts.pp_state
    st.update(scale=1.0, ce=[])

    def loss_fn(logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(logits_BTV.flatten(0, 1).float(), labels_BT.flatten(), ignore_index=IGNORE,
                             reduction="sum")
        if not ce.is_meta:  # the schedule's first step also runs shape inference on meta tensors
            st["ce"].append(ce.detach())
        return ce * st["scale"]

    return build_schedule(parts.model, pdims, cfg, loss_fn)


def make_loaders(cfg: Config, pdims, train_shards):
    from lmforge.data.loader import RandomWindowLoader
    from lmforge.data.mlm import mlm_loaders_for

    loader = RandomWindowLoader(train_shards, cfg.data.seq_len, cfg.training.micro_batch_size,
                                seed=cfg.training.seed, rank=pdims.dp_rank, world_size=pdims.dp,
                                doc_mask=cfg.data.doc_mask)
    return mlm_loaders_for(cfg, train_loader=loader, rank=pdims.dp_rank)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def device_for(pdims, want: str) -> torch.device:
    if pdims.is_distributed:
        return pdims.device
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("training.device=cuda but CUDA is not available")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")

