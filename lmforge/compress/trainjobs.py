"""The short training runs of compress (pruning recovery, distillation, QAT), through the one loop.

A decoder trains with ``training.trainer.train(cfg, on_job, prepare=...)``: the source run's config with the
``train`` section of the compress config over it, a model of the compressed shape whose weights ``prepare`` sets
before the optimizer exists, and ``on_job`` putting a distillation objective (if any) on the job's step. A
classifier trains with ``finetune.trainer.finetune(cfg, on_job, prepare=...)``: the source fine-tuning config
(method full) over a base folder holding the compressed backbone. Both are world size 1 on this machine's device, in a scratch folder (``work_dir``) that the command
deletes once the trained model is written as its output.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable, Optional

from torch import nn


def work_dir(ctx, name: str) -> Path:
    """A scratch run folder inside the staging folder (removed with it, or by ``done``)."""
    d = ctx.stage.tmp / ".work" / name
    d.parent.mkdir(parents=True, exist_ok=True)
    return d


def done(ctx) -> None:
    shutil.rmtree(ctx.stage.tmp / ".work", ignore_errors=True)


def finished(summary: dict) -> dict:
    """The summary of a training run that ended as asked (steps or ``train.max_minutes``); a run stopped by a
    signal or by non-finite losses is an error, so the staging folder is dropped and nothing is published."""
    from lmforge.errors import CheckpointError

    reason = str(summary.get("stop_reason") or "")
    if reason.startswith("signal_") or reason in ("non_finite", "fp16_underflow"):
        raise CheckpointError(f"the compress fine-tune stopped early ({reason}) after {summary.get('steps')} steps; "
                              "nothing was published")
    return summary


def lm_config(src_cfg, tc, run_dir: Path, model_cfg):
    """The source run's config, retargeted: ``run_dir``, the (smaller) ``model_cfg``, ``train.*`` settings, one
    checkpoint at the end, no progress bar / tensorboard / HTML report."""
    from lmforge.config import CheckpointConfig, DistributedConfig, LoggingConfig

    cfg = src_cfg.model_copy(deep=True)
    cfg.run_dir, cfg.model = str(run_dir), model_cfg.model_copy(deep=True)
    t = cfg.training
    t.max_steps, t.micro_batch_size, t.grad_accum_steps, t.precision = tc.steps, tc.batch_size, 1, tc.precision
    t.max_minutes, t.eval_every, t.seed, t.stop_at_step, t.early_stop_metric = tc.max_minutes, tc.eval_every, tc.seed, \
        None, None
    t.compile = t.activation_checkpointing = False
    t.param_dtype = "float32"
    cfg.optimizer.lr = tc.lr
    cfg.scheduler.warmup_steps = min(tc.warmup_steps, tc.steps)
    cfg.checkpoint = CheckpointConfig(every_steps=0, keep_last=1)
    cfg.logging = LoggingConfig(log_every=max(1, tc.steps // 10), tensorboard=False, progress=False, report=False)
    cfg.distributed = DistributedConfig()
    return cfg


def _objective_hook(objective: Optional[Callable]):
    """``on_job`` for the loop: ``objective(default)`` builds the training loss from the job's own objective
    (``LMObjective`` / ``TaskObjective``, kept as the hard-label part of a distillation loss)."""
    if objective is None:
        return None

    def on_job(job) -> None:
        job.step.objective = objective(job.step.objective)
    return on_job


def _loader_of(init: nn.Module, convert: Optional[Callable]):
    """``prepare`` for the run: load a copy of ``init``'s weights into the run's fresh model, then ``convert`` it;
    the trained model is ``holder["model"]`` once the run ends."""
    state = {k: v.detach().clone() for k, v in init.state_dict().items()}
    holder: dict = {}

    def prepare(model: nn.Module) -> None:
        model.load_state_dict(state)
        if convert is not None:
            convert(model)
        holder["model"] = model
    return prepare, holder


def train_lm(ctx, init: nn.Module, run_dir: Path, objective=None, convert: Optional[Callable] = None):
    """Train a copy of ``init`` (its config and weights) in ``run_dir``; returns (trained model, summary).
    ``objective(default)`` returns the training loss (see ``_objective_hook``); ``convert(model)`` runs on the
    fresh model after the weights are loaded (e.g. QAT fake quantization)."""
    from lmforge.training.trainer import train

    src = ctx.src
    run_dir = Path(run_dir)
    cfg = lm_config(src.cfg, ctx.cfg.train, run_dir, init.cfg)
    prepare, holder = _loader_of(init, convert)
    summary = train(cfg, _objective_hook(objective), prepare=prepare)
    return holder["model"].eval(), finished(summary)


def train_classifier(ctx, task_model: nn.Module, run_dir: Path, objective=None,
                     convert: Optional[Callable] = None):
    """Fine-tune a copy of ``task_model`` (method full) in ``run_dir``; returns (best model, summary).
    ``objective(task_objective)`` builds the training loss from the run's ``TaskObjective``."""
    from lmforge.compress.output import _with_heads, write_lm_run
    from lmforge.config import Config, DataConfig
    from lmforge.finetune.trainer import finetune

    src, tc = ctx.src, ctx.cfg.train
    run_dir = Path(run_dir)
    base = run_dir.parent / f"{run_dir.name}.base"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    lm = task_model.backbone.model
    with _with_heads(lm):
        write_lm_run(base, lm, src.tok, Config(run_dir=str(base), model=lm.cfg, data=DataConfig()), base, [])
    cfg = src.cfg.model_copy(deep=True)
    cfg.run_dir, cfg.base.path, cfg.base.tokenizer, cfg.base.add_unknown_chars = str(run_dir), str(base), None, None
    cfg.method = type(cfg.method)(name="full")
    t = cfg.train
    t.max_steps, t.batch_size, t.precision, t.seed, t.max_minutes = tc.steps, tc.batch_size, tc.precision, tc.seed, \
        tc.max_minutes
    t.grad_accum_steps, t.early_stop_patience, t.layer_lr_decay = 1, None, None
    t.eval_every = tc.eval_every or tc.steps
    cfg.optimizer.lr = tc.lr
    cfg.scheduler.warmup_steps = min(tc.warmup_steps, tc.steps)
    cfg.checkpoint.every_steps, cfg.checkpoint.resume = 0, None
    prepare, holder = _loader_of(task_model, convert)
    summary = finetune(cfg, _objective_hook(objective), prepare=prepare)
    shutil.rmtree(base, ignore_errors=True)
    return holder["model"].eval(), finished(summary)
