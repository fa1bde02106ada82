"""``distributed.engine: deepspeed``: the same lmforge model, data and loss, stepped by ``deepspeed.initialize``.

``train_with_deepspeed(cfg) -> summary`` runs a whole run in ``cfg.run_dir`` (config.yaml, metrics.jsonl,
checkpoints/step_XXXXXXX/ in DeepSpeed's format with a ``COMPLETE`` marker, model.safetensors, summary.json).
Launch it like any multi-process lmforge run (torchrun); without torchrun it runs as a world of one.

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

import json
import math
import os
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lmforge.config import Config, ConfigError, save_config

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


def _latest_complete(ckpt_dir: Path) -> Path | None:
    done = sorted(p for p in ckpt_dir.glob("step_*") if (p / "COMPLETE").exists())
    return done[-1] if done else None


def train_with_deepspeed(cfg: Config) -> dict:
    """Run (or resume) ``cfg`` through DeepSpeed; returns the summary (also in ``summary.json`` on rank 0)."""
    deepspeed = import_deepspeed()
    from lmforge.data.loader import RandomWindowLoader
    from lmforge.models import build_model
    from lmforge.training.checkpoint import export_safetensors
    from lmforge.training.metrics import MetricsLogger
    from lmforge.training.optim import build_optimizer
    from lmforge.training.schedule import build_scheduler
    from lmforge.training.trainer import _open_data, _resolve_model_cfg, seed_everything

    t_start = time.time()
    cfg = cfg.model_copy(deep=True)
    tc = cfg.training
    ds_cfg = deepspeed_config(cfg)
    rank, world = _init_process_group(cfg, deepspeed)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() \
        else torch.device("cpu")
    run_dir, ckpt_dir = Path(cfg.run_dir), Path(cfg.run_dir) / "checkpoints"
    train_shards, val_shards = _open_data(cfg)
    _resolve_model_cfg(cfg, train_shards)
    seed_everything(tc.seed)
    model = build_model(cfg.model, device=device, seed=tc.seed)
    optimizer = build_optimizer(model, cfg.optimizer)
    scheduler = build_scheduler(optimizer, cfg.scheduler, tc.max_steps)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg)
    loader = RandomWindowLoader(train_shards, cfg.data.seq_len, tc.micro_batch_size, seed=tc.seed, rank=rank,
                                world_size=world, doc_mask=cfg.data.doc_mask)
    counters = {"step": 0, "tokens": 0}
    resumed_from = None
    if cfg.checkpoint.resume:
        path = _latest_complete(ckpt_dir) if cfg.checkpoint.resume == "auto" else Path(cfg.checkpoint.resume)
        if path is not None:
            if not (path / "COMPLETE").exists():
                raise ConfigError(f"checkpoint.resume={path}: not a complete DeepSpeed checkpoint folder")
            _, client = engine.load_checkpoint(str(path.parent), tag=path.name)
            loader.load_state_dict(client["loader"])
            counters.update(client["counters"])
            resumed_from = str(path)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    log = MetricsLogger(run_dir, tc.max_steps, is_main=rank == 0, tensorboard=cfg.logging.tensorboard,
                        progress=cfg.logging.progress, resume_step=counters["step"])

    def all_sum(t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t)
        return t

    def save(step: int) -> Path:
        tag = f"step_{step:07d}"
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"loader": loader.state_dict(),
                                                                     "counters": dict(counters)})
        dist.barrier()
        if rank == 0:
            (ckpt_dir / tag / "COMPLETE").write_text(json.dumps({"step": step}))
        dist.barrier()
        return ckpt_dir / tag

    last_saved, last_eval, accum = None, {}, tc.grad_accum_steps
    win = torch.zeros(2, dtype=torch.float64)  # [loss sum, tokens] since the last log line
    win_t0 = time.perf_counter()
    try:
        while counters["step"] < tc.max_steps:
            micro = [loader.next_batch() for _ in range(accum)]
            local = torch.tensor([sum(int((mb["labels"] != -100).sum()) for mb in micro)], dtype=torch.float64)
            ntok = int(all_sum(local).item())
            lr = scheduler.get_last_lr()[0]
            scale = accum * world / max(ntok, 1)
            for mb in micro:
                doc = mb.get("doc_ids")
                x_BT = mb["input_ids"].to(device)
                logits_BTV = engine(x_BT, doc.to(device)) if doc is not None else engine(x_BT)
                ce = F.cross_entropy(logits_BTV.flatten(0, 1).float(), mb["labels"].to(device).flatten(),
                                     ignore_index=-100, reduction="sum")
                engine.backward(ce * scale)
                engine.step()  # DeepSpeed updates at the accumulation boundary only
                win[0] += float(ce.detach())
            win[1] += ntok / world
            counters["step"] = step = counters["step"] + 1
            counters["tokens"] += ntok
            if step % cfg.logging.log_every == 0 or step == tc.max_steps:
                totals = all_sum(win.clone())
                dt = time.perf_counter() - win_t0
                norm = engine.get_global_grad_norm()
                log.log({"step": step, "loss": float(totals[0] / max(totals[1], 1)), "lr": lr,
                         "grad_norm": float(norm) if norm is not None else float("nan"),
                         "tokens_per_s": float(totals[1]) / dt if dt > 0 else 0.0, "tokens": counters["tokens"],
                         "elapsed_s": time.time() - t_start})
                win.zero_()
                win_t0 = time.perf_counter()
            if tc.eval_every and step % tc.eval_every == 0 and step < tc.max_steps and val_shards is not None:
                last_eval = _eval(engine, val_shards, cfg, device, all_sum, world)
                if last_eval:
                    log.log({"step": step, **last_eval})
            if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0 and step < tc.max_steps:
                last_saved = save(step)
        if val_shards is not None:
            last_eval = _eval(engine, val_shards, cfg, device, all_sum, world)
            if last_eval:
                log.log({"step": counters["step"], **last_eval})
        last_saved = save(counters["step"])
        _export(engine, model, deepspeed, ds_cfg, rank, run_dir, counters["step"], export_safetensors)
    finally:
        log.close()
    summary = {"engine": "deepspeed", "zero_stage": ds_cfg["zero_optimization"]["stage"], "world_size": world,
               "stop_reason": "max_steps", "steps": counters["step"], "tokens": counters["tokens"],
               "elapsed_s": time.time() - t_start, "final_checkpoint": str(last_saved),
               "resumed_from": resumed_from, **last_eval}
    if rank == 0:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


@torch.no_grad()
def _eval(engine, val_shards, cfg: Config, device, all_sum, world: int) -> dict:
    """Rank r evaluates windows r, r+world, ... of the fixed validation set; token-weighted global mean. Every
    rank runs the same number of forwards (ZeRO-3 gathers are collective): short ranks repeat a window with
    weight 0."""
    from lmforge.data.loader import SequentialEvalLoader
    from lmforge.training.step import micro_loss_sum

    batches = list(SequentialEvalLoader(val_shards, cfg.data.seq_len, cfg.training.micro_batch_size,
                                        cfg.training.eval_batches, doc_mask=cfg.data.doc_mask))
    if not batches:
        return {}
    mine = batches[dist.get_rank()::world]
    n = -(-len(batches) // world)
    totals = torch.zeros(2, dtype=torch.float64)
    engine.eval()
    try:
        for i in range(n):
            real = i < len(mine)
            batch = mine[i] if real else batches[0]
            ce = micro_loss_sum(engine, batch, device)
            if real:
                totals += torch.tensor([float(ce), float((batch["labels"] != -100).sum())], dtype=torch.float64)
    finally:
        engine.train()
    loss_sum, ntok = all_sum(totals).tolist()
    if ntok == 0:
        return {}
    loss = loss_sum / ntok
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": int(ntok)}


def _export(engine, model, deepspeed, ds_cfg: dict, rank: int, run_dir: Path, step: int, export_safetensors) -> None:
    """model.safetensors on rank 0 (ZeRO-3 parameters gathered first)."""
    if ds_cfg["zero_optimization"]["stage"] == 3:
        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            if rank == 0:
                export_safetensors(model, run_dir / "model.safetensors", {"step": step})
    elif rank == 0:
        export_safetensors(model, run_dir / "model.safetensors", {"step": step})
    dist.barrier()
