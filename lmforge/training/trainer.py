"""``train(cfg) -> summary``: one whole pretraining run (CLM or MLM) inside ``cfg.run_dir``.

Run folder: ``config.yaml`` (resolved, e.g. vocab_size from the data), ``metrics.jsonl``, ``tensorboard/``,
``checkpoints/step_XXXXXXX/``, ``model.safetensors`` (final weights), ``report.html``, ``summary.json``.

This module only assembles the run's ``Job`` (data, engine, checkpoint manager, evaluation, logging) for the
one loop in ``training/loop.py``; the one step is ``training/step.py``. Every world size and the DeepSpeed
engine go through the same path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch

from lmforge.config import Config, save_config
from lmforge.training.build import (StepBatches, build_engine, check_distributed, device_for, make_loaders,
                                    open_data, resolve_model_cfg, resolve_precision, seed_everything)
from lmforge.training.guards import EarlyStopper
from lmforge.training.loop import Job, Limits, TrainState, run_loop
from lmforge.training.metrics import MetricsLogger, peak_flops
from lmforge.training.step import LMObjective, StepSettings, TrainStep, evaluate


def resolve_device(want: str) -> torch.device:
    from lmforge.distributed.mesh import ParallelDims

    return device_for(ParallelDims(1, 1, 1, 1, 1), want)


def train(cfg: Config, on_job: Optional[Callable[[Job], None]] = None, *, prepare=None) -> dict:
    """Run (or resume) training as configured; returns the summary also written to ``summary.json``. Under
    torchrun every rank calls this; world size 1 without a launcher is the plain single-process run.
    ``on_job(job)`` may add hooks to the Job before the loop runs (``lmforge tune``: pruning; ``lmforge compress``:
    the distillation objective); ``prepare(model)`` runs on the materialised model before the optimizer exists
    (``build_engine``; ``lmforge compress``: the compressed weights)."""
    from lmforge.distributed.mesh import destroy_distributed, init_distributed

    if cfg.distributed.engine == "deepspeed":
        from lmforge.distributed.deepspeed_engine import train_with_deepspeed

        return train_with_deepspeed(cfg)
    pdims = init_distributed(cfg)
    try:
        summary = _train(cfg, pdims, on_job, prepare)
    except BaseException:
        destroy_distributed(abort=True)
        raise
    destroy_distributed()
    return summary


def _train(cfg: Config, pdims, on_job=None, prepare=None) -> dict:
    cfg = cfg.model_copy(deep=True)
    device = device_for(pdims, cfg.training.device)
    lint_config(cfg, pdims, device)
    train_shards, val_shards = open_data(cfg)
    resolve_model_cfg(cfg, train_shards)
    check_distributed(cfg, pdims)
    choice = resolve_precision(cfg, pdims, device)
    seed_everything(cfg.training.seed)
    built = build_engine(cfg, pdims, device, prepare)
    loader = StepBatches(make_loaders(cfg, pdims, train_shards), cfg.training.grad_accum_steps)
    job = lm_job(cfg, pdims, built.engine, loader, val_shards, built.base.flops_per_token(cfg.data.seq_len), choice)
    if on_job is not None:
        on_job(job)
    summary = run_loop(job)
    return finish(cfg, pdims, built.engine.model, job, summary)


def lint_config(cfg: Config, pdims, device) -> None:
    """Contradictions are ConfigErrors naming both keys; valid-but-pointless settings are warned about (rank 0),
    before any data is opened or a run folder exists."""
    import sys

    from lmforge.config_checks import lint

    for warning in lint(cfg, device):
        if pdims.is_rank0:
            print(f"lmforge train: warning: {warning}", file=sys.stderr)


def lm_job(cfg: Config, pdims, engine, batches, val_shards, flops_per_token: float, precision,
           deepspeed: bool = False) -> Job:
    """The pretraining Job around a built engine (native, pipeline or the DeepSpeed adapter)."""
    tc, run_dir = cfg.training, Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    state, early, objective = TrainState(), EarlyStopper.from_config(tc), LMObjective()
    step = TrainStep(engine, objective, pdims, StepSettings(tc.grad_clip, tc.precision))
    manager = _manager(cfg, pdims, engine, state, early, batches, deepspeed)
    compute = {"fp16": torch.float16, "fp32": torch.float32}.get(tc.precision, torch.bfloat16)
    limits = Limits(tc.max_steps, tc.stop_at_step, tc.max_minutes, tc.max_bad_steps, cfg.logging.log_every,
                    tc.eval_every, cfg.checkpoint.every_steps, tc.spike_factor)

    def run_eval(at: int) -> dict:
        if val_shards is None:
            return {}
        from lmforge.data.loader import SequentialEvalLoader
        from lmforge.data.mlm import mlm_loaders_for

        batches = SequentialEvalLoader(val_shards, cfg.data.seq_len, tc.micro_batch_size, tc.eval_batches,
                                       rank=pdims.dp_rank, world_size=pdims.dp, doc_mask=cfg.data.doc_mask)
        return evaluate(engine, objective, mlm_loaders_for(cfg, eval_batches=batches, rank=pdims.dp_rank),
                        tc.precision)

    def open_log(resume_step: int) -> MetricsLogger:
        return MetricsLogger(run_dir, tc.max_steps, is_main=pdims.is_rank0, tensorboard=cfg.logging.tensorboard,
                             progress=cfg.logging.progress, resume_step=resume_step)

    def on_start(log) -> None:
        from lmforge.hardware import cpu_facts

        cpu = cpu_facts()
        flags = ", ".join(k for k, v in cpu.get("flags", {}).items() if v) or "no vector flags read"
        log.message(f"{precision.log_line()}; cpu: {cpu.get('model') or 'unknown'} ({flags})")
        if pdims.is_rank0:
            saved = cfg.model_copy(deep=True)
            saved.training.stop_at_step = None  # a per-invocation stop, not part of the run's definition
            save_config(saved, run_dir / "config.yaml")
        if pdims.is_distributed:
            log.message(f"distributed: world {pdims.world_size}, strategy {pdims.strategy}, dp_replicate "
                        f"{pdims.dp_replicate} × dp_shard {pdims.dp_shard} × tp {pdims.tp} × pp {pdims.pp}")

    def extra() -> dict:
        rec = {"loss_scale": engine.scaler.scale} if engine.scaler else {}
        if engine.device.type == "cuda":
            rec["mem_gb"] = torch.cuda.max_memory_allocated(engine.device) / 2**30
        return rec

    peak = peak_flops(engine.device, compute) * pdims.world_size if pdims.is_rank0 else 1.0
    job = Job(step, batches, manager, open_log, run_eval, engine.lr, limits, state, early, cfg.checkpoint.resume,
               flops_per_token, peak, on_start=on_start, extra_record=extra)
    job.precision = precision
    return job


def _manager(cfg: Config, pdims, engine, state: TrainState, early, batches, deepspeed: bool):
    from lmforge.checkpoint import CheckpointManager, RNGState

    cc = cfg.checkpoint
    shared = {"trainer": state, "early_stop": early, "scaler": engine.scaler, "master": engine.master}
    if not deepspeed:  # DeepSpeed checkpoints its own scheduler with the engine
        shared["scheduler"] = engine.scheduler
    return CheckpointManager(cfg.run_dir, model=engine.model, optimizer=engine.optimizer, shared=shared,
                             per_rank={"rng": RNGState(), "loader": batches}, pdims=pdims, keep_last=cc.keep_last,
                             keep_best=cc.keep_best, best_metric=cc.best_metric, best_mode=cc.best_mode,
                             engine=engine if deepspeed else None)


def finish(cfg: Config, pdims, model, job: Job, summary: dict, export: bool = True) -> dict:
    """Final ``model.safetensors`` (unless the run stopped non-finite), ``summary.json`` and the report."""
    run_dir = Path(cfg.run_dir)
    if export and summary["stop_reason"] != "non_finite":
        _export(model, run_dir, summary["steps"], pdims, job.checkpoints.last_saved)
    if pdims.is_distributed:
        from lmforge.distributed.utils import local_state_bytes

        summary["world_size"] = pdims.world_size
        summary["rank_state_bytes"] = local_state_bytes(model, getattr(job.step.engine, "optimizer", None))
    if cfg.eval.enabled and summary["stop_reason"] in ("max_steps", "early_stop", "time_budget"):
        summary.update(_evaluate_at_end(cfg, pdims, model, run_dir))
    if pdims.is_rank0:
        from lmforge.environment import environment_facts
        from lmforge.training.report import finish_run

        summary["precision"] = job.precision.to_dict()
        summary["environment"] = environment_facts(check_gloo=False, device=str(job.step.engine.device.type))
        finish_run(cfg, run_dir, summary)
    return summary


def _evaluate_at_end(cfg: Config, pdims, model, run_dir: Path) -> dict:
    """``eval.enabled``: rank 0 scores the exported weights (one process; peers wait)."""
    from lmforge.evaluation.run import evaluate_at_end

    metrics: dict = {}
    if pdims.is_rank0:
        if pdims.is_distributed:
            from lmforge.inference import load_run

            model = load_run(run_dir, str(run_dir / "model.safetensors"))[0]
        metrics = evaluate_at_end(cfg, model, run_dir)
    if pdims.is_distributed:
        import torch.distributed as dist

        box = [metrics]
        dist.broadcast_object_list(box, src=0)
        metrics = box[0]
    return metrics


def _export(model, run_dir: Path, step: int, pdims, last_saved) -> None:
    """Final ``model.safetensors``: the live weights, or (multi-process) rank 0 merges the last checkpoint."""
    from lmforge.checkpoint import export_safetensors, full_weights

    if not pdims.is_distributed:
        export_safetensors(model, run_dir / "model.safetensors", {"step": step})
        return
    if pdims.is_rank0 and last_saved is not None:
        export_safetensors(full_weights(last_saved), run_dir / "model.safetensors", {"step": step})
    import torch.distributed as dist

    dist.barrier()
