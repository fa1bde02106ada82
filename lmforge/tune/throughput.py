"""Throughput autotuning (``lmforge tune --objective throughput``): the fastest way to run the base job's
global batch on this hardware.

Space: ``training.micro_batch_size`` over the divisors of the per-rank batch (global batch / dp), with
``training.grad_accum_steps`` derived so micro × accum × dp stays the global batch; activation
checkpointing on/off; with more than one process per trial, ``distributed.strategy`` over
``throughput.strategies`` and ``distributed.cpu_offload`` (zero2/zero3). A candidate whose per-rank
memory estimate (``lmforge.distributed.estimate``, the ``lmforge estimate`` model) exceeds the budget is
PRUNED before it runs; the others train ``throughput.steps`` steps (no evaluation, no checkpoints) and are
scored by the median tokens/s after ``throughput.warmup_steps``. The fastest config is ``best.yaml`` (also
``best_throughput.yaml``).
"""

from __future__ import annotations

import os
from pathlib import Path

from lmforge.errors import ConfigError
from lmforge.tune.plan import Plan

MICRO, ACCUM = "training.micro_batch_size", "training.grad_accum_steps"
AC, STRATEGY, OFFLOAD = "training.activation_checkpointing", "distributed.strategy", "distributed.cpu_offload"


def throughput_space(base_cfg, nproc: int, tc) -> tuple[dict, int]:
    """(space, global batch in sequences)."""
    t = base_cfg.training
    dp = nproc  # data parallel over every process (tp = pp = 1 for the search)
    if base_cfg.distributed.tp != 1 or base_cfg.distributed.pp != 1:
        raise ConfigError("--objective throughput searches data-parallel layouts; set distributed.tp=1 and pp=1")
    global_batch = t.micro_batch_size * t.grad_accum_steps * dp
    per_rank = global_batch // dp
    micro = [m for m in range(1, per_rank + 1) if per_rank % m == 0]
    space: dict = {MICRO: micro, AC: [False, True]}
    if nproc > 1:
        strategies = [s for s in tc.strategies if s in ("ddp", "zero1", "zero2", "zero3")]
        if not strategies:
            raise ConfigError(f"throughput.strategies={tc.strategies}: none of ddp, zero1, zero2, zero3")
        space[STRATEGY] = strategies
        if tc.offload and any(s in ("zero2", "zero3") for s in strategies):
            space[OFFLOAD] = [False, True]  # with ddp/zero1 offload=true is pruned unrun (grids need no when:)
    return space, global_batch


def budget_bytes(tc) -> float:
    if tc.budget_gb is not None:
        return tc.budget_gb * 2 ** 30
    import torch

    if torch.cuda.is_available():
        return float(torch.cuda.get_device_properties(0).total_memory)
    return 0.8 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def candidate(plan: Plan, params: dict) -> dict:
    """The full overrides of one candidate (accumulation derived from the fixed global batch)."""
    out = dict(params)
    out[ACCUM] = plan.global_batch // (params[MICRO] * plan.nproc)
    return out


def estimate_bytes(plan: Plan, cfg) -> float:
    from lmforge.distributed.estimate import ModelShape, estimate

    if cfg.model.vocab_size is None and cfg.data.path:
        from lmforge.data.pack import read_manifest

        cfg.model.vocab_size = read_manifest(cfg.data.path)["vocab_size"]
    t, d = cfg.training, cfg.distributed
    strategy = d.strategy + ("+offload" if d.cpu_offload else "") if plan.nproc > 1 else "ddp"
    est = estimate(ModelShape.from_config(cfg.model), strategy, plan.nproc, micro_batch=t.micro_batch_size,
                   seq_len=cfg.data.seq_len, optimizer=cfg.optimizer.name if cfg.optimizer.name in
                   ("adamw", "adam", "sgd") else "adamw", momentum=cfg.optimizer.momentum,
                   precision="bf16" if t.precision == "bf16" else "fp32",
                   activation_checkpointing=t.activation_checkpointing)
    return est["total"]


def run_probe(plan: Plan, run_dir: Path, params: dict, distributed: bool, rank0: bool) -> dict:
    from lmforge.tune.runner import _run_job, tokens_per_s
    from lmforge.tune.trial import PruneHook

    tc = plan.cfg.throughput
    over = candidate(plan, params)
    if over.get(OFFLOAD) and over.get(STRATEGY) in ("ddp", "zero1"):
        return {"state": "pruned", "values": [], "run_dir": str(run_dir), "user_attrs": {"pruned_by": "invalid"},
                "reason": f"cpu_offload needs zero2/zero3, not {over[STRATEGY]}"}
    fixed = {"run_dir": str(run_dir), "checkpoint.resume": "auto", "training.max_steps": tc.steps,
             "training.eval_every": 0, "checkpoint.every_steps": 0, "logging.log_every": 1,
             "logging.progress": False, "logging.report": False, "logging.tensorboard": False}
    cfg = plan.job().load(over, fixed)
    need, budget = estimate_bytes(plan, cfg), budget_bytes(tc)
    attrs = {"estimate_gib": need / 2 ** 30, "budget_gib": budget / 2 ** 30, "grad_accum_steps": over[ACCUM]}
    if need > budget:
        return {"state": "pruned", "values": [], "run_dir": str(run_dir), "user_attrs": {**attrs, "pruned_by":
                "estimate"}, "reason": f"estimate {need / 2 ** 30:.2f} GiB > budget {budget / 2 ** 30:.2f} GiB"}
    summary = _run_job(plan, cfg, PruneHook(None, "", distributed, rank0))
    tps = tokens_per_s(run_dir, tc.warmup_steps)
    if summary.get("stop_reason") != "max_steps" or tps is None:
        return {"state": "failed", "values": [], "run_dir": str(run_dir), "user_attrs": attrs,
                "reason": f"stopped: {summary.get('stop_reason')}"}
    return {"state": "complete", "values": [tps], "run_dir": str(run_dir), "user_attrs": attrs}
