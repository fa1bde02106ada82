"""``lmforge tune --config study.yaml [--workers N] [--nproc P] [--objective throughput] [--key=value ...]``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lmforge.errors import ConfigError


def tune(config: str, overrides: list[str] | None = None, workers: int = 1, nproc: int = 1,
         objective: str = "quality", echo=print) -> dict:
    """Validate the study (nothing is written on a bad input), then run it until every trial has ended.
    Rerunning the same command continues the study from its ledger."""
    from lmforge.tune.config import load_study_config
    from lmforge.tune.coordinator import Coordinator
    from lmforge.tune.plan import PLAN, Plan, prepare

    try:
        import optuna  # noqa: F401
    except ImportError:
        from lmforge.errors import SetupError

        raise SetupError("lmforge tune needs Optuna", hint="pip install 'lmforge[tune]'") from None
    if workers < 1:
        raise ConfigError(f"--workers {workers}: must be >= 1")
    if nproc < 1:
        raise ConfigError(f"--nproc {nproc}: must be >= 1")
    cfg, origins = load_study_config(config, overrides)
    plan = prepare(cfg, origins, workers, nproc, objective)
    existing = Path(cfg.dir) / PLAN
    if existing.is_file():
        _same_study(Plan.read(cfg.dir), plan)
    plan.write()
    echo(f"[tune] study {cfg.study_name()} in {cfg.dir}: {plan.n_slots} trials, {plan.cfg.sampler.name} sampler, "
         f"{plan.cfg.pruner.name} pruner, {workers} worker(s) × {nproc} process(es); storage {plan.url}")
    return Coordinator(plan, workers, echo=echo).run()


def _same_study(old, new) -> None:
    """A rerun may change workers / nproc, not what the study searches."""
    keys = ("space", "objective", "objectives", "sampler", "pruner", "seed", "base", "overrides", "cv")
    changed = [k for k in keys if old.study.get(k) != new.study.get(k)]
    if changed or old.mode != new.mode:
        raise ConfigError(f"{new.study['dir']} already holds a study with a different {', '.join(changed) or 'mode'}; "
                          "rerunning continues a study as it was defined",
                          hint="use another dir: for a new study, or restore the old settings to continue it")


def _cmd_tune(args: argparse.Namespace, extra: list[str]) -> int:
    if not args.config:
        raise ConfigError("tune: --config study.yaml is required (see docs/tuning.md)")
    rep = tune(args.config, extra, workers=args.workers, nproc=args.nproc, objective=args.objective)
    best = rep.get("best") or []
    if best:
        print(f"best trial {best[0]['number']}: {json.dumps(best[0]['values'])} {json.dumps(best[0]['params'])}; "
              f"report {Path(rep['best_yaml']).parent / 'report.html'}; config {rep['best_yaml']}")
    else:
        print("no trial completed; see the study's report.html and logs/")
    return 0


def add_tune_commands(subparsers) -> None:
    t = subparsers.add_parser("tune", help="hyperparameter search over a train/finetune config (Optuna: grid, "
                              "random, TPE, CMA-ES, GP, NSGA-II; median/ASHA/Hyperband pruning; parallel, resumable)")
    t.add_argument("--config", help="study YAML (base job, space, objective, sampler, pruner; docs/tuning.md)")
    t.add_argument("--workers", type=int, default=1, help="trials run at once on this machine (default 1)")
    t.add_argument("--nproc", type=int, default=1, help="processes per trial (torchrun; default 1)")
    t.add_argument("--objective", choices=("quality", "throughput"), default="quality",
                   help="throughput: search micro-batch, accumulation, checkpointing, strategy and offload for the "
                   "fastest config at the base's global batch under a memory budget")
    t.set_defaults(func=_cmd_tune)
