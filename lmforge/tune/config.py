"""``study.yaml``: what ``lmforge tune`` searches, how, and where the study lives.

Read by the one loader (``lmforge/config_loader.py``): unknown keys name the closest valid one, bad values
name file:line:column. The search space (``space:``) is checked against the base job's own schema (a
pretraining ``Config`` or a ``FinetuneConfig``) before anything is written::

    base: configs/char-shakespeare.yaml      # the job every trial runs (train or finetune config)
    dir: studies/lr                          # the study folder: trials/, report.html, best.yaml, study.journal
    overrides: {training.max_steps: 300}     # fixed for every trial
    objective: {metric: val_loss}            # direction from the metric (min for losses) unless given
    sampler: {name: tpe}                     # grid | random | tpe | cmaes | gp | nsga2
    pruner: {name: asha, min_resource: 50}   # none | median | sha | asha | hyperband
    space:
      optimizer.lr: {log: [1.0e-4, 3.0e-3]}
      training.micro_batch_size: [4, 8]      # a list: categorical
      method.lora_r: {int: [4, 16], when: {method.name: lora}}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import Field, model_validator

from lmforge.config import Section
from lmforge.errors import ConfigError

SamplerName = Literal["grid", "random", "tpe", "cmaes", "gp", "nsga2"]
PrunerName = Literal["none", "median", "sha", "asha", "hyperband"]


class ObjectiveConfig(Section):
    metric: str = Field(..., description="a metric the job reports: val_loss, val_ppl, val_accuracy, "
                        "val_macro_f1, val_micro_f1, tokens_per_s, eval_bits_per_byte, ...")
    direction: Optional[Literal["minimize", "maximize"]] = Field(
        None, description="None: maximize accuracy/F1/throughput metrics, minimize the rest")

    def resolved_direction(self) -> str:
        if self.direction:
            return self.direction
        up = ("accuracy", "f1", "tokens_per_s", "mfu", "throughput", "acc")
        return "maximize" if any(u in self.metric for u in up) else "minimize"


class SamplerConfig(Section):
    name: SamplerName = "tpe"
    n_startup_trials: int = Field(5, ge=0, description="tpe/gp: random trials before the model is used")
    multivariate: bool = Field(True, description="tpe: model the parameters jointly")
    population_size: int = Field(8, ge=2, description="nsga2: population per generation")


class PrunerConfig(Section):
    name: PrunerName = "none"
    n_startup_trials: int = Field(2, ge=0, description="median: complete trials before pruning starts")
    n_warmup_steps: int = Field(0, ge=0, description="median: steps before a trial can be pruned")
    min_resource: int = Field(1, ge=1, description="sha/asha/hyperband: steps of the first rung")
    max_resource: Optional[int] = Field(None, ge=1, description="hyperband: steps of a full trial (None: the "
                                        "job's max steps)")
    reduction_factor: int = Field(3, ge=2, description="sha/asha/hyperband: keep 1/factor per rung")
    after_warmup: bool = Field(True, description="do not prune a trial on evaluations made during its own "
                               "learning-rate warm-up (they understate it: a trial warming up for longer looks "
                               "worse early); its first judgement is its first evaluation after the warm-up")


class FaultConfig(Section):
    on_interrupt: Literal["resume", "retry"] = Field(
        "resume", description="a trial whose process died (SIGKILL, lost machine): resume it from its newest "
        "checkpoint, or mark it FAIL and run its parameters again as a new trial from scratch")
    max_retries: int = Field(2, ge=0, description="launches of one trial after the first (crash or interrupt) "
                             "before it stays FAIL")
    heartbeat_s: float = Field(10.0, gt=0, description="how often a running trial says it is alive")
    grace_s: float = Field(60.0, gt=0, description="a RUNNING trial silent this long on another machine is "
                           "taken over (on this machine a dead process is seen at once)")


class CVConfig(Section):
    folds: int = Field(5, ge=2)
    stratified: bool = Field(True, description="classification: every fold keeps the label proportions")
    seed: int = 0


class ThroughputConfig(Section):
    budget_gb: Optional[float] = Field(None, gt=0, description="per-rank device memory budget (None: the "
                                       "device's memory; CPU: 80% of RAM)")
    steps: int = Field(12, ge=2, description="optimizer steps per candidate")
    warmup_steps: int = Field(4, ge=1, description="steps left out of the tokens/s measurement")
    strategies: list[str] = Field(default_factory=lambda: ["ddp", "zero1", "zero2", "zero3"],
                                  description="strategies tried when a trial has more than one process")
    offload: bool = Field(True, description="also try zero2/zero3 with cpu_offload")


class StudyConfig(Section):
    base: str = Field(..., description="the job's config file: a pretraining config (lmforge train) or a "
                      "fine-tuning config (lmforge finetune)")
    kind: Literal["auto", "train", "finetune"] = Field("auto", description="auto: finetune when the base has "
                                                       "base:/task: keys")
    dir: str = Field("studies/default", description="the study folder")
    name: Optional[str] = Field(None, description="study name in the storage (None: the folder's name)")
    storage: Optional[str] = Field(None, description="None: a journal file in the study folder; a path or "
                                   "journal:///path (journal file, e.g. on a shared filesystem); an RDB URL "
                                   "(postgresql://, mysql://); sqlite:/// only with one worker")
    overrides: dict[str, Any] = Field(default_factory=dict, description="dotted keys fixed for every trial")
    space: dict[str, Any] = Field(default_factory=dict, description="dotted key → distribution (see module doc)")
    objective: Optional[ObjectiveConfig] = None
    objectives: list[ObjectiveConfig] = Field(default_factory=list, description="several: a multi-objective "
                                              "study (nsga2 or tpe; no pruning)")
    sampler: SamplerConfig = SamplerConfig()
    pruner: PrunerConfig = PrunerConfig()
    n_trials: Optional[int] = Field(None, ge=1, description="None: the grid's size (grid), else 20")
    timeout_minutes: Optional[float] = Field(None, gt=0, description="start no new trial after this")
    seed: int = 0
    deterministic: bool = Field(True, description="the same seed gives the same trials whatever the timing: "
                                "trial k is sampled from trials 0..k-P (P = parallelism) and pruned against them")
    parallelism: Optional[int] = Field(None, ge=1, description="P above (None: --workers)")
    duplicates: Literal["reuse", "train"] = Field(
        "reuse", description="a fresh trial whose parameters equal a settled trial's (as its slot sees them): "
        "reuse that result without training (the trial's seed is in its config, so the run would repeat), or "
        "train it again (for a base job whose result varies between equal runs)")
    fault: FaultConfig = FaultConfig()
    cv: Optional[CVConfig] = None
    throughput: ThroughputConfig = ThroughputConfig()
    report_every: int = Field(1, ge=1, description="rewrite report.html after this many finished trials")

    @model_validator(mode="after")
    def _objectives(self) -> "StudyConfig":
        if self.objective is not None and self.objectives:
            raise ValueError("give objective (one) or objectives (several), not both")
        return self

    def all_objectives(self) -> list[ObjectiveConfig]:
        return [self.objective] if self.objective is not None else list(self.objectives)

    def study_name(self) -> str:
        return self.name or Path(self.dir).name


def load_study_config(path: str | Path, overrides: Optional[list[str]] = None):
    """→ (StudyConfig, marks of the file's keys, for errors located in ``space:``)."""
    from lmforge.config_loader import Origins, _leaf_paths, deep_merge, parse_overrides, read_yaml, validate_root

    tree, marks = read_yaml(path)
    over = parse_overrides(overrides or [])
    origins = Origins(str(path), marks, _leaf_paths(over), fallback=str(path))
    cfg = validate_root(StudyConfig, deep_merge(tree, over), origins)
    base = Path(cfg.base)
    if not base.is_absolute() and not base.exists() and (Path(path).parent / base).exists():
        cfg.base = str(Path(path).parent / base)  # relative to the study file
    if not Path(cfg.base).is_file():
        raise ConfigError(f"{origins.where(('base',))}: base config not found: {cfg.base}")
    return cfg, origins
