"""Learning-rate schedules as ``LambdaLR`` multipliers of ``optimizer.lr`` (so they are state_dict-able).

Step ``s`` (0-based optimizer step) trains with ``lr · factor(s)``. With W = warmup_steps, N = max_steps,
m = min_lr_ratio and p = clamp((s - W) / max(1, N - W), 0, 1):

- warmup (all native schedules): factor = (s + 1) / W for s < W
- cosine: m + (1 - m)·½(1 + cos πp);  linear: 1 - (1 - m)·p;  constant: 1
- inverse_sqrt: sqrt(max(W, 1) / (s + 1)) after warmup (no floor)
- wsd (warmup-stable-decay): 1 until the last ``decay_fraction``·N steps, then decays to m over them
  (``decay_shape`` linear | cosine | sqrt, the last being 1 - (1 - m)·sqrt(q))

DeepSpeed schedules take DeepSpeed's parameter names in ``scheduler.params`` and follow its formulas with
``last_batch_iteration = s``: WarmupLR, WarmupDecayLR, WarmupCosineLR, OneCycle (learning rate only; no
momentum cycling, no stairs), LRRangeTest.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from lmforge.config import ConfigError, SchedulerConfig


def _warm(s: int, w: int) -> float:
    return (s + 1) / w


def _progress(s: int, w: int, n: int) -> float:
    return min(max((s - w) / max(1, n - w), 0.0), 1.0)


def cosine(s: int, w: int, n: int, m: float) -> float:
    if s < w:
        return _warm(s, w)
    return m + (1 - m) * 0.5 * (1 + math.cos(math.pi * _progress(s, w, n)))


def linear(s: int, w: int, n: int, m: float) -> float:
    return _warm(s, w) if s < w else 1 - (1 - m) * _progress(s, w, n)


def constant(s: int, w: int, n: int, m: float) -> float:
    return _warm(s, w) if s < w else 1.0


def inverse_sqrt(s: int, w: int, n: int, m: float) -> float:
    return _warm(s, w) if s < w else math.sqrt(max(w, 1) / (s + 1))


def wsd(s: int, w: int, n: int, m: float, decay_fraction: float = 0.2, decay_shape: str = "linear") -> float:
    if s < w:
        return _warm(s, w)
    decay_steps = max(1, round(decay_fraction * n))
    start = max(w, n - decay_steps)
    if s < start:
        return 1.0
    q = min((s - start) / max(1, n - start), 1.0)
    if decay_shape == "cosine":
        return m + (1 - m) * 0.5 * (1 + math.cos(math.pi * q))
    if decay_shape == "sqrt":
        return 1 - (1 - m) * math.sqrt(q)
    return 1 - (1 - m) * q


# ------------------------------------------------------------------ DeepSpeed (absolute lrs → factors)
def _ds_warmup_gamma(it: int, num_steps: int, kind: str) -> float:
    if kind == "log":
        return math.log(it + 1) / math.log(num_steps)
    return it / num_steps


def ds_warmup_lr(it: int, warmup_min_lr: float, warmup_max_lr: float, warmup_num_steps: int,
                 warmup_type: str, total_num_steps: int | None = None) -> float:
    """WarmupLR (total_num_steps None) and WarmupDecayLR: absolute lr at iteration ``it``."""
    num = max(2, warmup_num_steps)
    if it < num:
        gamma = _ds_warmup_gamma(it, num, warmup_type)
    elif total_num_steps is None:
        gamma = 1.0
    else:
        gamma = max(0.0, (total_num_steps - it) / max(1.0, total_num_steps - num))
    return warmup_min_lr + (warmup_max_lr - warmup_min_lr) * gamma


def ds_warmup_cosine_ratio(it: int, total_num_steps: int, warmup_min_ratio: float, warmup_num_steps: int,
                           cos_min_ratio: float, warmup_type: str) -> float:
    num = max(2, warmup_num_steps)
    if it < num:
        r = _ds_warmup_gamma(it, num, warmup_type)
        return warmup_min_ratio + r * (1.0 - warmup_min_ratio)
    real_step, real_total = it - num + 1, total_num_steps - num
    r = (1 + math.cos(math.pi * real_step / real_total)) / 2
    return max(0.0, cos_min_ratio + (1.0 - cos_min_ratio) * r)


def ds_one_cycle_lr(it: int, cycle_min_lr: float, cycle_max_lr: float, decay_lr_rate: float,
                    cycle_first_step_size: int, cycle_second_step_size: int | None, decay_step_size: int) -> float:
    """DeepSpeed's OneCycle lr: a triangle over iterations 1..total, then ``min / (1 + rate·k/decay_step)``."""
    first = float(cycle_first_step_size)
    second = float(cycle_second_step_size) if cycle_second_step_size is not None else first
    total = first + second
    if it < total:
        ratio = first / total
        b = it + 1
        cycle = math.floor(1 + b / total)
        x = 1.0 + b / total - cycle
        scale = x / ratio if x <= ratio else (x - 1) / (ratio - 1)
        return cycle_min_lr + (cycle_max_lr - cycle_min_lr) * scale
    if decay_step_size <= 0 or decay_lr_rate == 0:
        return cycle_min_lr
    return cycle_min_lr / (1 + decay_lr_rate * (it - total + 1) / decay_step_size)


def ds_lr_range_test_lr(it: int, lr_range_test_min_lr: float, lr_range_test_step_size: int,
                        lr_range_test_step_rate: float, lr_range_test_staircase: bool) -> float:
    interval = (it + 1) / lr_range_test_step_size
    if lr_range_test_staircase:
        interval = math.floor(interval)
    return lr_range_test_min_lr * (1 + lr_range_test_step_rate * interval)


# ------------------------------------------------------------------ factory
_NATIVE = {"cosine": cosine, "linear": linear, "constant": constant, "inverse_sqrt": inverse_sqrt, "wsd": wsd}


def _ds_defaults(name: str, lr: float, w: int, n: int) -> dict[str, Any]:
    warm = dict(warmup_min_lr=0.0, warmup_max_lr=lr, warmup_num_steps=w, warmup_type="log")
    return {
        "wsd": dict(decay_fraction=0.2, decay_shape="linear"),
        "WarmupLR": warm,
        "WarmupDecayLR": dict(warm, total_num_steps=n),
        "WarmupCosineLR": dict(total_num_steps=n, warmup_min_ratio=0.0, warmup_num_steps=w, cos_min_ratio=1e-4,
                               warmup_type="log"),
        "OneCycle": dict(cycle_min_lr=lr / 10, cycle_max_lr=lr, decay_lr_rate=0.0, cycle_first_step_size=2000,
                         cycle_second_step_size=None, decay_step_size=0),
        "LRRangeTest": dict(lr_range_test_min_lr=lr, lr_range_test_step_size=2000, lr_range_test_step_rate=1.0,
                            lr_range_test_staircase=False),
    }.get(name, {})


def _check_params(name: str, given: dict, defaults: dict) -> dict:
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        allowed = ", ".join(defaults) or "none"
        raise ConfigError(f"unknown key 'scheduler.params.{unknown[0]}' for scheduler.name={name} "
                          f"(allowed: {allowed})")
    out = {**defaults, **given}
    if out.get("warmup_type", "log") not in ("log", "linear"):
        raise ConfigError(f"invalid value for 'scheduler.params.warmup_type': {out['warmup_type']!r} "
                          "(allowed: 'log', 'linear')")
    if out.get("decay_shape", "linear") not in ("linear", "cosine", "sqrt"):
        raise ConfigError(f"invalid value for 'scheduler.params.decay_shape': {out['decay_shape']!r} "
                          "(allowed: 'linear', 'cosine', 'sqrt')")
    if name == "wsd" and not 0 < out["decay_fraction"] <= 1:
        raise ConfigError(f"invalid value for 'scheduler.params.decay_fraction': {out['decay_fraction']} (0 < x ≤ 1)")
    for k in ("lr_range_test_step_size", "cycle_first_step_size"):
        if k in out and out[k] <= 0:
            raise ConfigError(f"invalid value for 'scheduler.params.{k}': {out[k]} (must be > 0)")
    if name == "WarmupCosineLR" and out["total_num_steps"] <= max(2, out["warmup_num_steps"]):
        raise ConfigError("scheduler.params.total_num_steps must exceed warmup_num_steps for WarmupCosineLR")
    return out


def lr_factor_fn(cfg: SchedulerConfig, base_lr: float, max_steps: int) -> Callable[[int], float]:
    """The multiplier of ``base_lr`` at each step, as a picklable function."""
    w, n, m, name = cfg.warmup_steps, max_steps, cfg.min_lr_ratio, cfg.name
    params = _check_params(name, dict(cfg.params), _ds_defaults(name, base_lr, w, n))
    if name in _NATIVE:
        return partial(_NATIVE[name], w=w, n=n, m=m, **params)
    absolute = {"WarmupLR": partial(ds_warmup_lr, total_num_steps=None), "WarmupDecayLR": ds_warmup_lr,
                "OneCycle": ds_one_cycle_lr, "LRRangeTest": ds_lr_range_test_lr}
    if name == "WarmupCosineLR":
        return partial(ds_warmup_cosine_ratio, **params)
    if name in absolute:
        return partial(_divided, partial(absolute[name], **params), base_lr)
    raise ConfigError(f"invalid value for 'scheduler.name': {name!r}")


def warmup_end(cfg: SchedulerConfig) -> int:
    """The first step after the schedule's warm-up (0: none). Evaluations before it understate a run, so a
    tuning pruner does not judge a trial on them (``pruner.after_warmup``)."""
    if "warmup_num_steps" in _ds_defaults(cfg.name, 1.0, cfg.warmup_steps, 1):
        return int(cfg.params.get("warmup_num_steps", cfg.warmup_steps))
    return cfg.warmup_steps if cfg.name in _NATIVE else 0


def _divided(fn: Callable[[int], float], base_lr: float, s: int) -> float:
    return fn(s) / base_lr


def build_scheduler(optimizer: Optimizer, cfg: SchedulerConfig, max_steps: int) -> LambdaLR:
    """LambdaLR over every param group; call ``.step()`` once per optimizer step."""
    base = optimizer.param_groups[0]["lr"]
    return LambdaLR(optimizer, lr_factor_fn(cfg, base, max_steps))
