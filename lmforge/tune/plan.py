"""The resolved study (``DIR/study.json``): what every trial process and every later ``lmforge tune`` reads.

``prepare(cfg, origins, workers, nproc, objective)`` validates everything a study needs before anything is
written (space keys and values against the base job, the objective metrics against what the job reports,
the storage, the sampler and pruner); ``Plan.write`` then creates the folder.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from lmforge.errors import ConfigError
from lmforge.tune.config import StudyConfig
from lmforge.tune.space import BaseJob, Space, check_space_values, detect_kind, parse_space

PLAN = "study.json"
# what each kind of job reports (an objective must be one of these; eval_* from eval.enabled at the end of a run)
TRAIN_METRICS = ("val_loss", "val_ppl", "loss", "tokens_per_s", "mfu")
FINETUNE_METRICS = {"classification": ("val_loss", "val_accuracy", "val_macro_f1", "val_micro_f1"),
                    "token-classification": ("val_loss", "val_accuracy", "val_macro_f1", "val_micro_f1"),
                    "sft": ("val_loss", "val_perplexity")}


@dataclass
class Plan:
    study: dict
    kind: str
    url: str
    lag: int
    n_slots: int
    max_steps: Optional[int]
    metrics: list[str]
    nproc: int = 1
    workers: int = 1
    mode: str = "quality"  # quality | throughput
    global_batch: Optional[int] = None
    extra: dict = field(default_factory=dict)

    @property
    def cfg(self) -> StudyConfig:
        return StudyConfig.model_validate(self.study)

    @property
    def dir(self) -> Path:
        return Path(self.study["dir"])

    def job(self) -> BaseJob:
        return BaseJob(self.kind, self.study["base"], dict(self.study.get("overrides") or {}))

    def space(self) -> Space:
        return parse_space(self.study["space"], self.job().schema())

    def write(self) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "trials").mkdir(exist_ok=True)
        path = self.dir / PLAN
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.replace(path)
        return path

    @classmethod
    def read(cls, study_dir: str | Path) -> "Plan":
        path = Path(study_dir) / PLAN
        if not path.is_file():
            raise ConfigError(f"{study_dir} is not a study folder (no {PLAN})")
        return cls(**json.loads(path.read_text()))


def _reported(kind: str, base_cfg, cfg: StudyConfig) -> tuple[str, ...]:
    if kind == "finetune":
        out = FINETUNE_METRICS[base_cfg.task] + ("tokens_per_s",)
        return tuple(m for m in out if not (cfg.cv and m == "tokens_per_s"))
    extra = ()
    ev = getattr(base_cfg, "eval", None)
    if ev is not None and getattr(ev, "enabled", False):
        extra = ("eval_perplexity", "eval_bits_per_byte", "eval_loss")
    return TRAIN_METRICS + extra


def check_objectives(cfg: StudyConfig, kind: str, base_cfg, origins=None) -> list[str]:
    objs = cfg.all_objectives()
    if not objs:
        raise ConfigError(f"{cfg.base}: the study has no objective: add objective: {{metric: val_loss}}")
    reported = _reported(kind, base_cfg, cfg)
    for i, o in enumerate(objs):
        if o.metric not in reported:
            import difflib

            close = difflib.get_close_matches(o.metric, reported, n=1)
            loc = ("objective", "metric") if cfg.objective is not None else ("objectives", str(i), "metric")
            where = origins.where(loc) if origins is not None else "objective"
            raise ConfigError(f"{where}: objective metric '{o.metric}' is never reported by this {kind} job"
                              f"{f'; did you mean {close[0]!r}?' if close else ''} (it reports: {', '.join(reported)})")
    if kind == "train" and any(o.metric.startswith("val_") for o in objs) and not base_cfg.data.path:
        raise ConfigError(f"objective {objs[0].metric}: the base job has no data.path, so no validation runs")
    return [o.metric for o in objs]


def prepare(cfg: StudyConfig, origins, workers: int, nproc: int, mode: str = "quality") -> Plan:
    from lmforge.tune.storage import check_storage, inner_sampler_factory, make_pruner, storage_url

    kind = detect_kind(cfg.base, cfg.kind)
    job = BaseJob(kind, cfg.base, dict(cfg.overrides))
    if mode == "throughput":
        from lmforge.tune.throughput import throughput_space

        if kind != "train":
            raise ConfigError("--objective throughput tunes a pretraining job (lmforge train config)")
        cfg.space, global_batch = throughput_space(job.load(), nproc, cfg.throughput)
        cfg.objective, cfg.objectives = None, []
        from lmforge.tune.config import ObjectiveConfig

        cfg.objective = ObjectiveConfig(metric="tokens_per_s", direction="maximize")
        if "sampler" not in cfg.model_fields_set or cfg.sampler.name not in ("grid", "random", "tpe"):
            cfg.sampler.name = "grid"  # small discrete space: every candidate, once
    else:
        global_batch = None
        if not cfg.space:
            raise ConfigError(f"{origins.fallback}: space: is empty (name at least one dotted key to search)")
    space = parse_space(cfg.space, job.schema(), origins)
    check_space_values(job, space, origins)
    base_cfg = job.load()
    metrics = check_objectives(cfg, kind, base_cfg, origins)
    if cfg.cv is not None and kind != "finetune":
        raise ConfigError("cv: cross-validation is for fine-tuning jobs (a finetune base config)")
    if cfg.sampler.name == "grid":
        grid = space.grid()
        size = 1
        for v in grid.values():
            size *= len(v)
        n = cfg.n_trials or size
    else:
        n = cfg.n_trials or 20
    max_steps = _max_steps(kind, base_cfg)
    make_pruner(cfg, max_steps)
    _check_judged(cfg, space, base_cfg, max_steps, origins)
    inner_sampler_factory(cfg, space, len(metrics))
    url = storage_url(cfg)
    check_storage(url, workers, default=cfg.storage is None)
    return Plan(cfg.model_dump(mode="json"), kind, url, cfg.parallelism or workers, n, max_steps, metrics,
                nproc, workers, mode, global_batch)


def _check_judged(cfg: StudyConfig, space, base_cfg, max_steps: Optional[int], origins) -> None:
    """``pruner.after_warmup`` with a base job that warms up for all its steps would never ask the pruner."""
    if cfg.pruner.name == "none" or not cfg.pruner.after_warmup or cfg.cv is not None or not max_steps:
        return
    if any(p.key.startswith("scheduler.") for p in space.params):
        return  # the warm-up is per trial
    from lmforge.training.schedule import warmup_end

    end = warmup_end(base_cfg.scheduler)
    if end >= max_steps:
        where = origins.where(("pruner",)) if origins is not None else "pruner"
        raise ConfigError(f"{where}: pruner.after_warmup: the base job warms up for {end} of its {max_steps} "
                          "steps (scheduler.warmup_steps), so the pruner would never judge a trial; set "
                          "pruner.after_warmup: false or a shorter warm-up")


def _max_steps(kind: str, base_cfg) -> Optional[int]:
    if kind == "train":
        return base_cfg.training.max_steps
    return base_cfg.train.max_steps
