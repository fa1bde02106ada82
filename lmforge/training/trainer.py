"""``train(cfg) -> summary``: one whole training run inside ``cfg.run_dir``.

Run folder: ``config.yaml`` (resolved, e.g. vocab_size from the data), ``metrics.jsonl``, ``tensorboard/``,
``checkpoints/step_XXXXXXX/``, ``model.safetensors`` (final weights), ``report.html``, ``summary.json``.

A step = fetch all ``grad_accum_steps`` micro-batches, count valid targets, backward each with
``sum CE / count``, one global-norm clip, a finite check (one scalar host sync), optimizer + scheduler step.
Skipped (non-finite or fp16-overflow) steps still advance the step counter and the schedule so the data
stream and the lr stay aligned with an uninterrupted run. Loss/throughput are read back on logging steps only.
"""

from __future__ import annotations

import math
import time
import warnings
from pathlib import Path

import torch

from lmforge.config import Config, ConfigError, save_config
from lmforge.training import checkpoint as ckpt
from lmforge.training.guards import EarlyStopper, SignalCatcher, SpikeDetector
from lmforge.training.metrics import MetricsLogger, peak_flops
from lmforge.training.setup import (build_parts, check_distributed, device_for, make_loaders, open_data,
                                    resolve_model_cfg, seed_everything)
from lmforge.training.step import accumulate_gradients, count_valid_tokens, evaluate, grad_norm_and_clip

_open_data, _resolve_model_cfg = open_data, resolve_model_cfg  # names other engines import


def resolve_device(want: str) -> torch.device:
    from lmforge.distributed.mesh import ParallelDims

    return device_for(ParallelDims(1, 1, 1, 1, 1), want)


def train(cfg: Config) -> dict:
    """Run (or resume) training as configured; returns the summary also written to ``summary.json``. Under
    torchrun every rank calls this; world size 1 without a launcher is the plain single-process run."""
    from lmforge.distributed.mesh import destroy_distributed, init_distributed

    pdims = init_distributed(cfg)
    try:
        summary = _train(cfg, pdims)
    except BaseException:
        destroy_distributed(abort=True)
        raise
    destroy_distributed()
    return summary


def _train(cfg: Config, pdims) -> dict:
    t_start = time.time()
    cfg = cfg.model_copy(deep=True)
    tc, cc = cfg.training, cfg.checkpoint
    dist_run, main = pdims.is_distributed, pdims.is_rank0
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = device_for(pdims, tc.device)
    train_shards, val_shards = open_data(cfg)
    resolve_model_cfg(cfg, train_shards)
    check_distributed(cfg, pdims)
    seed_everything(tc.seed)
    parts = build_parts(cfg, pdims, device)
    model, optimizer, scheduler, scaler, master = (parts.model, parts.optimizer, parts.scheduler, parts.scaler,
                                                   parts.master)
    loader = make_loaders(cfg, pdims, train_shards)
    counters = {"step": 0, "tokens": 0, "skipped": 0, "bad_streak": 0, "elapsed_s": 0.0}
    early = EarlyStopper.from_config(tc)
    resumed_from = _maybe_resume(cfg, run_dir, parts, loader, counters, early, device)
    if main:
        saved = cfg.model_copy(deep=True)
        saved.training.stop_at_step = None  # a per-invocation stop, not part of the run's definition
        save_config(saved, run_dir / "config.yaml")
    log = MetricsLogger(run_dir, tc.max_steps, is_main=main, tensorboard=cfg.logging.tensorboard,
                        progress=cfg.logging.progress, resume_step=counters["step"])
    if resumed_from:
        log.message(f"resumed from {resumed_from} at step {counters['step']}")
    if dist_run:
        log.message(f"distributed: world {pdims.world_size}, strategy {pdims.strategy}, dp_replicate "
                    f"{pdims.dp_replicate} × dp_shard {pdims.dp_shard} × tp {pdims.tp} × pp {pdims.pp}")
    compute_dtype = {"fp16": torch.float16, "fp32": torch.float32}.get(tc.precision, torch.bfloat16)
    peak = peak_flops(device, compute_dtype) * pdims.world_size if main else 1.0
    flops_tok = parts.base.flops_per_token(cfg.data.seq_len)
    params = parts.params
    spikes = SpikeDetector(tc.spike_factor)

    def run_eval(step: int) -> dict:
        if val_shards is None:
            return {}
        from lmforge.data.loader import SequentialEvalLoader
        from lmforge.data.mlm import mlm_loaders_for

        batches = SequentialEvalLoader(val_shards, cfg.data.seq_len, tc.micro_batch_size, tc.eval_batches,
                                       rank=pdims.dp_rank, world_size=pdims.dp, doc_mask=cfg.data.doc_mask)
        batches = mlm_loaders_for(cfg, eval_batches=batches, rank=pdims.dp_rank)
        if dist_run:
            from lmforge.training.dist_step import dist_evaluate

            res = dist_evaluate(parts, batches, pdims, tc)
        else:
            res = evaluate(model, batches, device, tc.precision)
        if res:
            log.log({"step": step, **res})
        return res

    def save(step: int, metrics: dict) -> Path:
        shared = {"scheduler": scheduler.state_dict(), "trainer": dict(counters, elapsed_s=elapsed()),
                  "early_stop": early.state_dict() if early else None,
                  "scaler": scaler.state_dict() if scaler else None}
        keep = dict(keep_last=cc.keep_last, keep_best=cc.keep_best, best_metric=cc.best_metric,
                    best_mode=cc.best_mode)
        if dist_run:
            from lmforge.training.checkpoint_sharded import save_sharded

            own = {"rng": ckpt.rng_state(), "loader": loader.state_dict()}
            return save_sharded(run_dir, step, model, optimizer, shared, own, pdims, metrics=metrics, **keep)
        state = {"optimizer": optimizer.state_dict(), "scheduler": shared["scheduler"], "rng": ckpt.rng_state(),
                 "loader": loader.state_dict(), "trainer": shared["trainer"], "early_stop": shared["early_stop"],
                 "scaler": shared["scaler"], "master": master.state_dict() if master else None}
        return ckpt.save_checkpoint(run_dir, step, model, state, metrics=metrics, **keep)

    base_elapsed = counters["elapsed_s"]

    def elapsed() -> float:
        return base_elapsed + time.time() - t_start

    stop_reason, last_saved, last_eval = "max_steps", None, {}
    if tc.stop_at_step is not None and counters["step"] >= tc.stop_at_step:
        stop_reason, last_saved = "stop_at_step", resumed_from
        log.message(f"training.stop_at_step={tc.stop_at_step} already reached (at step {counters['step']})")
    win_loss = torch.zeros((), device=device)
    win_tok, win_t0 = 0, time.perf_counter()
    model.train()
    catcher = SignalCatcher()
    summary: dict = {}
    try:
        with catcher:
            while counters["step"] < tc.max_steps and stop_reason == "max_steps":
                step = counters["step"]
                micro = [loader.next_batch() for _ in range(tc.grad_accum_steps)]
                lr = scheduler.get_last_lr()[0]
                budget_hit = tc.max_minutes is not None and time.time() - t_start >= tc.max_minutes * 60
                caught = catcher.caught
                if dist_run:  # all ranks agree on finite / budget / signal in one all-reduce
                    from lmforge.training.dist_step import dist_train_step

                    res = dist_train_step(parts, micro, pdims, tc, want_stop_budget=budget_hit,
                                          caught_signal=bool(caught))
                    ntok, loss_sum, norm, finite = res.ntok, res.loss_sum, res.norm, res.finite
                    budget_hit, caught = res.stop_budget, (caught or "SIGTERM") if res.signal else None
                else:
                    ntok = count_valid_tokens(micro)
                    loss_sum = accumulate_gradients(model, micro, device, total_tokens=ntok,
                                                    precision=tc.precision,
                                                    loss_scale=scaler.scale if scaler else 1.0)
                    if master:
                        master.grads_to_master()
                    opt_params = master.master_params if master else params
                    if scaler:
                        finite = scaler.unscale_(opt_params)
                        norm = grad_norm_and_clip(opt_params, tc.grad_clip) if finite else torch.tensor(math.inf)
                    else:
                        norm = grad_norm_and_clip(opt_params, tc.grad_clip)
                        finite = bool(torch.isfinite(norm) & torch.isfinite(loss_sum))  # the one per-step sync
                if finite:
                    optimizer.step()
                    if master:
                        master.master_to_model()
                    counters["bad_streak"] = 0
                else:
                    counters["skipped"] += 1
                    overflow = scaler is not None
                    counters["bad_streak"] = counters["bad_streak"] + 1 if not overflow else 0
                    log.message(f"step {step + 1}: {'fp16 overflow' if overflow else 'non-finite loss/grad'}; "
                                f"update skipped ({counters['skipped']} so far)")
                if scaler:
                    stop_msg = scaler.update(found_inf=not finite)
                    if stop_msg:
                        stop_reason = "fp16_underflow"
                        log.message(stop_msg)
                optimizer.zero_grad(set_to_none=True)
                if master:
                    master.zero_grad()
                with warnings.catch_warnings():  # a skipped step still advances the schedule, on purpose
                    warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
                    scheduler.step()
                counters["step"] = step = step + 1
                counters["tokens"] += ntok
                win_loss += loss_sum
                win_tok += ntok
                if finite and spikes.update(float(norm)) and log.is_main:
                    log.message(f"step {step}: grad-norm spike {float(norm):.3g} "
                                f"(> {tc.spike_factor}x running mean {spikes.mean:.3g})")
                if counters["bad_streak"] >= tc.max_bad_steps:
                    stop_reason = "non_finite"
                    log.message(f"stopping: {counters['bad_streak']} non-finite steps in a row; weights are those "
                                f"of the last good step; last good checkpoint: {ckpt.find_latest(run_dir)}. "
                                f"Try a lower optimizer.lr, training.grad_clip or training.precision=bf16")
                    break
                if step % cfg.logging.log_every == 0 or step == tc.max_steps:
                    dt = time.perf_counter() - win_t0
                    tps = win_tok / dt if dt > 0 else 0.0
                    rec = {"step": step, "loss": float(win_loss) / max(win_tok, 1), "lr": lr,
                           "grad_norm": float(norm), "tokens_per_s": tps, "mfu": flops_tok * tps / peak,
                           "tokens": counters["tokens"], "skipped": counters["skipped"], "elapsed_s": elapsed()}
                    if scaler:
                        rec["loss_scale"] = scaler.scale
                    if device.type == "cuda":
                        rec["mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
                    log.log(rec)
                    win_loss.zero_()
                    win_tok, win_t0 = 0, time.perf_counter()
                metrics = {}
                if tc.eval_every and step % tc.eval_every == 0 and step < tc.max_steps:
                    metrics = last_eval = run_eval(step)
                    if early and early.update(metrics or {}):
                        stop_reason = "early_stop"
                        log.message(f"early stopping: {early.describe()}")
                if not dist_run:
                    budget_hit = tc.max_minutes is not None and time.time() - t_start >= tc.max_minutes * 60
                    caught = catcher.caught
                stop_here = tc.stop_at_step is not None and step >= tc.stop_at_step
                if budget_hit and stop_reason == "max_steps":
                    stop_reason = "time_budget"
                if stop_here and stop_reason == "max_steps":
                    stop_reason = "stop_at_step"
                if caught and stop_reason == "max_steps":
                    stop_reason = f"signal_{caught}"
                if stop_reason != "max_steps" and stop_reason != "non_finite":
                    if stop_reason == "time_budget" and not metrics:  # a finished run reports val loss
                        metrics = last_eval = run_eval(step)
                    last_saved = save(step, metrics)
                    break
                if cc.every_steps and step % cc.every_steps == 0 and step < tc.max_steps and not counters["bad_streak"]:
                    last_saved = save(step, metrics)
        step = counters["step"]
        if stop_reason == "max_steps":
            last_eval = run_eval(step)
            last_saved = save(step, last_eval)
        if stop_reason != "non_finite":
            _export(model, run_dir, step, pdims, last_saved, cfg.model.tie_embeddings)
        summary = {"stop_reason": stop_reason, "steps": step, "tokens": counters["tokens"],
                   "skipped_steps": counters["skipped"], "elapsed_s": elapsed(),
                   "final_checkpoint": str(last_saved) if last_saved else None, "resumed_from": resumed_from,
                   **{k: v for k, v in last_eval.items()}}
        if dist_run:
            summary["world_size"] = pdims.world_size
        if catcher.caught or stop_reason.startswith("signal_"):
            log.message(f"stopped by {catcher.caught or stop_reason[7:]} after step {step}; checkpoint {last_saved}. "
                        f"Resume with: lmforge train --config {run_dir / 'config.yaml'} --resume auto")
    finally:
        log.close()
    if main:
        from lmforge.training.report import finish_run

        finish_run(cfg, run_dir, summary)
    return summary


def _export(model, run_dir: Path, step: int, pdims, last_saved, tied: bool) -> None:
    """Final ``model.safetensors``: the live weights, or (multi-process) rank 0 merges the last checkpoint."""
    if not pdims.is_distributed:
        ckpt.export_safetensors(model, run_dir / "model.safetensors", {"step": step})
        return
    if pdims.is_rank0 and last_saved is not None:
        from lmforge.training.checkpoint_sharded import export_from_checkpoint

        export_from_checkpoint(last_saved, run_dir / "model.safetensors", tied=tied)
    import torch.distributed as dist

    dist.barrier()


def _maybe_resume(cfg: Config, run_dir: Path, parts, loader, counters: dict, early, device) -> str | None:
    spec = cfg.checkpoint.resume
    if not spec:
        return None
    path = None if spec == "auto" else Path(spec)
    if path is not None and not path.is_dir():
        raise ConfigError(f"checkpoint.resume={spec}: no such checkpoint folder")
    single = not parts.model_is_sharded
    if single and (path is None or not _is_dcp(path)):
        if path is None:  # the original single-process path (bitwise resume)
            newest = ckpt.find_latest(run_dir)
            if newest is not None and _is_dcp(newest):
                return _resume_any(run_dir, None, parts, loader, counters, early, device)
            path, state = ckpt.load_latest(run_dir, parts.model, map_location=device)
            if path is None:
                return None
        else:
            state = ckpt.load_checkpoint(path, parts.model, map_location=device)
        parts.optimizer.load_state_dict(state["optimizer"])
        if parts.master and state.get("master"):
            parts.master.load_state_dict(state["master"])
        _restore_rest(state, parts, loader, counters, early)
        return str(path)
    return _resume_any(run_dir, path, parts, loader, counters, early, device)


def _is_dcp(path: Path) -> bool:
    try:
        return ckpt.read_manifest(path).get("format") == "dcp"
    except ckpt.CheckpointError:
        return False


def _resume_any(run_dir: Path, path, parts, loader, counters: dict, early, device) -> str | None:
    """Any checkpoint format into any world size (collective when distributed)."""
    from lmforge.training import checkpoint_sharded as shard

    if path is None:
        path, state = shard.load_latest_any(run_dir, parts.model, parts.optimizer, parts.master, device)
        if path is None:
            return None
    else:
        state = shard.load_any(path, parts.model, parts.optimizer, parts.master, device)
    _restore_rest(state, parts, loader, counters, early)
    return str(path)


def _restore_rest(state: dict, parts, loader, counters: dict, early) -> None:
    parts.scheduler.load_state_dict(state["scheduler"])
    loader.load_state_dict(state["loader"])
    counters.update(state["trainer"])
    if early and state.get("early_stop"):
        early.load_state_dict(state["early_stop"])
    if parts.scaler and state.get("scaler"):
        parts.scaler.load_state_dict(state["scaler"])
    ckpt.set_rng_state(state["rng"])
