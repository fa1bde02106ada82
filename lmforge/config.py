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
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lmforge.errors import ConfigError  # noqa: F401  (re-exported: the name every module imports from here)


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
        if self.d_model % self.n_heads:
            raise ValueError(f"model.d_model={self.d_model} must be divisible by model.n_heads={self.n_heads}")
        kv = self.n_kv_heads or self.n_heads
        if self.n_heads % kv:
            raise ValueError(f"model.n_heads={self.n_heads} must be divisible by model.n_kv_heads={kv}")
        if self.arch == "llama" and (self.d_model // self.n_heads) % 2:
            raise ValueError(
                f"head dim model.d_model/model.n_heads={self.d_model // self.n_heads} must be even for RoPE"
            )
        return self


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
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="autocast compute dtype; fp16 adds "
                                                      "dynamic loss scaling")
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
# Loading, overrides, errors
# ---------------------------------------------------------------------------------------------


def _section_models() -> dict[str, type[BaseModel]]:
    return {name: f.annotation for name, f in Config.model_fields.items() if isinstance(f.annotation, type)
            and issubclass(f.annotation, BaseModel)}


def _valid_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every key path of a schema; sections held in lists/optionals (``sources: list[SourceConfig]``) too."""
    keys = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        keys.append(path)
        ann = field.annotation
        for t in (ann, *getattr(ann, "__args__", ())):
            if isinstance(t, type) and issubclass(t, BaseModel):
                keys.extend(_valid_keys(t, path + "."))
    return keys


def _suggest(path: str, root: type[BaseModel]) -> str:
    keys = _valid_keys(root)
    close = difflib.get_close_matches(path, keys, n=1, cutoff=0.5)
    if not close:  # try matching only the last component within its section
        parent, _, leaf = path.rpartition(".")
        siblings = [k for k in keys if k.rpartition(".")[0] == parent]
        close = [f"{parent}.{m}" if parent else m
                 for m in difflib.get_close_matches(leaf, [s.rpartition(".")[2] for s in siblings], n=1, cutoff=0.4)]
    return f"; did you mean '{close[0]}'?" if close else ""


def format_validation_error(err: ValidationError, source: str, root: type[BaseModel]) -> str:
    """pydantic errors of schema ``root`` → one line each, naming the key path (shared by every lmforge
    config: the training config here, ``data prepare``'s and ``finetune``'s)."""
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"])
        where = f"{source}: " if source else ""
        if e["type"] == "extra_forbidden":
            generic = ".".join(str(p) for p in e["loc"] if not isinstance(p, int))  # sources.0.x → sources.x
            hint = _suggest(generic, root)
            if not hint and "." not in path:
                hint = f" (sections: {', '.join(root.model_fields)})"
            lines.append(f"{where}unknown key '{path}'{hint}")
            continue
        if e["type"] == "missing":
            lines.append(f"{where}missing required key '{path}'")
            continue
        if e["type"] == "value_error":  # cross-field checks already name their keys
            lines.append(f"{where}{e['msg'].removeprefix('Value error, ')}")
            continue
        value = e.get("input")
        msg = e["msg"].removeprefix("Value error, ")
        ctx = e.get("ctx") or {}
        if "expected" in ctx:
            msg = f"allowed: {ctx['expected']}"
        label = f"'{path}'" if path else "config"
        lines.append(f"{where}invalid value for {label}: {value!r} ({msg})")
    return "\n".join(lines)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for i, p in enumerate(parts[:-1]):
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override '{dotted}': '{'.'.join(parts[: i + 1])}' is a value, not a section")
        node = nxt
    node[parts[-1]] = value


def parse_overrides(args: list[str]) -> dict:
    """``['--optimizer.lr=1e-3', '--training.max_steps', '10']`` → nested dict (values parsed as YAML)."""
    tree: dict = {}
    i = 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--"):
            raise ConfigError(f"expected an override like --section.key=value, got '{a}'")
        key = a[2:]
        if "=" in key:
            key, raw = key.split("=", 1)
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override '--{key}' has no value")
            raw = args[i + 1]
            i += 1
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                value = float(value)
            except ValueError:
                pass
        _set_dotted(tree, key.replace("-", "_"), value)
        i += 1
    return tree


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


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
    tree = _apply_presets(tree or {})
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source, Config)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> Config:
    """Load a YAML config (optional) and apply overrides (a CLI list or a nested dict)."""
    tree: dict = {}
    source = ""
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
            raise ConfigError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(loaded).__name__}")
        tree = loaded
    if overrides:
        over = parse_overrides(overrides) if isinstance(overrides, list) else overrides
        tree = deep_merge(tree, over)
    return build_config(tree, source)


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
