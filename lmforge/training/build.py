"""The one build path: data, model, optimizer, schedule and loaders of a run, at every world size.

Every run builds the model on the meta device, applies ``parallelize_model`` (pipeline split → TP →
activation checkpointing → compile → FSDP2 / DDP; at world size 1 only AC and compile), then materialises and
initialises the weights: every rank draws the same full tensors from the seed and keeps its shard, so the
values equal the single-process init whatever the layout. bf16 parameters get fp32 master weights (single
process). The result is an engine (``training/engine.py``) the one ``TrainStep`` drives.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
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


def resolve_precision(cfg: Config, pdims, device: torch.device):
    """``training.precision`` (``auto`` included) → this machine's choice, written into ``cfg`` so the saved
    config states the resolved value. Returns the ``PrecisionChoice`` (reason, probe numbers) for the log and
    summary."""
    want = cfg.training.precision
    if want == "auto" and cfg.training.param_dtype == "bfloat16":
        want = "bf16"  # bf16 parameters compute in bf16
    choice = agree_precision(want, pdims, device, "training.precision")
    cfg.training.precision = choice.precision
    return choice


def agree_precision(want: str, pdims, device: torch.device, key: str):
    """``want`` resolved once on rank 0 and shared: a busy or different probe must not give ranks different
    dtypes. The warning for a slow explicit choice is printed once, on rank 0."""
    from lmforge.hardware import resolve_precision as resolve

    choice = resolve(want, device, key=key) if pdims.is_rank0 else None
    if pdims.is_distributed:
        import torch.distributed as dist

        box = [choice]
        dist.broadcast_object_list(box, src=0, group=pdims.host_group)
        choice = box[0]
    elif choice is not None:
        choice.warn()
    if pdims.is_rank0 and pdims.is_distributed:
        choice.warn()
    return choice


def check_distributed(cfg: Config, pdims) -> None:
    """Reject combinations the multi-process trainer cannot run, naming the key and the fix."""
    tc = cfg.training
    if not pdims.is_distributed:
        return
    if tc.param_dtype == "bfloat16":
        raise ConfigError("training.param_dtype=bfloat16 is single-process only; with several processes use "
                          "distributed.param_dtype=bfloat16 (FSDP2 computes in bf16 over sharded fp32 weights, "
                          "strategy zero2/zero3)")
    if cfg.model.arch != "llama" and (pdims.tp > 1 or pdims.pp > 1):
        raise ConfigError(f"distributed.tp / distributed.pp > 1 support model.arch=llama (got {cfg.model.arch!r}); "
                          "gpt2 and bert train data parallel (ddp, zero1, zero2, zero3)")
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


@dataclass
class Built:
    engine: Any  # NativeEngine / PipelineEngine
    base: nn.Module  # the unwrapped model (FLOPs, config; under pp other stages' weights stay on meta)


def build_engine(cfg: Config, pdims, device: torch.device, prepare=None) -> Built:
    """``prepare(base)``, when given, runs on the materialised model before the optimizer is built (a model
    converter: ``lmforge compress`` loads a pruned / student model's weights there, or adds QAT fake
    quantization)."""
    from lmforge.distributed.parallelize import parallelize_model, shard_optimizer
    from lmforge.models import build_model
    from lmforge.training.engine import NativeEngine, PipelineEngine
    from lmforge.training.optim import build_optimizer
    from lmforge.training.precision import MasterWeights, make_loss_scaler
    from lmforge.training.schedule import build_scheduler

    tc = cfg.training
    base = build_model(cfg.model, device="meta")
    if getattr(base, "pooler", None) is not None and getattr(base, "nsp_head", None) is None:
        base.pooler.requires_grad_(False)  # BERT's pooler feeds only NSP: no gradient (and DDP needs every grad)
    model = parallelize_model(base, pdims, cfg, init_fn=lambda m: materialize(base, m, tc.seed, device))
    if prepare is not None:
        prepare(base)
    master = MasterWeights.maybe(model, tc)
    optimizer = build_optimizer(model, cfg.optimizer, master.substitute() if master else None)
    optimizer = shard_optimizer(optimizer, pdims, cfg)
    scheduler = build_scheduler(optimizer, cfg.scheduler, tc.max_steps)
    args = (model, optimizer, scheduler, pdims, device, tc.precision)
    kw = dict(scaler=make_loss_scaler(tc), master=master)
    if pdims.pp > 1:
        from lmforge.distributed.pipeline import build_schedule

        engine = PipelineEngine(*args, schedule_factory=lambda m, loss_fn: build_schedule(m, pdims, cfg, loss_fn), **kw)
    else:
        engine = NativeEngine(*args, **kw)
    return Built(engine, base)


class StepBatches:
    """The micro-batches of each optimizer step from a window loader; checkpointed as the loader."""

    def __init__(self, loader, accum: int):
        self.loader, self.accum = loader, accum

    def next_step(self) -> list[dict]:
        return [self.loader.next_batch() for _ in range(self.accum)]

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, sd: dict) -> None:
        self.loader.load_state_dict(sd)


def make_loaders(cfg: Config, pdims, train_shards):
    from lmforge.data.loader import RandomWindowLoader
    from lmforge.data.mlm import mlm_loaders_for

    loader = RandomWindowLoader(train_shards, cfg.data.seq_len, cfg.training.micro_batch_size,
                                seed=cfg.training.seed, rank=pdims.dp_rank, world_size=pdims.dp,
                                doc_mask=cfg.data.doc_mask)
    return mlm_loaders_for(cfg, train_loader=loader, rank=pdims.dp_rank)


def device_for(pdims, want: str) -> torch.device:
    if pdims.is_distributed:
        return pdims.device
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("training.device=cuda but CUDA is not available")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")

