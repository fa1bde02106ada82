"""Typed config of a fine-tuning run (``lmforge finetune --config ft.yaml --train.lr=3e-5``).

Same rules as the pre-training config: unknown keys are errors naming the closest valid key; the resolved
config is written to the run folder as ``finetune.yaml``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import yaml
from pydantic import Field, model_validator

from lmforge.config import (CheckpointConfig, ConfigError, DistributedConfig, OptimizerConfig, SchedulerConfig, Section,
                            TrainingConfig, load_root, validate_root)

Method = Literal["full", "lora", "adalora", "adapter", "prefix"]
Task = Literal["classification", "token-classification", "sft"]


class BaseModelConfig(Section):
    path: str = Field(..., description="lmforge run folder / checkpoint folder, or a Hugging Face model folder "
                      "(config.json + weights + tokenizer)")
    tokenizer: Optional[str] = Field(None, description="tokenizer file/folder (default: found next to the base)")
    pooling: Literal["auto", "last", "cls", "mean"] = Field("auto", description="classification pooling; auto: "
                                                            "last real token for decoders, mean over real tokens for encoders")
    add_unknown_chars: Optional[int] = Field(
        None, ge=1, description="add the training file's characters that the base tokenizer maps to its unknown "
        "token, seen at least this many times, as new tokens (embeddings drawn around the old rows; train them: "
        "method full, or method.trainable with LoRA); None: off. For a base lacking a script, e.g. Chinese on "
        "an English WordPiece")


class FTDataConfig(Section):
    train: str = Field(..., description="training file (TSV/CSV/JSONL; CoNLL for token-classification)")
    validation: Optional[str] = Field(None, description="None: split val_fraction off train with data.seed")
    test: Optional[str] = None
    val_fraction: float = Field(0.1, gt=0, lt=1)
    seed: int = 0
    max_train_examples: Optional[int] = Field(None, ge=1, description="use a seeded subset of train")
    max_eval_examples: Optional[int] = Field(None, ge=1, description="use the first N of validation/test")
    max_len: int = Field(128, ge=4, description="tokens per example (truncated)")
    text_field: Optional[str] = None
    label_field: Optional[str] = None
    scheme: Literal["auto", "iob1", "iob2"] = Field("auto", description="token-classification tag scheme")
    oversample: bool = Field(False, description="repeat minority-class examples up to the majority count")
    class_weights: bool = Field(False, description="inverse-frequency weights in the loss")


class MethodConfig(Section):
    name: Method = "full"
    target_modules: list[str] = Field(default_factory=list, description="regexes (full match) on module names "
                                      "for lora/adalora/adapter; empty: per-architecture defaults")
    trainable: list[str] = Field(default_factory=list, description="extra parameter-name regexes kept trainable "
                                 "(the task head always is)")
    lora_r: int = Field(8, ge=1)
    lora_alpha: float = Field(16.0, gt=0)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    adalora_init_r: int = Field(12, ge=1)
    adalora_target_r: int = Field(4, ge=1)
    adalora_tinit: float = Field(0.1, ge=0, lt=1, description="fraction of steps before rank pruning starts")
    adalora_tfinal: float = Field(0.2, ge=0, lt=1, description="fraction of final steps at the final budget")
    adalora_delta_t: int = Field(10, ge=1, description="steps between rank reallocations")
    adapter_size: int = Field(64, ge=1, description="bottleneck width")
    prefix_len: int = Field(16, ge=1, description="learned key/value slots per layer")

    @model_validator(mode="after")
    def _ranks(self) -> "MethodConfig":
        if self.adalora_target_r > self.adalora_init_r:
            raise ValueError(f"method.adalora_target_r={self.adalora_target_r} must be <= "
                             f"method.adalora_init_r={self.adalora_init_r}")
        if self.adalora_tinit + self.adalora_tfinal >= 1:
            raise ValueError("method.adalora_tinit + method.adalora_tfinal must be < 1")
        return self


_PRE = TrainingConfig.model_fields  # keys shared with pre-training: the same defaults, bounds and descriptions


class FTTrainConfig(Section):
    epochs: float = Field(3.0, gt=0)
    max_steps: Optional[int] = Field(None, ge=1, description="overrides epochs")
    batch_size: int = Field(16, ge=1, description="examples per optimizer step over all data-parallel ranks (each "
                            "rank takes a contiguous 1/dp slice of every batch; the same batches as one process)")
    eval_batch_size: int = Field(64, ge=1)
    eval_every: int = Field(0, ge=0, description="steps between evaluations; 0: once per epoch")
    metric: str = Field("auto", description="selection metric: accuracy, macro_f1, micro_f1, val_loss; auto: "
                        "accuracy (classification), micro_f1 (entities), val_loss (sft)")
    early_stop_patience: Optional[int] = Field(None, ge=1, description="evaluations without improvement")
    layer_lr_decay: Optional[float] = Field(None, gt=0, le=1, description="lr × decay^(depth from the top) "
                                            "per layer (embeddings deepest); None: off")
    grad_accum_steps: int = Field(1, ge=1, description="micro-batches per optimizer step: each global batch is "
                                  "split into this many (then over the ranks); the loss is normalised over the "
                                  "whole global batch, so the result equals accumulation 1")
    grad_clip: Optional[float] = Field(1.0, gt=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="autocast compute dtype; auto: measured on this machine (as training.precision); fp16 "
        "adds dynamic loss scaling. finetune.yaml records the resolved value")
    loss_scale_init: float = _PRE["loss_scale_init"]
    loss_scale_window: int = _PRE["loss_scale_window"]
    loss_scale_hysteresis: int = _PRE["loss_scale_hysteresis"]
    loss_scale_min: float = _PRE["loss_scale_min"]
    loss_scale_max_skips_at_min: int = _PRE["loss_scale_max_skips_at_min"]
    max_minutes: Optional[float] = _PRE["max_minutes"]
    max_bad_steps: int = _PRE["max_bad_steps"]
    log_every: int = Field(10, ge=1, description="steps per log line (the only host reads of loss and grad norm)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available")
    seed: int = 0
    threads: Optional[int] = Field(None, ge=1, description="torch intra-op threads (None: torch default)")

    @model_validator(mode="after")
    def _accum_fits_batch(self) -> "FTTrainConfig":
        if self.grad_accum_steps > self.batch_size:
            raise ValueError(f"train.grad_accum_steps={self.grad_accum_steps} exceeds train.batch_size="
                             f"{self.batch_size} (each micro-batch needs at least one example)")
        return self


class FinetuneConfig(Section):
    run_dir: str = "runs/finetune"
    task: Task = "classification"
    base: BaseModelConfig
    data: FTDataConfig
    method: MethodConfig = MethodConfig()
    train: FTTrainConfig = FTTrainConfig()
    optimizer: OptimizerConfig = OptimizerConfig(lr=5e-5, weight_decay=0.01, betas=(0.9, 0.999))
    scheduler: SchedulerConfig = SchedulerConfig(name="linear", warmup_steps=0, min_lr_ratio=0.0)
    checkpoint: CheckpointConfig = Field(CheckpointConfig(), description="the pre-training section: every_steps, "
                                         "keep_last, resume (None, 'auto' or a checkpoint folder), keep_best")
    distributed: DistributedConfig = Field(DistributedConfig(), description="used under torchrun (world size > 1): "
                                           "data parallel only (ddp, zero2, zero3); see docs/finetune.md")

    @model_validator(mode="after")
    def _data_parallel_only(self) -> "FinetuneConfig":
        d = self.distributed
        for key in ("tp", "pp"):
            if getattr(d, key) != 1:
                raise ValueError(f"distributed.{key}={getattr(d, key)} is not supported by finetune (data parallel "
                                 f"only: ddp, zero2, zero3); set distributed.{key}=1")
        if d.strategy == "zero1":
            raise ValueError("distributed.strategy=zero1 is not supported by finetune; use ddp, zero2 or zero3")
        if d.engine != "native":
            raise ValueError(f"distributed.engine={d.engine} is not supported by finetune; use native")
        return self

    @model_validator(mode="after")
    def _metric_fits_task(self) -> "FinetuneConfig":
        self.selection_metric()  # an unknown train.metric fails at load time, before any run folder exists
        return self

    def selection_metric(self) -> tuple[str, str]:
        """(metric name, 'max' | 'min')."""
        m = self.train.metric
        if m == "auto":
            m = {"classification": "accuracy", "token-classification": "micro_f1", "sft": "val_loss"}[self.task]
        allowed = ("val_loss",) if self.task == "sft" else ("accuracy", "macro_f1", "micro_f1", "val_loss")
        if m not in allowed:
            raise ConfigError(f"invalid value for 'train.metric': {m!r} (allowed for task {self.task}: {allowed})")
        return m, "min" if m == "val_loss" else "max"


def build_finetune_config(tree: dict, source: str = "") -> FinetuneConfig:
    return validate_root(FinetuneConfig, tree, source)


def load_finetune_config(path: str | Path | None, overrides: list[str] | dict | None = None) -> FinetuneConfig:
    """The shared loader (``lmforge/config_loader.py``): errors name file:line:column and the key path."""
    return load_root(FinetuneConfig, path, overrides)


def save_finetune_config(cfg: FinetuneConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
