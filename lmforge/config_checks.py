"""Configs that validate but make no sense: ``lint(cfg, device)`` → warnings, or ``ConfigError`` for a contradiction.

The schema (``config.py``) checks each key and the combinations that cannot be built. This module checks what
the schema cannot know is pointless (it depends on the device, or on two keys that each look fine): a
warning says why and what to set instead; a truly contradictory pair is an error naming both keys. The
trainer calls it once the device is known, before any run folder exists; ``lmforge config`` prints the
same warnings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from lmforge.errors import ConfigError


def cpu_has_bf16() -> Optional[bool]:
    """True when the CPU does bf16 matmuls natively (AVX-512 BF16 or AMX), None when it cannot be told."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_device_type(want: str) -> str:
    """'cpu' or 'cuda' for ``training.device`` (auto: cuda when available)."""
    if want != "auto":
        return want
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _contradictions(cfg) -> None:
    tc = cfg.training
    if tc.param_dtype == "bfloat16" and tc.precision not in ("bf16", "auto"):  # auto follows the bf16 params
        raise ConfigError(
            f"training.param_dtype=bfloat16 contradicts training.precision={tc.precision}: the parameters would be "
            f"bf16, so the compute cannot be {tc.precision}",
            hint="set training.precision=bf16 (bf16 weights, with an fp32 master copy unless "
                 "training.master_weights=false), or training.param_dtype=float32")
    if tc.early_stop_metric and tc.eval_every == 0:
        raise ConfigError(
            f"training.early_stop_metric={tc.early_stop_metric} needs periodic evaluation, but "
            f"training.eval_every=0 turns it off: training could never stop early",
            hint="set training.eval_every to the steps between evaluations, or drop training.early_stop_metric")


def _precision_warnings(cfg, device_type: str) -> list[str]:
    if cfg.training.precision != "fp16" or device_type != "cpu":
        return []
    bf16 = cpu_has_bf16()
    advice = {True: "this CPU has AVX-512 BF16/AMX: use training.precision=bf16",
              False: "this CPU lacks AVX-512 BF16: use training.precision=fp32",
              None: "use training.precision=bf16 where the CPU has AVX-512 BF16 (or AMX), else fp32"}[bf16]
    return [f"training.precision=fp16 on the CPU: fp16 matmuls are emulated there (slower than fp32) and still "
            f"need loss scaling, which bf16 does not; {advice}"]


def _schedule_warnings(cfg) -> list[str]:
    tc, ck, n = cfg.training, cfg.checkpoint, cfg.training.max_steps
    out = []
    if cfg.scheduler.warmup_steps > n:
        out.append(f"scheduler.warmup_steps={cfg.scheduler.warmup_steps} > training.max_steps={n}: the learning "
                   f"rate never reaches optimizer.lr (it peaks at {n / cfg.scheduler.warmup_steps:.0%} of it)")
    if tc.eval_every > n:
        out.append(f"training.eval_every={tc.eval_every} > training.max_steps={n}: no periodic evaluation runs, "
                   f"only the one at the end")
    if ck.every_steps > n:
        out.append(f"checkpoint.every_steps={ck.every_steps} > training.max_steps={n}: only the final checkpoint "
                   f"is written (checkpoint.every_steps=0 says so)")
    if ck.keep_best > 0 and (tc.eval_every == 0 or tc.eval_every > n):
        out.append(f"checkpoint.keep_best={ck.keep_best} but no periodic evaluation runs (training.eval_every="
                   f"{tc.eval_every}): only the final checkpoint has a {ck.best_metric} to rank, so keep_best "
                   f"keeps nothing more than checkpoint.keep_last")
    return out


def lint(cfg, device=None) -> list[str]:
    """Warnings for a valid but pointless pretraining ``Config`` (empty: nothing to say); ``ConfigError`` for
    a contradiction. ``device``: the torch.device / type the run uses (None: from training.device)."""
    _contradictions(cfg)
    device_type = getattr(device, "type", device) or resolve_device_type(cfg.training.device)
    return _precision_warnings(cfg, device_type) + _schedule_warnings(cfg)
