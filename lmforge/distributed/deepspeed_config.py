"""Import a DeepSpeed JSON config as lmforge config overrides.

``deepspeed_to_tree(ds, dp_size)`` → (nested override dict, notes). ``notes`` lists every approximation
(ignored tuning knobs, log-warmup mapped to linear, ...). Anything lmforge cannot honour raises
``ConfigError``; unknown keys raise ONE error listing all of them. ``load_deepspeed_config(path, dp_size,
base=None)`` reads the file and returns a validated ``Config``.

Batch rule (DeepSpeed's): train_batch_size = train_micro_batch_size_per_gpu × gradient_accumulation_steps
× data-parallel size; any one may be omitted and is derived, all three given must agree.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from lmforge.config import Config, ConfigError, build_config, config_to_dict, deep_merge

_TOP = {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "fp16", "bf16",
        "optimizer", "scheduler", "gradient_clipping", "zero_optimization", "activation_checkpointing",
        "steps_per_print", "tensorboard", "wandb"}
_TOP_IGNORED = {"wall_clock_breakdown", "zero_allow_untested_optimizer", "prescale_gradients",
                "gradient_predivide_factor", "dump_state", "memory_breakdown", "communication_data_type",
                "zero_force_ds_cpu_optimizer", "seq_parallel_communication_data_type"}
_FP16 = {"enabled", "auto_cast", "loss_scale", "initial_scale_power", "loss_scale_window", "hysteresis",
         "consecutive_hysteresis", "min_loss_scale", "fp16_master_weights_and_grads"}
_BF16 = {"enabled", "immediate_grad_update", "check_grad_overflow"}
_OPT_TYPES = {"adam": "adamw", "adamw": "adamw", "sgd": "sgd"}
_OPT_PARAMS = {"lr", "betas", "eps", "weight_decay", "momentum", "nesterov", "adam_w_mode", "torch_adam",
               "fused", "amsgrad", "bias_correction", "dampening"}
_ZERO = {"stage", "offload_optimizer", "offload_param"}
_ZERO_IGNORED = {"contiguous_gradients", "overlap_comm", "reduce_scatter", "reduce_bucket_size",
                 "allgather_partitions", "allgather_bucket_size", "round_robin_gradients",
                 "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold", "stage3_max_live_parameters",
                 "stage3_max_reuse_distance", "stage3_gather_16bit_weights_on_model_save", "sub_group_size",
                 "elastic_checkpoint", "ignore_unused_parameters", "load_from_fp32_weights", "cpu_offload",
                 "zero_hpz_partition_size", "zero_quantized_weights", "zero_quantized_gradients",
                 "mics_shard_size", "use_multi_rank_bucket_allreduce", "memory_efficient_linear"}
_OFFLOAD = {"device", "pin_memory", "buffer_count", "buffer_size", "max_in_cpu", "fast_init", "nvme_path",
            "pipeline", "pipeline_read", "pipeline_write", "ratio"}
_ACT = {"partition_activations", "contiguous_memory_optimization", "cpu_checkpointing", "number_checkpoints",
        "synchronize_checkpoint_boundary", "profile"}
_TB = {"enabled", "output_path", "job_name"}
_WANDB = {"enabled", "team", "group", "project"}
_SCHED_PARAMS = {
    "WarmupLR": {"warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type", "last_batch_iteration"},
    "WarmupDecayLR": {"warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type", "total_num_steps",
                      "last_batch_iteration"},
    "WarmupCosineLR": {"warmup_min_ratio", "cos_min_ratio", "warmup_num_steps", "warmup_type", "total_num_steps",
                       "last_batch_iteration"},
}
_SCHED_UNSUPPORTED = {"OneCycle", "LRRangeTest"}


def resolve_batch(train: Optional[int], micro: Optional[int], gas: Optional[int], dp: int) -> tuple[int, int, int]:
    """DeepSpeed's batch triple rule; returns (train_batch_size, micro_batch_per_gpu, grad_accum_steps)."""
    for name, v in (("train_batch_size", train), ("train_micro_batch_size_per_gpu", micro),
                    ("gradient_accumulation_steps", gas)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
            raise ConfigError(f"deepspeed '{name}' must be a positive integer, got {v!r}")
    if train is not None and micro is not None and gas is not None:
        pass
    elif train is not None and micro is not None:
        gas = train // micro // dp
    elif train is not None and gas is not None:
        micro = train // dp // gas
    elif micro is not None and gas is not None:
        train = micro * gas * dp
    elif train is not None:
        gas, micro = 1, train // dp
    elif micro is not None:
        gas, train = 1, micro * dp
    else:
        raise ConfigError("deepspeed config needs train_batch_size or train_micro_batch_size_per_gpu")
    if micro <= 0 or gas <= 0 or train != micro * gas * dp:
        raise ConfigError(f"deepspeed batch sizes are inconsistent: train_batch_size={train} != "
                          f"train_micro_batch_size_per_gpu={micro} × gradient_accumulation_steps={gas} × "
                          f"data-parallel size={dp} (= {micro * gas * dp})")
    return train, micro, gas


def _check_keys(block: Any, where: str, allowed: set, ignored: set, unknown: list, notes: list) -> dict:
    if not isinstance(block, dict):
        raise ConfigError(f"deepspeed '{where}' must be an object, got {type(block).__name__}")
    for k in block:
        key = f"{where}.{k}" if where else k
        if k in ignored:
            notes.append(f"'{key}' has no lmforge equivalent (tuning knob); ignored")
        elif k not in allowed:
            unknown.append(key)
    return block


def deepspeed_to_tree(ds: dict, dp_size: int) -> tuple[dict, list[str]]:
    if not isinstance(ds, dict):
        raise ConfigError(f"a deepspeed config must be a JSON object, got {type(ds).__name__}")
    unknown: list[str] = []
    notes: list[str] = []
    _check_keys(ds, "", _TOP, _TOP_IGNORED, unknown, notes)
    tree: dict = {"training": {}, "optimizer": {}, "scheduler": {}, "distributed": {}, "logging": {}}
    tr, opt, sch, dist_, log = (tree[k] for k in ("training", "optimizer", "scheduler", "distributed", "logging"))

    fp16 = _check_keys(ds.get("fp16", {}), "fp16", _FP16, set(), unknown, notes)
    bf16 = _check_keys(ds.get("bf16", {}), "bf16", _BF16, set(), unknown, notes)
    if fp16.get("enabled") and bf16.get("enabled"):
        raise ConfigError("deepspeed fp16.enabled and bf16.enabled are both true; choose one")
    if fp16.get("enabled"):
        raise ConfigError("deepspeed fp16.enabled=true is not supported (lmforge trains in fp32 or bf16 without "
                          "loss scaling); use \"bf16\": {\"enabled\": true}")
    if "bf16" in ds or "fp16" in ds:
        tr["precision"] = "bf16" if bf16.get("enabled") else "fp32"

    if "optimizer" in ds:
        o = _check_keys(ds["optimizer"], "optimizer", {"type", "params"}, set(), unknown, notes)
        typ = str(o.get("type", "")).lower()
        if typ not in _OPT_TYPES:
            raise ConfigError(f"deepspeed optimizer.type={o.get('type')!r} is not supported "
                              f"(allowed: Adam, AdamW, SGD)")
        params = _check_keys(o.get("params", {}), "optimizer.params", _OPT_PARAMS, set(), unknown, notes)
        name = _OPT_TYPES[typ]
        if typ == "adam" and params.get("adam_w_mode") is False:
            name = "adam"
        opt["name"] = name
        for k in ("lr", "eps", "weight_decay", "momentum", "nesterov"):
            if k in params:
                opt[k] = params[k]
        if "betas" in params:
            opt["betas"] = tuple(params["betas"])
        for k in ("torch_adam", "fused", "amsgrad", "bias_correction", "dampening"):
            if k in params:
                notes.append(f"'optimizer.params.{k}' ignored (lmforge picks the torch implementation)")

    if "scheduler" in ds:
        s = _check_keys(ds["scheduler"], "scheduler", {"type", "params"}, set(), unknown, notes)
        typ = s.get("type")
        if typ in _SCHED_UNSUPPORTED:
            raise ConfigError(f"deepspeed scheduler.type={typ!r} has no lmforge equivalent (supported: "
                              f"{', '.join(_SCHED_PARAMS)})")
        if typ not in _SCHED_PARAMS:
            raise ConfigError(f"deepspeed scheduler.type={typ!r} is unknown (supported: {', '.join(_SCHED_PARAMS)})")
        p = _check_keys(s.get("params", {}), "scheduler.params", _SCHED_PARAMS[typ], set(), unknown, notes)
        sch["warmup_steps"] = int(p.get("warmup_num_steps", 1000))
        if p.get("warmup_type", "log") != "linear":
            notes.append(f"scheduler.params.warmup_type={p.get('warmup_type', 'log')!r}: lmforge warms up "
                         "linearly")
        if typ in ("WarmupLR", "WarmupDecayLR"):
            if p.get("warmup_min_lr", 0.0):
                notes.append("scheduler.params.warmup_min_lr is not 0: lmforge warms up from 0")
            if "warmup_max_lr" in p:
                opt["lr"] = p["warmup_max_lr"]
        if typ == "WarmupLR":
            sch.update(name="constant")
        elif typ == "WarmupDecayLR":
            sch.update(name="linear", min_lr_ratio=0.0)
        else:
            sch.update(name="cosine", min_lr_ratio=p.get("cos_min_ratio", 0.0001))
            if p.get("warmup_min_ratio", 0.0):
                notes.append("scheduler.params.warmup_min_ratio is not 0: lmforge warms up from 0")
        if "total_num_steps" in p:
            tr["max_steps"] = int(p["total_num_steps"])

    if "gradient_clipping" in ds:
        clip = ds["gradient_clipping"]
        tr["grad_clip"] = float(clip) if clip else None

    zero = _check_keys(ds.get("zero_optimization", {}), "zero_optimization", _ZERO, _ZERO_IGNORED, unknown, notes)
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed zero_optimization.stage={stage!r} must be 0, 1, 2 or 3")
    dist_["strategy"] = ("ddp", "zero1", "zero2", "zero3")[stage]
    offload = []
    for key in ("offload_optimizer", "offload_param"):
        blk = _check_keys(zero.get(key, {}), f"zero_optimization.{key}", _OFFLOAD, set(), unknown, notes)
        dev = blk.get("device", "none")
        if dev == "nvme":
            raise ConfigError(f"deepspeed zero_optimization.{key}.device=nvme is not supported (cpu or none)")
        if dev == "cpu":
            offload.append(key)
    if offload:
        if stage < 2:
            raise ConfigError(f"deepspeed zero_optimization.{offload[0]} needs stage 2 or 3 in lmforge "
                              f"(FSDP2 CPU offload), got stage {stage}")
        dist_["cpu_offload"] = True
        if len(offload) == 1:
            notes.append(f"only {offload[0]} was requested, but FSDP2 CPU offload moves parameters, gradients "
                         "and optimizer states together")

    if "activation_checkpointing" in ds:
        _check_keys(ds["activation_checkpointing"], "activation_checkpointing", _ACT, set(), unknown, notes)
        tr["activation_checkpointing"] = True
        notes.append("activation_checkpointing: every transformer block is checkpointed (its sub-options "
                     "are DeepSpeed-specific and ignored)")
    if "steps_per_print" in ds:
        log["log_every"] = int(ds["steps_per_print"])
    if "tensorboard" in ds:
        tb = _check_keys(ds["tensorboard"], "tensorboard", _TB, set(), unknown, notes)
        log["tensorboard"] = bool(tb.get("enabled", False))
    if "wandb" in ds:
        wb = _check_keys(ds["wandb"], "wandb", _WANDB, set(), unknown, notes)
        if wb.get("enabled"):
            raise ConfigError("deepspeed wandb.enabled=true is not supported (lmforge logs to tensorboard and "
                              "metrics.jsonl)")
    if unknown:
        raise ConfigError(f"unknown deepspeed config keys: {', '.join(sorted(unknown))}")

    if any(k in ds for k in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")):
        _, micro, gas = resolve_batch(ds.get("train_batch_size"), ds.get("train_micro_batch_size_per_gpu"),
                                      ds.get("gradient_accumulation_steps"), dp_size)
        tr.update(micro_batch_size=micro, grad_accum_steps=gas)
    return {k: v for k, v in tree.items() if v}, notes


def load_deepspeed_config(path: str | Path, dp_size: int, base: Config | dict | None = None
                          ) -> tuple[Config, list[str]]:
    """Read a DeepSpeed JSON file and merge it over ``base`` (a Config or override tree)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"deepspeed config not found: {path}") from None
    try:
        ds = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg})") from None
    try:
        tree, notes = deepspeed_to_tree(ds, dp_size)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    base_tree = config_to_dict(base) if isinstance(base, Config) else (base or {})
    return build_config(deep_merge(base_tree, tree), source=str(path)), notes
