"""Import a DeepSpeed JSON config as lmforge config overrides.

``deepspeed_to_tree(ds, dp_size)`` → (nested override dict, notes). Keys are checked first, and every unknown
key in the file is reported in ONE error. ``notes`` lists every approximation (ignored tuning knobs, storage
dtype). Anything lmforge cannot honour raises ``ConfigError`` naming the key. ``load_deepspeed_config(path,
dp_size, base=None)`` reads the file and returns a validated ``Config``.

Mappings (DeepSpeed 0.19 semantics, its defaults filled in explicitly so lmforge's own defaults never leak in):
- batch: train_batch_size = train_micro_batch_size_per_gpu × gradient_accumulation_steps × dp; any one may be
  omitted and is derived, all three given must agree.
- scheduler: WarmupLR / WarmupDecayLR / WarmupCosineLR / OneCycle / LRRangeTest → ``scheduler.name`` of the
  same name with DeepSpeed's parameter names in ``scheduler.params``; ``total_num_steps`` → training.max_steps.
- fp16: loss_scale=0 → dynamic scaling (initial_scale_power → loss_scale_init=2^p, loss_scale_window,
  hysteresis, min_loss_scale); loss_scale=S>0 → a fixed scale S (init=min=S, window never reached).
- bf16 / fp16 → training.precision (autocast over fp32 parameters; the optimizer math matches DeepSpeed's
  fp32 master weights). zero_optimization.stage 0–3 → ddp / zero1 / zero2 / zero3.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from lmforge.config import Config, ConfigError, build_config, config_to_dict, deep_merge

IGNORED = "ignored"  # schema leaf: accepted with a note, no lmforge equivalent (tuning knob)
_OFFLOAD = {k: None for k in ("device", "pin_memory", "buffer_count", "buffer_size", "max_in_cpu", "fast_init",
                              "nvme_path", "pipeline", "pipeline_read", "pipeline_write", "ratio")}
_ZERO_KNOBS = ("contiguous_gradients", "overlap_comm", "reduce_scatter", "reduce_bucket_size", "allgather_partitions",
               "allgather_bucket_size", "round_robin_gradients", "stage3_prefetch_bucket_size",
               "stage3_param_persistence_threshold", "stage3_max_live_parameters", "stage3_max_reuse_distance",
               "stage3_gather_16bit_weights_on_model_save", "sub_group_size", "elastic_checkpoint",
               "ignore_unused_parameters", "load_from_fp32_weights", "cpu_offload", "zero_hpz_partition_size",
               "zero_quantized_weights", "zero_quantized_gradients", "mics_shard_size",
               "use_multi_rank_bucket_allreduce", "memory_efficient_linear")
_SCHED_PARAMS = {
    "WarmupLR": ("warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type", "last_batch_iteration"),
    "WarmupDecayLR": ("warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type", "total_num_steps",
                      "last_batch_iteration"),
    "WarmupCosineLR": ("warmup_min_ratio", "cos_min_ratio", "warmup_num_steps", "warmup_type", "total_num_steps",
                       "last_batch_iteration"),
    "OneCycle": ("cycle_min_lr", "cycle_max_lr", "decay_lr_rate", "cycle_first_step_size", "cycle_second_step_size",
                 "cycle_first_stair_count", "cycle_second_stair_count", "decay_step_size", "cycle_momentum",
                 "cycle_min_mom", "cycle_max_mom", "decay_mom_rate", "last_batch_iteration"),
    "LRRangeTest": ("lr_range_test_min_lr", "lr_range_test_step_size", "lr_range_test_step_rate",
                    "lr_range_test_staircase", "last_batch_iteration"),
}
# DeepSpeed's constructor defaults (deepspeed/runtime/lr_schedules.py); None: required by DeepSpeed.
_SCHED_DEFAULTS = {
    "WarmupLR": dict(warmup_min_lr=0.0, warmup_num_steps=1000, warmup_type="log"),
    "WarmupDecayLR": dict(warmup_min_lr=0.0, warmup_num_steps=1000, warmup_type="log"),
    "WarmupCosineLR": dict(warmup_min_ratio=0.0, warmup_num_steps=1000, cos_min_ratio=0.0001, warmup_type="log"),
    "OneCycle": dict(cycle_min_lr=None, cycle_max_lr=None, decay_lr_rate=0.0, cycle_first_step_size=2000,
                     cycle_second_step_size=None, decay_step_size=0),
    "LRRangeTest": dict(lr_range_test_min_lr=1e-3, lr_range_test_step_size=2000, lr_range_test_step_rate=1.0,
                        lr_range_test_staircase=False),
}
SCHEMA: dict = {
    "train_batch_size": None, "train_micro_batch_size_per_gpu": None, "gradient_accumulation_steps": None,
    "fp16": {k: None for k in ("enabled", "auto_cast", "loss_scale", "initial_scale_power", "loss_scale_window",
                               "hysteresis", "consecutive_hysteresis", "min_loss_scale",
                               "fp16_master_weights_and_grads")},
    "bf16": {"enabled": None, "immediate_grad_update": IGNORED, "check_grad_overflow": IGNORED},
    "optimizer": {"type": None, "params": {k: None for k in (
        "lr", "betas", "eps", "weight_decay", "momentum", "nesterov", "adam_w_mode", "torch_adam", "fused",
        "amsgrad", "bias_correction", "dampening")}},
    "scheduler": {"type": None, "params": None},  # params checked per type
    "gradient_clipping": None, "communication_data_type": None,
    "zero_optimization": {"stage": None, "offload_optimizer": _OFFLOAD, "offload_param": _OFFLOAD,
                          **{k: IGNORED for k in _ZERO_KNOBS}},
    "activation_checkpointing": {k: None for k in (
        "partition_activations", "contiguous_memory_optimization", "cpu_checkpointing", "number_checkpoints",
        "synchronize_checkpoint_boundary", "profile")},
    "steps_per_print": None, "tensorboard": {"enabled": None, "output_path": None, "job_name": None},
    "wandb": {"enabled": None, "team": None, "group": None, "project": None},
    **{k: IGNORED for k in ("wall_clock_breakdown", "zero_allow_untested_optimizer", "prescale_gradients",
                            "gradient_predivide_factor", "dump_state", "memory_breakdown", "zero_force_ds_cpu_optimizer",
                            "seq_parallel_communication_data_type")},
}
_OPT_TYPES = {"adam": "adamw", "adamw": "adamw", "sgd": "sgd"}
_COMM_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
STATIC_SCALE_WINDOW = 2 ** 31 - 1  # a window no run reaches: the scale never doubles


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


def check_keys(ds: Any, schema: dict, where: str = "", unknown: list | None = None,
               notes: list | None = None) -> tuple[list[str], list[str]]:
    """Walk ``ds`` against ``schema``; returns (unknown dotted keys, notes for ignored knobs)."""
    unknown = [] if unknown is None else unknown
    notes = [] if notes is None else notes
    if not isinstance(ds, dict):
        raise ConfigError(f"deepspeed '{where or 'config'}' must be an object, got {type(ds).__name__}")
    for k, v in ds.items():
        key = f"{where}.{k}" if where else k
        if k not in schema:
            unknown.append(key)
        elif schema[k] == IGNORED:
            notes.append(f"'{key}' has no lmforge equivalent (tuning knob); ignored")
        elif isinstance(schema[k], dict):
            check_keys(v, schema[k], key, unknown, notes)
    sched = ds.get("scheduler") if not where else None
    if isinstance(sched, dict) and sched.get("type") in _SCHED_PARAMS and "params" in sched:
        check_keys(sched["params"], dict.fromkeys(_SCHED_PARAMS[sched["type"]]), "scheduler.params", unknown, notes)
    return unknown, notes


def _pos_int(block: dict, key: str, where: str, minimum: int = 1) -> Optional[int]:
    v = block.get(key)
    if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < minimum):
        raise ConfigError(f"deepspeed '{where}.{key}' must be an integer ≥ {minimum}, got {v!r}")
    return v


def _map_precision(ds: dict, tr: dict, notes: list) -> None:
    fp16, bf16 = ds.get("fp16", {}), ds.get("bf16", {})
    if fp16.get("enabled") and bf16.get("enabled"):
        raise ConfigError("deepspeed fp16.enabled and bf16.enabled are both true; choose one")
    if bf16.get("enabled"):
        tr["precision"] = "bf16"
    elif fp16.get("enabled"):
        tr["precision"] = "fp16"
        if fp16.get("consecutive_hysteresis"):
            raise ConfigError("deepspeed fp16.consecutive_hysteresis=true has no lmforge equivalent (lmforge "
                              "refills hysteresis only when the scale grows); remove it or set it to false")
        if fp16.get("fp16_master_weights_and_grads"):
            raise ConfigError("deepspeed fp16.fp16_master_weights_and_grads=true is not supported (lmforge keeps "
                              "fp32 master weights)")
        scale = fp16.get("loss_scale", 0)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale < 0:
            raise ConfigError(f"deepspeed 'fp16.loss_scale' must be a number ≥ 0 (0: dynamic), got {scale!r}")
        if scale > 0:
            tr.update(loss_scale_init=float(scale), loss_scale_min=float(scale),
                      loss_scale_window=STATIC_SCALE_WINDOW, loss_scale_hysteresis=1)
            notes.append(f"fp16.loss_scale={scale}: static scale (overflow steps are skipped, the scale never "
                         "changes)")
        else:
            power = fp16.get("initial_scale_power", 16)
            if isinstance(power, bool) or not isinstance(power, int):
                raise ConfigError(f"deepspeed 'fp16.initial_scale_power' must be an integer, got {power!r}")
            window = _pos_int(fp16, "loss_scale_window", "fp16")
            hyst = _pos_int(fp16, "hysteresis", "fp16")
            min_scale = fp16.get("min_loss_scale", 1)
            if isinstance(min_scale, bool) or not isinstance(min_scale, (int, float)) or min_scale <= 0:
                raise ConfigError(f"deepspeed 'fp16.min_loss_scale' must be > 0, got {min_scale!r}")
            tr.update(loss_scale_init=float(2.0 ** power), loss_scale_window=window or 1000,
                      loss_scale_hysteresis=hyst or 2, loss_scale_min=float(min_scale))
    elif "bf16" in ds or "fp16" in ds:
        tr["precision"] = "fp32"
    if tr.get("precision") in ("bf16", "fp16"):
        notes.append(f"{tr['precision']}: DeepSpeed stores the model in {tr['precision']}; lmforge autocasts over "
                     "fp32 parameters (same fp32 master-weight update; set training.param_dtype=bfloat16 to also "
                     "store bf16 parameters)")


def _map_optimizer(o: dict, opt: dict, notes: list) -> None:
    typ = str(o.get("type", "")).lower()
    if typ not in _OPT_TYPES:
        raise ConfigError(f"deepspeed optimizer.type={o.get('type')!r} is not supported (allowed: Adam, AdamW, SGD)")
    params = o.get("params", {})
    opt["name"] = "adam" if typ == "adam" and params.get("adam_w_mode") is False else _OPT_TYPES[typ]
    for k in ("lr", "eps", "weight_decay", "momentum", "nesterov"):
        if k in params:
            opt[k] = params[k]
    if "betas" in params:
        opt["betas"] = tuple(params["betas"])
    if params.get("amsgrad"):
        raise ConfigError("deepspeed optimizer.params.amsgrad=true is not supported (lmforge has no AMSGrad)")
    if params.get("bias_correction") is False:
        raise ConfigError("deepspeed optimizer.params.bias_correction=false is not supported (lmforge's Adam "
                          "always corrects bias)")
    for k in ("torch_adam", "fused", "dampening"):
        if k in params:
            notes.append(f"'optimizer.params.{k}' ignored (lmforge picks the torch implementation)")


def _map_scheduler(s: dict, opt_name: Optional[str], sch: dict, tr: dict, notes: list) -> None:
    typ = s.get("type")
    if typ not in _SCHED_PARAMS:
        raise ConfigError(f"deepspeed scheduler.type={typ!r} is unknown (supported: {', '.join(_SCHED_PARAMS)})")
    given = dict(s.get("params", {}))
    lbi = given.pop("last_batch_iteration", -1)
    if lbi != -1:
        raise ConfigError(f"deepspeed scheduler.params.last_batch_iteration={lbi!r}: lmforge resumes schedules from "
                          "its checkpoints; remove the key (or set -1)")
    params = {**_SCHED_DEFAULTS[typ], **given}
    for k, v in params.items():
        if v is None and k in ("cycle_min_lr", "cycle_max_lr"):
            raise ConfigError(f"deepspeed scheduler.params.{k} is required for OneCycle")
    if typ == "OneCycle":
        for k in ("cycle_first_stair_count", "cycle_second_stair_count"):
            if params.pop(k, None):
                raise ConfigError(f"deepspeed scheduler.params.{k} > 0 (staircase OneCycle) is not supported; "
                                  "remove it or set 0")
        cycle_mom = params.pop("cycle_momentum", True)
        mom = [params.pop(k) for k in ("cycle_min_mom", "cycle_max_mom", "decay_mom_rate") if k in params]
        if cycle_mom and opt_name != "sgd":  # DeepSpeed cycles Adam's beta1 (and pins beta2 to 0.99)
            raise ConfigError("deepspeed OneCycle with cycle_momentum=true (the default) cycles Adam's betas, which "
                              "lmforge does not do; set scheduler.params.cycle_momentum=false")
        if mom:
            notes.append("OneCycle momentum parameters ignored (momentum is not cycled)")
    if typ in ("WarmupDecayLR", "WarmupCosineLR"):
        if "total_num_steps" in params:
            tr["max_steps"] = _pos_int(params, "total_num_steps", "scheduler.params")
        else:
            notes.append(f"{typ} without total_num_steps: the schedule spans training.max_steps")
    if "warmup_num_steps" in params:
        _pos_int(params, "warmup_num_steps", "scheduler.params")
        sch["warmup_steps"] = params["warmup_num_steps"]
    if params.get("warmup_type", "log") not in ("log", "linear"):
        raise ConfigError(f"deepspeed scheduler.params.warmup_type={params['warmup_type']!r} (allowed: log, linear)")
    sch.update(name=typ, params=params)


def deepspeed_to_tree(ds: dict, dp_size: int) -> tuple[dict, list[str]]:
    if not isinstance(ds, dict):
        raise ConfigError(f"a deepspeed config must be a JSON object, got {type(ds).__name__}")
    unknown, notes = check_keys(ds, SCHEMA)
    if unknown:
        raise ConfigError(f"unknown deepspeed config keys: {', '.join(sorted(unknown))}")
    tree: dict = {"training": {}, "optimizer": {}, "scheduler": {}, "distributed": {}, "logging": {}}
    tr, opt, sch, dist_, log = (tree[k] for k in ("training", "optimizer", "scheduler", "distributed", "logging"))

    _map_precision(ds, tr, notes)
    if "optimizer" in ds:
        _map_optimizer(ds["optimizer"], opt, notes)
    if "scheduler" in ds:
        _map_scheduler(ds["scheduler"], opt.get("name"), sch, tr, notes)
    clip = ds.get("gradient_clipping", 1.0)  # DeepSpeed's default is 1.0, not "off"
    tr["grad_clip"] = float(clip) if clip else None
    if "communication_data_type" in ds:
        comm = ds["communication_data_type"]
        if comm not in _COMM_DTYPES:
            raise ConfigError(f"deepspeed communication_data_type={comm!r} is not supported (allowed: fp32, bf16)")
        dist_["reduce_dtype"] = _COMM_DTYPES[comm]

    zero = ds.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed zero_optimization.stage={stage!r} must be 0, 1, 2 or 3")
    dist_["strategy"] = ("ddp", "zero1", "zero2", "zero3")[stage]
    offload = []
    for key in ("offload_optimizer", "offload_param"):
        dev = zero.get(key, {}).get("device", "none")
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
        tr["activation_checkpointing"] = True
        notes.append("activation_checkpointing: every transformer block is checkpointed (its sub-options "
                     "are DeepSpeed-specific and ignored)")
    if "steps_per_print" in ds:
        log["log_every"] = int(ds["steps_per_print"])
    if "tensorboard" in ds:
        log["tensorboard"] = bool(ds["tensorboard"].get("enabled", False))
    if ds.get("wandb", {}).get("enabled"):
        log["wandb"] = True
        if "project" in ds["wandb"]:
            log["wandb_project"] = str(ds["wandb"]["project"])
        notes.append("wandb: lmforge logs to Weights & Biases in offline mode; team/group are ignored")

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
    if "scheduler" in tree and isinstance(base_tree.get("scheduler"), dict):
        base_tree = {**base_tree, "scheduler": {**base_tree["scheduler"], "params": {}}}  # never mix param sets
    cfg = build_config(deep_merge(base_tree, tree), source=str(path))
    from lmforge.training.schedule import lr_factor_fn  # validates the schedule's params now, not at step 0

    try:
        lr_factor_fn(cfg.scheduler, cfg.optimizer.lr, cfg.training.max_steps)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return cfg, notes
