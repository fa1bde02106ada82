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
import random
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from lmforge.config import Config, ConfigError, save_config
from lmforge.training import checkpoint as ckpt
from lmforge.training.guards import EarlyStopper, SignalCatcher, SpikeDetector
from lmforge.training.metrics import MetricsLogger, peak_flops
from lmforge.training.optim import build_optimizer
from lmforge.training.precision import MasterWeights, make_loss_scaler
from lmforge.training.schedule import build_scheduler
from lmforge.training.step import accumulate_gradients, count_valid_tokens, evaluate, grad_norm_and_clip


def resolve_device(want: str) -> torch.device:
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("training.device=cuda but CUDA is not available")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _open_data(cfg: Config):
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


def _resolve_model_cfg(cfg: Config, train_shards) -> None:
    data_vocab = train_shards.vocab_size
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = data_vocab
    elif cfg.model.vocab_size < data_vocab:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the data's tokenizer "
                          f"vocabulary ({data_vocab}, {cfg.data.path}/manifest.json)")
    if cfg.data.seq_len > cfg.model.max_seq_len:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}")


def _wrap_model(model, tc) -> None:
    from lmforge.training.wrap import apply_activation_checkpointing, apply_compile

    if tc.activation_checkpointing:
        apply_activation_checkpointing(model, every=tc.ac_every, selective=tc.ac_selective)
    if tc.compile:
        apply_compile(model, cache_dir=tc.compile_cache_dir)


def train(cfg: Config) -> dict:
    """Run (or resume) training as configured; returns the summary also written to ``summary.json``."""
    t_start = time.time()
    cfg = cfg.model_copy(deep=True)
    tc, cc = cfg.training, cfg.checkpoint
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(tc.device)
    train_shards, val_shards = _open_data(cfg)
    _resolve_model_cfg(cfg, train_shards)
    seed_everything(tc.seed)
    from lmforge.models import build_model

    model = build_model(cfg.model, device=device, seed=tc.seed)
    master = MasterWeights.maybe(model, tc)
    _wrap_model(model, tc)
    optimizer = build_optimizer(master.model_for_optimizer() if master else model, cfg.optimizer)
    scheduler = build_scheduler(optimizer, cfg.scheduler, tc.max_steps)
    scaler = make_loss_scaler(tc)
    from lmforge.data.loader import RandomWindowLoader, SequentialEvalLoader

    loader = RandomWindowLoader(train_shards, cfg.data.seq_len, tc.micro_batch_size, seed=tc.seed,
                                doc_mask=cfg.data.doc_mask)
    counters = {"step": 0, "tokens": 0, "skipped": 0, "bad_streak": 0, "elapsed_s": 0.0}
    early = EarlyStopper.from_config(tc)
    resumed_from = _maybe_resume(cfg, run_dir, model, optimizer, scheduler, loader, counters, early, scaler,
                                 master, device)
    saved = cfg.model_copy(deep=True)
    saved.training.stop_at_step = None  # a per-invocation stop, not part of the run's definition
    save_config(saved, run_dir / "config.yaml")
    log = MetricsLogger(run_dir, tc.max_steps, tensorboard=cfg.logging.tensorboard, progress=cfg.logging.progress,
                        resume_step=counters["step"])
    if resumed_from:
        log.message(f"resumed from {resumed_from} at step {counters['step']}")
    compute_dtype = {"fp16": torch.float16, "fp32": torch.float32}.get(tc.precision, torch.bfloat16)
    peak = peak_flops(device, compute_dtype)
    flops_tok = model.flops_per_token(cfg.data.seq_len)
    params = [p for p in model.parameters() if p.requires_grad]
    spikes = SpikeDetector(tc.spike_factor)

    def run_eval(step: int) -> dict:
        if val_shards is None:
            return {}
        batches = SequentialEvalLoader(val_shards, cfg.data.seq_len, tc.micro_batch_size, tc.eval_batches,
                                       doc_mask=cfg.data.doc_mask)
        res = evaluate(model, batches, device, tc.precision)
        if res:
            log.log({"step": step, **res})
        return res

    def save(step: int, metrics: dict) -> Path:
        state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": ckpt.rng_state(),
                 "loader": loader.state_dict(), "trainer": dict(counters, elapsed_s=elapsed()),
                 "early_stop": early.state_dict() if early else None,
                 "scaler": scaler.state_dict() if scaler else None,
                 "master": master.state_dict() if master else None}
        return ckpt.save_checkpoint(run_dir, step, model, state, metrics=metrics, keep_last=cc.keep_last,
                                    keep_best=cc.keep_best, best_metric=cc.best_metric, best_mode=cc.best_mode)

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
    try:
        with catcher:
            while counters["step"] < tc.max_steps and stop_reason == "max_steps":
                step = counters["step"]
                micro = [loader.next_batch() for _ in range(tc.grad_accum_steps)]
                ntok = count_valid_tokens(micro)
                lr = scheduler.get_last_lr()[0]
                loss_sum = accumulate_gradients(model, micro, device, total_tokens=ntok, precision=tc.precision,
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
                budget_hit = tc.max_minutes is not None and time.time() - t_start >= tc.max_minutes * 60
                stop_here = tc.stop_at_step is not None and step >= tc.stop_at_step
                if budget_hit and stop_reason == "max_steps":
                    stop_reason = "time_budget"
                if stop_here and stop_reason == "max_steps":
                    stop_reason = "stop_at_step"
                if catcher.caught and stop_reason == "max_steps":
                    stop_reason = f"signal_{catcher.caught}"
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
            ckpt.export_safetensors(model, run_dir / "model.safetensors", {"step": step})
        summary = {"stop_reason": stop_reason, "steps": step, "tokens": counters["tokens"],
                   "skipped_steps": counters["skipped"], "elapsed_s": elapsed(),
                   "final_checkpoint": str(last_saved) if last_saved else None, "resumed_from": resumed_from,
                   **{k: v for k, v in last_eval.items()}}
        if catcher.caught:
            log.message(f"stopped by {catcher.caught} after step {step}; checkpoint {last_saved}. "
                        f"Resume with: lmforge train --config {run_dir / 'config.yaml'} --resume auto")
    finally:
        log.close()
    from lmforge.training.report import finish_run

    finish_run(cfg, run_dir, summary)
    return summary


def _maybe_resume(cfg: Config, run_dir: Path, model, optimizer, scheduler, loader, counters: dict, early, scaler,
                  master, device) -> str | None:
    spec = cfg.checkpoint.resume
    if not spec:
        return None
    if spec == "auto":
        path, state = ckpt.load_latest(run_dir, model, map_location=device)
        if path is None:
            return None
    else:
        path = Path(spec)
        if not path.is_dir():
            raise ConfigError(f"checkpoint.resume={spec}: no such checkpoint folder")
        state = ckpt.load_checkpoint(path, model, map_location=device)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    loader.load_state_dict(state["loader"])
    counters.update(state["trainer"])
    if early and state.get("early_stop"):
        early.load_state_dict(state["early_stop"])
    if scaler and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    if master and state.get("master"):
        master.load_state_dict(state["master"])
    ckpt.set_rng_state(state["rng"])
    return str(path)
