"""``distributed.engine: deepspeed``: the same lmforge model, data and loss, stepped by ``deepspeed.initialize``.

``train_with_deepspeed(cfg) -> summary`` runs a whole run in ``cfg.run_dir`` through the one loop and the one
step (``DeepSpeedEngine`` is the adapter: forward/backward, step, save, load), so it has the same signals, time
budget, non-finite handling, early stopping and logging as every other run; checkpoints are lmforge's folder
protocol around DeepSpeed's own model/optimizer files. Launch it like any multi-process lmforge run
(torchrun); without torchrun it runs as a world of one.

What lmforge keeps: model (``build_model``), optimizer (``build_optimizer``, decay groups), schedule
(``build_scheduler``; DeepSpeed steps it once per optimizer step), data (``RandomWindowLoader`` per rank) and
the loss normalisation (sum of token CE / valid tokens of the whole global batch). DeepSpeed divides each
micro-batch loss by ``gradient_accumulation_steps`` and averages gradients over ranks, so the loss handed to
``engine.backward`` is pre-multiplied by ``accum × world / global_tokens`` to give exactly lmforge's gradient.

ZeRO stage from ``distributed.strategy`` (ddp 0, zero1 1, zero2 2, zero3 3); precision bf16 / fp16 (loss
scaling knobs from ``training.loss_scale_*``); ``training.grad_clip`` → ``gradient_clipping``.
Legend: B micro-batch, T sequence length, V vocab.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist

from lmforge.config import Config, ConfigError
from lmforge.errors import CheckpointError
from lmforge.training.step import schedule_step

INSTALL_HINT = "distributed.engine=deepspeed needs DeepSpeed: pip install 'lmforge[deepspeed]'"
_STAGES = {"ddp": 0, "zero1": 1, "zero2": 2, "zero3": 3}


def import_deepspeed():
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError as e:
        raise ConfigError(f"{INSTALL_HINT} ({e})") from None
    return deepspeed


def deepspeed_config(cfg: Config) -> dict:
    """The DeepSpeed JSON equivalent of ``cfg`` (batch, ZeRO stage, precision, clipping)."""
    d, tc = cfg.distributed, cfg.training
    for k in ("tp", "pp", "dp_replicate"):
        if getattr(d, k) > 1:
            raise ConfigError(f"distributed.{k}={getattr(d, k)} is not supported with distributed.engine=deepspeed "
                              "(data parallel only); use distributed.engine=native")
    if d.cpu_offload:
        raise ConfigError("distributed.cpu_offload=true is not supported with distributed.engine=deepspeed "
                          "(DeepSpeed offload needs its own CPU Adam); use distributed.engine=native")
    if tc.param_dtype != "float32":
        raise ConfigError("training.param_dtype=bfloat16 with distributed.engine=deepspeed: use "
                          "training.precision=bf16 (DeepSpeed stores bf16 params with fp32 master weights)")
    if cfg.optimizer.name == "adafactor" and d.strategy != "ddp":
        raise ConfigError("optimizer.name=adafactor with distributed.engine=deepspeed and ZeRO: DeepSpeed steps "
                          "flattened 1-D partitions, which breaks Adafactor's factored (row/column) statistics; "
                          "use distributed.engine=native or strategy=ddp")
    ds: dict = {"train_micro_batch_size_per_gpu": tc.micro_batch_size,
                "gradient_accumulation_steps": tc.grad_accum_steps, "steps_per_print": 10 ** 9,
                "zero_optimization": {"stage": _STAGES[d.strategy]},
                "zero_allow_untested_optimizer": True,  # lmforge's optimizers are elementwise (adafactor refused)
                "communication_data_type": {"float32": "fp32", "bfloat16": "bf16"}[d.reduce_dtype]}
    ds["gradient_clipping"] = tc.grad_clip or 0.0  # explicit: DeepSpeed's default is 1.0
    if tc.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif tc.precision == "fp16":
        power = math.log2(tc.loss_scale_init)
        if power != int(power):
            raise ConfigError(f"training.loss_scale_init={tc.loss_scale_init} must be a power of two with "
                              "distributed.engine=deepspeed (DeepSpeed takes initial_scale_power)")
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": int(power),
                      "loss_scale_window": tc.loss_scale_window, "hysteresis": tc.loss_scale_hysteresis,
                      "min_loss_scale": tc.loss_scale_min}
    return ds


def _init_process_group(cfg: Config, deepspeed) -> tuple[int, int]:
    if "WORLD_SIZE" not in os.environ:  # a world of one without torchrun
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if not dist.is_initialized():
        from datetime import timedelta

        backend = cfg.distributed.backend
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        deepspeed.init_distributed(dist_backend=backend, verbose=False, timeout=timedelta(seconds=cfg.distributed.timeout_s))
    return dist.get_rank(), dist.get_world_size()


class DeepSpeedEngine:
    """The DeepSpeed engine behind the one ``TrainStep`` (same methods as ``training.engine.NativeEngine``).

    DeepSpeed divides each micro-batch loss by ``gradient_accumulation_steps``, averages gradients over the
    ranks, clips, steps the optimizer at the accumulation boundary and skips a step whose gradients overflow
    (fp16 loss scaling, and ZeRO-1/2's overflow check in bf16/fp32); ``forward_backward`` multiplies the
    step's factor by the accumulation so the gradient is lmforge's. A step DeepSpeed skipped reports an
    infinite norm, so the loop counts it as skipped; the schedule then advances here (DeepSpeed does not
    step it on a skipped step), as on every other engine."""

    scaler = master = None

    def __init__(self, ds_engine, scheduler, pdims, device: torch.device, accum: int):
        self.ds, self.model, self.scheduler = ds_engine, ds_engine, scheduler
        self.optimizer, self.pdims, self.device, self.accum = ds_engine.optimizer, pdims, device, accum
        self.clip_params: list = []

    def forward_backward(self, micro: list[dict], objective, factor: float) -> torch.Tensor:
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float32)
        for mb in micro:
            ce = objective.loss_sum(self.ds, mb, self.device)
            self.ds.backward(ce * (factor * self.accum))
            self.ds.step()  # updates at the accumulation boundary only
            loss_sum += ce.detach().float()
        return loss_sum

    def clip(self, max_norm) -> torch.Tensor:
        """DeepSpeed clipped inside ``step``: its global norm, or inf when it skipped the update."""
        norm = self.ds.get_global_grad_norm()
        if not self.ds.was_step_applied() or norm is None:
            norm = math.inf if not self.ds.was_step_applied() else math.nan
        return torch.as_tensor(float(norm), dtype=torch.float32, device=self.device)

    def update(self, finite: bool) -> None:
        pass  # DeepSpeed stepped (or skipped) at the accumulation boundary

    def zero_grad(self) -> None:
        pass  # DeepSpeed zeroes its gradient partitions after each boundary

    def schedule_step(self) -> None:
        if not self.ds.was_step_applied():
            schedule_step(self.scheduler)

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def loss_share(self, loss_sum: torch.Tensor) -> torch.Tensor:
        return loss_sum

    @contextlib.contextmanager
    def eval_mode(self):
        self.ds.eval()
        try:
            yield
        finally:
            self.ds.train()

    def eval_loss_sum(self, batch: dict, objective) -> torch.Tensor:
        return objective.loss_sum(self.ds, batch, self.device)

    def save_checkpoint(self, folder: Path) -> None:
        """Model, optimizer and schedule in DeepSpeed's own layout inside ``folder`` (collective)."""
        self.ds.save_checkpoint(str(folder), tag="deepspeed", save_latest=False)

    def load_checkpoint(self, folder: Path) -> None:
        path, _ = self.ds.load_checkpoint(str(folder), tag="deepspeed")
        if path is None:
            raise CheckpointError(f"{folder}: DeepSpeed found no checkpoint of its own in this folder")


def train_with_deepspeed(cfg: Config) -> dict:
    """Run (or resume) ``cfg`` through DeepSpeed and the one loop; returns the summary (``summary.json``)."""
    deepspeed = import_deepspeed()
    from lmforge.distributed.mesh import ParallelDims
    from lmforge.distributed.parallelize import parallelize_model
    from lmforge.models import build_model
    from lmforge.training.build import (StepBatches, make_loaders, materialize, open_data, resolve_model_cfg,
                                        resolve_precision, seed_everything)
    from lmforge.training.loop import run_loop
    from lmforge.training.optim import build_optimizer
    from lmforge.training.schedule import build_scheduler
    from lmforge.training.trainer import finish, lint_config, lm_job

    cfg = cfg.model_copy(deep=True)
    tc = cfg.training
    deepspeed_config(cfg)  # config errors first, before any process group exists
    rank, world = _init_process_group(cfg, deepspeed)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() \
        else torch.device("cpu")
    train_shards, val_shards = open_data(cfg)
    resolve_model_cfg(cfg, train_shards)
    seed_everything(tc.seed)
    pdims = ParallelDims.from_config(cfg.distributed.model_copy(update={"dp_shard": -1}), world, rank,
                                     int(os.environ.get("LOCAL_RANK", 0)), device)
    if dist.get_backend() != "gloo":
        pdims.host_group = dist.new_group(backend="gloo")
    lint_config(cfg, pdims, device)
    choice = resolve_precision(cfg, pdims, device)  # auto → this machine's dtype, the same on every rank
    ds_cfg = deepspeed_config(cfg)
    base = build_model(cfg.model, device="meta")  # the one build path; DeepSpeed does the data parallelism
    model = parallelize_model(base, ParallelDims(1, 1, 1, 1, 1, device=device), cfg,
                              init_fn=lambda m: materialize(base, m, tc.seed, device))
    optimizer = build_optimizer(model, cfg.optimizer)
    scheduler = build_scheduler(optimizer, cfg.scheduler, tc.max_steps)
    ds, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg)
    engine = DeepSpeedEngine(ds, scheduler, pdims, device, tc.grad_accum_steps)
    batches = StepBatches(make_loaders(cfg, pdims, train_shards), tc.grad_accum_steps)
    job = lm_job(cfg, pdims, engine, batches, val_shards, base.flops_per_token(cfg.data.seq_len), choice,
                 deepspeed=True)
    summary = run_loop(job)
    summary.update(engine="deepspeed", zero_stage=ds_cfg["zero_optimization"]["stage"])
    if summary["stop_reason"] != "non_finite":
        _export(ds, model, deepspeed, ds_cfg, rank, Path(cfg.run_dir), summary["steps"])
    summary = finish(cfg, pdims, model, job, summary, export=False)
    summary["world_size"] = world
    return summary


def _export(engine, model, deepspeed, ds_cfg: dict, rank: int, run_dir: Path, step: int) -> None:
    """model.safetensors on rank 0 (ZeRO-3 parameters gathered first)."""
    from lmforge.checkpoint import export_safetensors

    if ds_cfg["zero_optimization"]["stage"] == 3:
        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            if rank == 0:
                export_safetensors(model, run_dir / "model.safetensors", {"step": step})
    elif rank == 0:
        export_safetensors(model, run_dir / "model.safetensors", {"step": step})
    dist.barrier()
