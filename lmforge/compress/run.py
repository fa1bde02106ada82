"""One ``lmforge compress`` command from config to published folder.

``compress(command, cfg)``: load the SOURCE once → score it (quality on fixed batches) → the method builds the
result (``Result``) inside the staging folder → write the result as an ordinary run folder (unless the method's
training run already is one) → measure source and result on this machine → ``report.{json,md,html}`` → verify by
reloading through the normal loaders → rename into place (``output.Staging``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from lmforge.compress import output, report
from lmforge.compress.measure import measure, speeds
from lmforge.compress.source import Source, load_source, quality, val_batches
from lmforge.errors import ConfigError


@dataclass
class Result:
    model: nn.Module  # the compressed model (lm, or a TaskModel), eval mode
    step: dict  # what compression.json records for this command
    notes: list[str] = field(default_factory=list)
    written: bool = False  # the method's training run already wrote the folder's weights/config
    extra: dict = field(default_factory=dict)  # more report columns: name → (model, folder or None, runner)
    runner: Optional[nn.Module] = None  # what runs the result for the speed numbers (default: model)
    files_folder: Optional[Path] = None  # the result's weight files (folder or file; default: the staging folder)
    quality_runner: bool = False  # score the runner (an exported graph), not the eager model


@dataclass
class Context:
    src: Source
    cfg: object  # CompressConfig
    stage: output.Staging
    batches: Optional[list[dict]]  # decoders: the validation batches every model is scored on

    def quality(self, model: nn.Module) -> dict:
        return quality(model, self.src, self.cfg.eval, self.batches)


METHODS = ("quantize", "prune", "distill", "export")  # lmforge.compress.<name>.<name>(ctx) -> Result


def method(name: str) -> Callable[[Context], Result]:
    import importlib

    if name not in METHODS:
        raise ConfigError(f"compress: unknown method {name!r} (choose {', '.join(METHODS)})")
    return getattr(importlib.import_module(f"lmforge.compress.{name}"), name)


def compress(command: str, cfg) -> dict:
    """Run ``command`` (quantize | prune | distill | export) on ``cfg.source``; returns the report."""
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)  # torchao's import-time deprecation notes
    from lmforge.compress.qlinear import quiet_torchao

    quiet_torchao()  # imported once, quietly (peft imports it too when it is installed)
    run_method = method(command)
    if not cfg.source:
        raise ConfigError("source: no SOURCE folder given")
    if cfg.bench.threads:
        torch.set_num_threads(cfg.bench.threads)
    t0 = time.time()
    src = load_source(cfg.source, cfg.eval.data)
    batches = val_batches(src, cfg.eval) if src.kind == "lm" else None
    src_quality = quality(src.model, src, cfg.eval, batches)
    with output.Staging(cfg.out) as stage:
        ctx = Context(src, cfg, stage, batches)
        res = run_method(ctx)
        res.model.eval()
        steps = src.compression + [res.step]
        if not res.written:
            _write(ctx, res.model, stage.tmp, steps)
        else:
            output.write_compression(stage.tmp, steps)
        columns = {"source": measure(src.model, _source_files(src), src_quality)}
        runners = {"source": src.model}
        for name, (model, folder, runner) in res.extra.items():
            columns[name] = measure(model, folder, ctx.quality(model))
            runners[name] = runner if runner is not None else model
        files = res.files_folder or (stage.tmp if src.kind == "lm" else stage.tmp / "base")
        scored = res.runner if res.quality_runner else res.model
        columns[command] = measure(res.model, files, ctx.quality(scored))
        runners[command] = res.runner if res.runner is not None else res.model
        if cfg.bench.enabled:
            for name, numbers in speeds(runners, src, cfg.bench).items():
                columns[name].update(numbers)
        res.step["seconds"] = round(time.time() - t0, 1)
        rep = report.build(command, str(src.path), str(stage.final), columns, res.step, res.notes)
        report.write(stage.tmp, rep)
        sample = output.sample_inputs(src, batches)
        stage.publish(lambda tmp: output.check_same(res.model, output.load_output(tmp, src.kind), sample, src.kind))
    return rep


def _write(ctx: Context, model: nn.Module, folder: Path, steps: list[dict]) -> None:
    src = ctx.src
    if src.kind == "lm":
        output.write_lm_run(folder, model, src.tok, src.cfg, ctx.stage.final, steps)
    else:
        output.write_classifier_run(folder, model, src, ctx.stage.final, steps)


def _source_files(src: Source) -> Optional[Path]:
    if src.kind == "lm":
        return src.path
    base = src.meta.get("base", {})
    return Path(base.get("run") or base.get("path") or src.path)
