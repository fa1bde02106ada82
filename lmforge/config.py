"""One typed config tree for every lmforge job.

A config is a YAML file plus dotted command-line overrides (``--optimizer.lr=3e-4``). It is validated
by pydantic models that forbid unknown keys; every error is re-worded to name the full key path, the
value given and what is allowed, and an unknown key names the closest valid one.

The resolved config (presets expanded, every default filled in) is written to each run folder as
``config.yaml`` and is itself a valid config: ``lmforge train --config RUN/config.yaml`` reproduces it.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

# re-exported: the names every config root and module imports from here
from lmforge.config_loader import (deep_merge, format_validation_error, load_root, parse_overrides,  # noqa: F401
                                   validate_root)
from lmforge.errors import ConfigError  # noqa: F401


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


class ModelConfig(Section):
    """Architecture. ``preset`` fills in defaults; explicitly given keys win over the preset."""

    arch: Literal["llama", "gpt2", "bert"] = Field(
        "llama", description="llama: RoPE/RMSNorm/SwiGLU decoder; gpt2: learned positions, pre-LayerNorm, GELU "
        "decoder; bert: post-LayerNorm encoder with token types (MLM)")
    preset: Optional[str] = None
    vocab_size: Optional[int] = Field(None, ge=2, description="None: taken from the data's tokenizer")
    d_model: int = Field(256, ge=8)
    n_layers: int = Field(4, ge=1)
    n_heads: int = Field(4, ge=1)
    n_kv_heads: Optional[int] = Field(None, ge=1, description="None: same as n_heads (no GQA)")
    head_dim: Optional[int] = Field(None, ge=1, description="size of each attention head; None: d_model / n_heads "
                                    "(structured head pruning sets it: n_heads · head_dim may then be < d_model)")
    ffn_hidden: Optional[int] = Field(None, ge=1, description="None: ~8/3·d_model rounded up to 64")
    max_seq_len: int = Field(512, ge=1)
    rope_theta: float = Field(10000.0, gt=0)
    norm_eps: float = Field(1e-5, gt=0)
    tie_embeddings: bool = True
    dropout: float = Field(0.0, ge=0, lt=1)
    init_std: float = Field(0.02, gt=0)
    type_vocab_size: int = Field(2, ge=1, description="bert only: token-type (segment) vocabulary")
    activation: Optional[Literal["gelu", "gelu_tanh", "relu"]] = Field(
        None, description="gpt2/bert MLP activation; None: gelu_tanh for gpt2, gelu for bert (llama: SwiGLU)")

    @model_validator(mode="after")
    def _heads(self) -> "ModelConfig":
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(f"model.d_model={self.d_model} must be divisible by model.n_heads={self.n_heads}")
        kv = self.n_kv_heads or self.n_heads
        if self.n_heads % kv:
            raise ValueError(f"model.n_heads={self.n_heads} must be divisible by model.n_kv_heads={kv}")
        if self.arch == "llama" and self.dims_per_head % 2:
            raise ValueError(f"head dim (model.head_dim, or model.d_model/model.n_heads)={self.dims_per_head} must "
                             "be even for RoPE")
        return self

    @property
    def dims_per_head(self) -> int:
        return self.head_dim or self.d_model // self.n_heads


class DataConfig(Section):
    """Packed token data written by ``lmforge data prepare`` (or the quickstart)."""

    path: Optional[str] = Field(None, description="folder holding manifest.json and the token shards")
    seq_len: Optional[int] = Field(None, ge=2, description="tokens per training window; None: model.max_seq_len")
    doc_mask: bool = Field(False, description="carry document-boundary masks in each batch")
    mlm_probability: float = Field(0.15, gt=0, lt=1, description="training.objective=mlm: share of tokens masked")
    mask_token: Optional[str] = Field(None, description="mlm mask token (None: <|mask|>, [MASK] or <mask>)")


class OptimizerConfig(Section):
    name: Literal["adamw", "adam", "sgd", "lion", "adafactor"] = "adamw"
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd only")
    nesterov: bool = Field(False, description="sgd only")
    no_decay_patterns: list[str] = Field(default_factory=list, description="extra param-name substrings with no "
                                         "weight decay (ndim<2 params and embeddings never decay)")
    embedding_weight_decay: Optional[float] = Field(None, ge=0, description="decay for embedding tables "
                                                    "(None: no decay)")

    @model_validator(mode="after")
    def _betas(self) -> "OptimizerConfig":
        for i, b in enumerate(self.betas):
            if not 0.0 <= b < 1.0:
                raise ValueError(f"optimizer.betas[{i}]={b} must be in [0, 1)")
        return self


class SchedulerConfig(Section):
    name: Literal["cosine", "linear", "constant", "inverse_sqrt", "wsd", "WarmupLR", "WarmupDecayLR",
                  "WarmupCosineLR", "OneCycle", "LRRangeTest"] = "cosine"
    warmup_steps: int = Field(100, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final lr as a fraction of optimizer.lr")
    params: dict[str, Any] = Field(default_factory=dict, description="schedule-specific: wsd decay_fraction/"
                                   "decay_shape; DeepSpeed schedules take DeepSpeed's parameter names")


class TrainingConfig(Section):
    objective: Optional[Literal["clm", "mlm"]] = Field(
        None, description="clm: next-token (decoders); mlm: masked LM (encoders); None: from model.arch")
    max_steps: int = Field(1000, ge=1, description="optimizer steps")
    micro_batch_size: int = Field(8, ge=1)
    grad_accum_steps: int = Field(1, ge=1)
    grad_clip: Optional[float] = Field(1.0, gt=0, description="global-norm clip; None disables")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="autocast compute dtype; auto: measured on this machine (CUDA: bf16 if native else fp16; "
        "CPU: bf16 only where a matmul probe finds it faster than fp32); fp16 adds dynamic loss scaling. The run's "
        "config.yaml records the resolved value")
    param_dtype: Literal["float32", "bfloat16"] = Field("float32", description="dtype of the model's parameters")
    master_weights: bool = Field(True, description="with param_dtype=bfloat16: fp32 master copy in the optimizer")
    loss_scale_init: float = Field(2.0 ** 16, gt=0, description="fp16: initial loss scale")
    loss_scale_window: int = Field(1000, ge=1, description="fp16: good steps before doubling the scale")
    loss_scale_hysteresis: int = Field(2, ge=1, description="fp16: overflows tolerated before halving the scale")
    loss_scale_min: float = Field(1.0, gt=0, description="fp16: lowest scale")
    loss_scale_max_skips_at_min: int = Field(10, ge=1, description="fp16: overflow steps in a row at the lowest "
                                             "scale before stopping")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 1337
    max_minutes: Optional[float] = Field(None, gt=0, description="stop (and checkpoint) after this wall time")
    stop_at_step: Optional[int] = Field(None, ge=1, description="stop (and checkpoint) after this step; the "
                                        "schedule still spans max_steps (run a long schedule in chunks)")
    max_bad_steps: int = Field(5, ge=1, description="non-finite loss/grad steps in a row before stopping")
    eval_every: int = Field(200, ge=0, description="0 disables periodic evaluation")
    eval_batches: int = Field(20, ge=1)
    compile: bool = False
    activation_checkpointing: bool = False
    ac_every: int = Field(1, ge=1, description="checkpoint every k-th block (1: all)")
    ac_selective: bool = Field(False, description="save matmul outputs, recompute the cheap ops only")
    compile_cache_dir: Optional[str] = Field(None, description="persistent torch.compile cache (None: torch default)")
    spike_factor: Optional[float] = Field(None, gt=1, description="warn when grad norm > factor x running mean")
    early_stop_metric: Optional[str] = Field(None, description="e.g. val_loss; None disables early stopping")
    early_stop_patience: int = Field(3, ge=1, description="evaluations without improvement before stopping")
    early_stop_min_delta: float = Field(0.0, ge=0)
    early_stop_mode: Literal["min", "max"] = "min"


class CheckpointConfig(Section):
    every_steps: int = Field(500, ge=0, description="0: only at the end of the run")
    keep_last: int = Field(2, ge=1)
    resume: Optional[str] = Field(None, description="None, 'auto' (newest complete) or a checkpoint folder")
    keep_best: int = Field(0, ge=0, description="also keep the k best checkpoints by best_metric")
    best_metric: str = "val_loss"
    best_mode: Literal["min", "max"] = "min"


class LoggingConfig(Section):
    log_every: int = Field(10, ge=1)
    tensorboard: bool = True
    progress: bool = True
    report: bool = Field(True, description="write report.html (plots + config) at the end of the run")
    wandb: bool = Field(False, description="also log to Weights & Biases in offline mode (if installed)")
    wandb_project: str = "lmforge"


class DistributedConfig(Section):
    """Multi-process layout. dp_replicate × dp_shard × tp × pp must equal the world size (one may be -1)."""

    strategy: Literal["ddp", "zero1", "zero2", "zero3"] = Field(
        "zero3", description="ddp: replicate; zero1: DDP + sharded optimizer state; zero2: FSDP2 keeping "
        "params gathered between forward and backward; zero3: FSDP2 resharding after forward")
    dp_replicate: int = Field(1, ge=-1, description="replica groups (HSDP when > 1 with zero2/zero3)")
    dp_shard: int = Field(-1, ge=-1, description="ranks sharding one replica (-1: inferred)")
    tp: int = Field(1, ge=-1, description="tensor-parallel degree")
    pp: int = Field(1, ge=-1, description="pipeline stages")
    pp_schedule: Literal["gpipe", "1f1b"] = "1f1b"
    pp_microbatches: int = Field(4, ge=1, description="micro-batches per pipeline step")
    reshard_after_forward: Optional[bool] = Field(None, description="None: True for zero3, False for zero2")
    cpu_offload: bool = Field(False, description="FSDP2 CPUOffloadPolicy (zero2/zero3)")
    param_dtype: Optional[Literal["float32", "bfloat16"]] = Field(
        None, description="FSDP2 compute dtype; None: bfloat16 if training.precision=bf16 else float32")
    reduce_dtype: Literal["float32", "bfloat16"] = "float32"
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    timeout_s: float = Field(600.0, gt=0, description="collective timeout; a dead rank fails the job after this")
    engine: Literal["native", "deepspeed"] = Field(
        "native", description="deepspeed: run the same model/data/loss through deepspeed.initialize "
        "(pip install 'lmforge[deepspeed]'); ZeRO stage from strategy")

    @model_validator(mode="after")
    def _dims(self) -> "DistributedConfig":
        for k in ("dp_replicate", "dp_shard", "tp", "pp"):
            if getattr(self, k) == 0:
                raise ValueError(f"distributed.{k}=0 is invalid (use a positive degree or -1 to infer)")
        return self


class EvaluationConfig(Section):
    """LM evaluation at the end of a run (``lmforge evaluate RUN`` does the same on demand)."""

    enabled: bool = Field(False, description="score the final weights; results in reports/lm_eval.* and as "
                          "eval_* in summary.json")
    packed: bool = Field(True, description="perplexity / bits-per-byte on data.path's val split")
    text: list[str] = Field(default_factory=list, description="raw text files scored as documents")
    window: Optional[int] = Field(None, ge=2, description="sliding-window length (None: model.max_seq_len)")
    stride: Optional[int] = Field(None, ge=1, description="window step (None: window/2)")
    max_tokens: Optional[int] = Field(200_000, ge=2, description="packed data: score at most this many tokens")
    harness_tasks: list[str] = Field(default_factory=list, description="local lm-evaluation-harness task YAMLs")
    limit: Optional[int] = Field(None, ge=1, description="harness: examples per task")


class Config(Section):
    run_dir: str = "runs/default"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    training: TrainingConfig = TrainingConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()
    distributed: DistributedConfig = DistributedConfig()
    eval: EvaluationConfig = EvaluationConfig()

    @model_validator(mode="after")
    def _objective_fits_arch(self) -> "Config":
        encoder = self.model.arch == "bert"
        if self.training.objective is None:  # resolved here so the saved config states it
            object.__setattr__(self.training, "objective", "mlm" if encoder else "clm")
        if self.training.objective == "mlm" and not encoder:
            raise ValueError(f"training.objective=mlm needs an encoder (model.arch=bert), got model.arch="
                             f"{self.model.arch}")
        if self.training.objective == "clm" and encoder:
            raise ValueError("model.arch=bert is an encoder: set training.objective=mlm")
        if self.data.seq_len is None:  # resolved here so the saved config states it
            object.__setattr__(self.data, "seq_len", self.model.max_seq_len)
        if self.data.seq_len > self.model.max_seq_len:
            raise ValueError(f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}")
        return self


# ---------------------------------------------------------------------------------------------
# Presets and loading (the loader itself, shared by every root: lmforge/config_loader.py)
# ---------------------------------------------------------------------------------------------


def _apply_presets(tree: dict) -> dict:
    model = tree.get("model")
    if isinstance(model, dict) and model.get("preset"):
        from lmforge.models.presets import PRESETS  # local import: config must not import torch eagerly

        name = model["preset"]
        if name not in PRESETS:
            close = difflib.get_close_matches(str(name), list(PRESETS), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"invalid value for 'model.preset': {name!r} (allowed: {', '.join(PRESETS)}){hint}")
        tree = dict(tree)
        tree["model"] = {**PRESETS[name], **model}
    return tree


def build_config(tree: dict | None = None, source: str = "") -> Config:
    """Validate a config tree (presets expanded); ``source`` labels every error line."""
    return validate_root(Config, tree or {}, source, _apply_presets)


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> Config:
    """Load a YAML config (optional) and apply overrides (a CLI list or a nested dict); errors name
    file:line:column (or ``command line``) and the key path (see ``lmforge/config_loader.py``)."""
    return load_root(Config, path, overrides, prepare=_apply_presets)


def config_to_dict(cfg: Config) -> dict:
    return cfg.model_dump(mode="json")


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), encoding="utf-8")


def reference_markdown() -> str:
    """Markdown table of every key with its type, default and description (docs/config.md is this)."""
    lines = ["# Config reference", "",
             "Generated from the schema in `lmforge/config.py` by `lmforge config --reference`.",
             "Every key can be set in YAML or on the command line as `--section.key=value`.", ""]
    for section, field in Config.model_fields.items():
        ann = field.annotation
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            lines += [f"- `{section}` (default `{field.default}`)", ""]
            continue
        lines += [f"## `{section}`", "", (ann.__doc__ or "").strip().split("\n")[0], "",
                  "| key | type | default | notes |", "|---|---|---|---|"]
        for name, f in ann.model_fields.items():
            typ = str(f.annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")
            notes = f.description or ""
            bounds = [f"{k} {getattr(m, k)}" for m in f.metadata for k in ("ge", "gt", "le", "lt")
                      if getattr(m, k, None) is not None]
            if bounds:
                notes = (notes + "; " if notes else "") + ", ".join(bounds).replace("ge ", "≥ ").replace(
                    "gt ", "> ").replace("le ", "≤ ").replace("lt ", "< ")
            lines.append(f"| `{section}.{name}` | `{typ}` | `{f.default}` | {notes} |")
        lines.append("")
    return "\n".join(lines)
