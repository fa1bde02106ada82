"""Run one trial's job (train / finetune / cross-validated finetune / throughput probe) → its outcome.

Outcome: ``{"state": complete | pruned | failed, "values": [...], "run_dir", "user_attrs", "reason"}``.
A trial resumed after its process died continues from the run's newest checkpoint
(``checkpoint.resume=auto``); a run that had already finished is read back, not retrained.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Optional

from lmforge.tune.plan import Plan
from lmforge.tune.trial import PruneHook

_DONE = ("max_steps", "early_stop", "pruned", "time_budget")


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a kill
    return out


def tokens_per_s(run_dir: Path, skip_steps: int = 0) -> Optional[float]:
    """Median logged tokens/s over steps after ``skip_steps`` (warm-up left out)."""
    tps = [r["tokens_per_s"] for r in _records(run_dir) if "tokens_per_s" in r and r.get("step", 0) > skip_steps]
    return statistics.median(tps) if tps else None


def metric_value(metric: str, summary: dict, run_dir: Path, kind: str) -> Optional[float]:
    """A finished run's objective: from its summary, else its last logged value."""
    if metric == "tokens_per_s":
        return tokens_per_s(run_dir, 1)
    if kind == "finetune":
        return (summary.get("validation") or {}).get(metric)
    if metric in summary:
        return summary[metric]
    for r in reversed(_records(run_dir)):
        if metric in r:
            return r[metric]
    return None


def _run_job(plan: Plan, cfg, hook: PruneHook) -> dict:
    if plan.kind == "finetune":
        from lmforge.finetune.trainer import finetune

        return finetune(cfg, on_job=hook)
    from lmforge.training.trainer import train

    if cfg.distributed.engine == "deepspeed":
        from lmforge.errors import ConfigError

        raise ConfigError("lmforge tune: distributed.engine=deepspeed trials are not supported (use native)")
    return train(cfg, on_job=hook)


def _trial_config(plan: Plan, run_dir: Path, params: dict, extra: Optional[dict] = None):
    fixed = {"run_dir": str(run_dir), "checkpoint.resume": "auto"}
    if plan.kind == "train":
        fixed.update({"logging.progress": False})
    return plan.job().load(params, {**fixed, **(extra or {})})


def _finished(run_dir: Path) -> Optional[dict]:
    path = run_dir / "summary.json"
    if not path.is_file():
        return None
    s = json.loads(path.read_text())
    return s if s.get("stop_reason") in _DONE else None


def judge_from(plan: Plan, cfg) -> int:
    """The first step the pruner may judge a trial of job config ``cfg`` at (``pruner.after_warmup``)."""
    from lmforge.training.schedule import warmup_end

    return warmup_end(cfg.scheduler) if plan.cfg.pruner.after_warmup else 0


def run_single(plan: Plan, run_dir: Path, params: dict, trial, distributed: bool, rank0: bool,
               extra: Optional[dict] = None) -> dict:
    """One run → outcome; ``extra`` overrides (a fold's data files)."""
    metric = plan.metrics[0]
    summary = _finished(run_dir)
    if summary is None:
        cfg = _trial_config(plan, run_dir, params, extra)
        hook = PruneHook(trial if len(plan.metrics) == 1 else None, metric, distributed, rank0,
                         judge_from(plan, cfg))
        summary = _run_job(plan, cfg, hook)
    reason = summary.get("stop_reason")
    if str(reason).startswith("signal_"):  # Ctrl-C / SIGTERM: checkpointed, left RUNNING for the rerun to resume
        return {"state": "interrupted", "values": [], "run_dir": str(run_dir), "reason": reason}
    if reason == "pruned":
        return {"state": "pruned", "values": [], "run_dir": str(run_dir), "reason": "pruner"}
    if reason not in _DONE:
        return {"state": "failed", "values": [], "run_dir": str(run_dir), "reason": f"stopped: {reason}"}
    values = [metric_value(m, summary, run_dir, plan.kind) for m in plan.metrics]
    if any(v is None or not math.isfinite(v) for v in values):
        missing = [m for m, v in zip(plan.metrics, values) if v is None or not math.isfinite(v)]
        return {"state": "failed", "values": [], "run_dir": str(run_dir), "reason": f"no value for {missing}"}
    return {"state": "complete", "values": values, "run_dir": str(run_dir)}


def _stopped_before(plan: Plan, trial, params: dict) -> bool:
    """A resumed trial that the pruner had already stopped at its last report."""
    if trial is None or len(plan.metrics) != 1:
        return False
    last = trial.study._storage.get_trial(trial._trial_id).last_step
    if last is None:
        return False
    training_steps = plan.cfg.cv is None and plan.mode != "throughput"  # cross-validation reports fold indices
    start = judge_from(plan, plan.job().load(params)) if training_steps else 0
    return last >= start and trial.should_prune()


def run_trial(plan: Plan, run_dir: Path, params: dict, trial, distributed: bool, rank0: bool) -> dict:
    """The trial's outcome (rank 0's decisions are what every rank acts on)."""
    from lmforge.tune.trial import _broadcast

    if _broadcast(rank0 and _stopped_before(plan, trial, params), distributed):
        return {"state": "pruned", "values": [], "run_dir": str(run_dir), "reason": "pruner (before resuming)"}
    if plan.mode == "throughput":
        from lmforge.tune.throughput import run_probe

        return run_probe(plan, run_dir, params, distributed, rank0)
    if plan.cfg.cv is not None:
        from lmforge.tune.cv import run_cv

        return run_cv(plan, run_dir, params, trial, distributed, rank0)
    return run_single(plan, run_dir, params, trial, distributed, rank0)
