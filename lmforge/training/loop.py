"""The one training loop, for pretraining and fine-tuning, at every world size and with every engine.

``run_loop(job) -> summary``: resume through the checkpoint manager, then repeat {one ``TrainStep``; a log
line every ``log_every`` steps (the only host reads of loss and norm); evaluation every ``eval_every`` steps;
the stop reason (one function: ``stop_reason``); a checkpoint every ``checkpoint_every`` steps} and save at
the end. What differs between jobs (data, loss, evaluation, best-weights handling, final outputs) lives in the
``Job`` the caller builds.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from lmforge.errors import ConfigError
from lmforge.training.guards import EarlyStopper, SignalCatcher, SpikeDetector


@dataclass
class Limits:
    max_steps: int
    stop_at_step: Optional[int] = None  # stop (and checkpoint) here; the schedule still spans max_steps
    max_minutes: Optional[float] = None  # per invocation
    max_bad_steps: int = 5  # non-finite steps in a row before stopping
    log_every: int = 10
    eval_every: int = 0
    checkpoint_every: int = 0
    spike_factor: Optional[float] = None


class TrainState:
    """The loop's counters (checkpointed as ``trainer``). ``elapsed_s`` spans every invocation of the run."""

    def __init__(self):
        self.step, self.tokens, self.skipped, self.bad_streak = 0, 0, 0, 0
        self.elapsed_s, self._t0 = 0.0, time.time()

    def elapsed(self) -> float:
        return self.elapsed_s + time.time() - self._t0

    def state_dict(self) -> dict:
        return {"step": self.step, "tokens": self.tokens, "skipped": self.skipped, "bad_streak": self.bad_streak,
                "elapsed_s": self.elapsed()}

    def load_state_dict(self, sd: dict) -> None:
        self.step, self.tokens = int(sd["step"]), int(sd["tokens"])
        self.skipped, self.bad_streak = int(sd.get("skipped", 0)), int(sd.get("bad_streak", 0))
        self.elapsed_s, self._t0 = float(sd.get("elapsed_s", 0.0)), time.time()


@dataclass
class Job:
    step: Callable  # a TrainStep
    batches: object  # next_step() -> list of micro-batch dicts; Stateful (saved as ``loader``)
    checkpoints: object  # a CheckpointManager (holds ``state`` as ``trainer``)
    open_log: Callable[[int], object]  # resume step -> MetricsLogger
    evaluate: Callable[[int], dict]  # step -> metrics ({} when there is nothing to evaluate)
    lr: Callable[[], float]
    limits: Limits
    state: TrainState = field(default_factory=TrainState)
    early: Optional[EarlyStopper] = None
    resume: Optional[str] = None
    flops_per_weight: float = 0.0  # training FLOPs per labelled target (MFU); 0: not reported
    peak_flops: float = 1.0
    on_eval: Optional[Callable[[int, dict], None]] = None  # fine-tuning keeps its best weights here
    on_start: Optional[Callable[[object], None]] = None  # after resume, with the logger
    extra_record: Optional[Callable[[], dict]] = None  # e.g. loss_scale, mem_gb on log lines
    external_stop: Optional[Callable[[], Optional[str]]] = None  # after each step: a reason to stop (e.g. a tuning
    # pruner's "pruned", set from ``on_eval``); agreed by every rank; the run stops with the usual final save


def due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


def stop_reason(st: TrainState, lim: Limits, out, early_stop: bool, signal: Optional[str],
                external: Optional[str] = None) -> Optional[str]:
    """Why the run stops after this step, or None to go on (first match wins). ``external``: the Job's
    ``external_stop()`` (a finished run still says max_steps; an external stop wins over per-invocation ones)."""
    if st.bad_streak >= lim.max_bad_steps:
        return "non_finite"
    if out is not None and out.scaler_stop:
        return "fp16_underflow"
    if early_stop:
        return "early_stop"
    if st.step >= lim.max_steps:
        return "max_steps"
    if external:
        return external
    if lim.stop_at_step is not None and st.step >= lim.stop_at_step:
        return "stop_at_step"
    if out is not None and out.budget:
        return "time_budget"
    if signal or (out is not None and out.signal):
        return f"signal_{signal or 'SIGTERM'}"
    return None


def run_loop(job: Job) -> dict:
    st, lim = job.state, job.limits
    if job.resume not in (None, "", "auto") and not Path(job.resume).exists():
        raise ConfigError(f"checkpoint.resume={job.resume}: no such checkpoint folder",
                          hint="give 'auto' (the newest complete checkpoint of the run) or an existing step_* folder")
    resumed = job.checkpoints.load(job.resume)
    log = job.open_log(st.step)
    if resumed:
        log.message(f"resumed from {resumed} at step {st.step}")
    if job.on_start:
        job.on_start(log)
    t_start, window, metrics, last_eval, start_step = time.time(), _Window(st.step), {}, {}, st.step
    spikes = SpikeDetector(lim.spike_factor)
    job.step.read_norm = lim.spike_factor is not None
    reason = stop_reason(st, lim, None, False, None) if st.step >= lim.max_steps or lim.stop_at_step else None
    try:
        with SignalCatcher() as signals:
            while reason is None:
                lr = job.lr()
                budget = lim.max_minutes is not None
                out = job.step(job.batches.next_step(),
                               lambda: (budget and time.time() - t_start >= lim.max_minutes * 60, bool(signals.caught)))
                _count(st, out, log, spikes, job.step)
                if st.step == start_step + 1:
                    _budget_note(lim, log, time.time() - t_start, st.step)
                window.add(out)
                if due(st.step, lim.log_every) or st.step == lim.max_steps:
                    log.log(window.flush(st, lr, out, job))
                metrics = {}
                if due(st.step, lim.eval_every) and st.step < lim.max_steps:
                    metrics = last_eval = _evaluate(job, log, st.step)
                stopped = bool(metrics) and job.early is not None and job.early.update(metrics)
                external = job.external_stop() if job.external_stop else None
                reason = stop_reason(st, lim, out, stopped, signals.caught, external)
                if reason in ("max_steps", "time_budget") and not metrics:
                    metrics = last_eval = _evaluate(job, log, st.step)  # a finished run reports its val loss
                if reason is not None and reason != "non_finite":
                    job.checkpoints.save(st.step, metrics)
                elif reason is None and due(st.step, lim.checkpoint_every) and not st.bad_streak:
                    job.checkpoints.save(st.step, metrics)
            _farewell(reason, st, job, log, signals.caught)
    finally:
        log.close()
    return {"stop_reason": reason, "steps": st.step, "tokens": st.tokens, "skipped_steps": st.skipped,
            "elapsed_s": st.elapsed(), "final_checkpoint": str(job.checkpoints.last_saved or resumed or "") or None,
            "resumed_from": str(resumed) if resumed else None, **last_eval}


def _count(st: TrainState, out, log, spikes: SpikeDetector, step) -> None:
    st.step += 1
    st.tokens += int(round(out.weight))
    if out.finite:
        st.bad_streak = 0
        if spikes.factor is not None and spikes.update(step.last_norm):
            log.message(f"step {st.step}: grad-norm spike {step.last_norm:.3g} (> {spikes.factor}x running mean "
                        f"{spikes.mean:.3g})")
        return
    st.skipped += 1
    st.bad_streak = 0 if out.overflow else st.bad_streak + 1
    log.message(f"step {st.step}: {'fp16 overflow' if out.overflow else 'non-finite loss/grad'}; update skipped "
                f"({st.skipped} so far)")


def _budget_note(lim: Limits, log, first_s: float, step: int) -> None:
    """After the first step: say when the time budget cannot hold the run (the first step includes warm-up,
    so this errs on the side of fitting)."""
    if lim.max_minutes is None:
        return
    budget = lim.max_minutes * 60
    left = lim.max_steps - step
    if first_s >= budget:
        log.message(f"time budget: one step took {first_s:.0f}s, longer than training.max_minutes="
                    f"{lim.max_minutes:g} ({budget:.0f}s); the run stops after this step")
    elif left and first_s * (left + 1) > budget:
        log.message(f"time budget: at {first_s:.1f}s per step about {int(budget // first_s)} of the "
                    f"{lim.max_steps - step + 1} remaining steps fit in training.max_minutes={lim.max_minutes:g}")


def _evaluate(job: Job, log, step: int) -> dict:
    metrics = job.evaluate(step)
    if metrics:
        log.log({"step": step, **metrics})
        if job.on_eval:
            job.on_eval(step, metrics)
    return metrics


def _farewell(reason: Optional[str], st: TrainState, job: Job, log, caught: Optional[str]) -> None:
    if reason == "non_finite":
        log.message(f"stopping: {st.bad_streak} non-finite steps in a row; weights are those of the last good "
                    f"step; last good checkpoint: {job.checkpoints.last_saved}. Try a lower optimizer.lr, "
                    "a gradient clip or precision bf16")
    elif reason == "early_stop":
        log.message(f"early stopping: {job.early.describe()}")
    elif reason == "stop_at_step" and job.checkpoints.last_saved is None:
        log.message(f"stop_at_step={job.limits.stop_at_step} already reached (at step {st.step})")
    elif reason and reason.startswith("signal_"):
        log.message(f"stopped by {caught or reason[7:]} after step {st.step}; checkpoint "
                    f"{job.checkpoints.last_saved}. Resume with --resume auto")


class _Window:
    """Loss, targets and time since the last log line; the loss is summed on the device and read here."""

    def __init__(self, step: int):
        self.loss, self.weight, self.t0 = None, 0.0, time.perf_counter()

    def add(self, out) -> None:
        self.loss = out.loss_sum.detach().double() if self.loss is None else self.loss + out.loss_sum.detach()
        self.weight += out.weight
        self.norm = out.norm

    def flush(self, st: TrainState, lr: float, out, job: Job) -> dict:
        loss = self.loss
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(loss)
        dt = time.perf_counter() - self.t0
        tps = self.weight / dt if dt > 0 else 0.0
        loss_v, norm = torch.stack([loss.double(), self.norm.double().to(loss.device)]).tolist()
        rec = {"step": st.step, "loss": loss_v / max(self.weight, 1.0), "lr": lr, "grad_norm": norm,
               "tokens_per_s": tps, "tokens": st.tokens, "skipped": st.skipped, "elapsed_s": st.elapsed()}
        if job.flops_per_weight:
            rec["mfu"] = job.flops_per_weight * tps / job.peak_flops
        if job.extra_record:
            rec.update(job.extra_record())
        self.loss, self.weight, self.t0 = None, 0.0, time.perf_counter()
        return {k: v for k, v in rec.items() if not (isinstance(v, float) and math.isnan(v) and k == "mfu")}
