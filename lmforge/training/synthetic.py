"""Training steps on random tokens through the one build path and the one ``TrainStep``, without a data folder:
what throughput and memory measurements run (``benchmarks/gpu_mfu.py``, ``benchmarks/gpu_memory.py``, the
estimator checks in ``tests/``). World size 1.

    cfg = synthetic_config("llama-1b", vocab=32000, seq_len=2048, micro_batch=8, precision="bf16")
    run = SyntheticRun(cfg, torch.device("cuda"))
    result = run.measure(warmup=2, steps=5)     # tokens/s, median step time, peak device memory, losses

Each step is one optimizer step over ``grad_accum_steps`` micro-batches of uniform random tokens (labels =
the inputs shifted by one), so every position is a labelled target. A step ends with the step's one agreed
host read, so wall-clock time per step is the device's time per step. Legend: B micro-batch, T tokens.
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from lmforge.config import Config, build_config


def synthetic_config(preset: str, *, vocab: int, seq_len: int, micro_batch: int, precision: str = "bf16",
                     compile: bool = False, ac: str = "none", grad_accum: int = 1, seed: int = 0,
                     **model) -> Config:
    """A validated run config for ``preset`` (``ac``: "none", "full" or "selective"); ``model`` overrides keys."""
    if ac not in ("none", "full", "selective"):
        raise ValueError(f"ac must be none, full or selective, got {ac!r}")
    tree = {"run_dir": "runs/synthetic",
            "model": {"preset": preset, "vocab_size": vocab, "max_seq_len": seq_len, **model},
            "data": {"seq_len": seq_len},
            "training": {"micro_batch_size": micro_batch, "grad_accum_steps": grad_accum, "precision": precision,
                         "compile": compile, "activation_checkpointing": ac != "none",
                         "ac_selective": ac == "selective", "seed": seed, "max_steps": 10**6},
            "scheduler": {"name": "constant", "warmup_steps": 0}}
    return build_config(tree)


def random_micro(vocab: int, micro_batch: int, seq_len: int, accum: int, gen: torch.Generator) -> list[dict]:
    """One step's micro-batches of CPU tokens, as the window loader yields them."""
    out = []
    for _ in range(accum):
        w_BT1 = torch.randint(0, vocab, (micro_batch, seq_len + 1), generator=gen)
        out.append({"input_ids": w_BT1[:, :-1].contiguous(), "labels": w_BT1[:, 1:].contiguous()})
    return out


@dataclass
class Measured:
    tokens_per_s: float
    step_s: float  # median over the timed steps
    steps: int
    peak_bytes: Optional[int]  # torch.cuda.max_memory_allocated above what was allocated before the build
    losses: list[float] = field(default_factory=list)  # per timed step, mean over the step's targets


class SyntheticRun:
    """A world-size-1 engine built by ``build_engine`` (meta → parallelize (AC, compile) → materialise →
    fused optimizer), driven by the one ``TrainStep``."""

    def __init__(self, cfg: Config, device: torch.device):
        from lmforge.distributed.mesh import ParallelDims
        from lmforge.training.build import build_engine, seed_everything
        from lmforge.training.step import LMObjective, StepSettings, TrainStep

        self.cfg, self.device = cfg, device
        self.pdims = ParallelDims(1, 1, 1, 1, 1, device=device)
        self.base_bytes = _allocated(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seed_everything(cfg.training.seed)
        built = build_engine(cfg, self.pdims, device)
        self.engine, self.base = built.engine, built.base
        self.step = TrainStep(self.engine, LMObjective(), self.pdims,
                              StepSettings(cfg.training.grad_clip, cfg.training.precision))
        self.gen = torch.Generator().manual_seed(cfg.training.seed)
        self.tokens_per_step = cfg.data.seq_len * cfg.training.micro_batch_size * cfg.training.grad_accum_steps

    def flops_per_token(self) -> float:
        return self.base.flops_per_token(self.cfg.data.seq_len)

    def one_step(self):
        tc = self.cfg.training
        micro = random_micro(self.cfg.model.vocab_size, tc.micro_batch_size, self.cfg.data.seq_len,
                             tc.grad_accum_steps, self.gen)
        return self.step(micro, lambda: (False, False))

    def measure(self, warmup: int, steps: int, budget_s: Optional[float] = None) -> Measured:
        """``warmup`` untimed steps, then up to ``steps`` timed ones (fewer when ``budget_s`` of timed
        stepping has passed; at least one). The loss is read after timing (device tensors kept until then)."""
        for _ in range(warmup):
            self.one_step()
        times, outs, t_start = [], [], time.perf_counter()
        for _ in range(steps):
            t0 = time.perf_counter()
            out = self.one_step()
            times.append(time.perf_counter() - t0)
            outs.append(out)
            if budget_s is not None and time.perf_counter() - t_start >= budget_s:
                break
        losses = [float(o.loss_sum) / max(o.weight, 1.0) for o in outs]
        dt = statistics.median(times)
        peak = None
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) - self.base_bytes
        return Measured(self.tokens_per_step / dt, dt, len(times), peak, losses)

    def close(self) -> None:
        """Drop the engine and give its memory back (the next run starts from an empty device)."""
        self.engine = self.step = self.base = None
        release(self.device)


def _allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_oom(err: BaseException) -> bool:
    """A device out-of-memory error (CUDA's, or the allocator's message on other backends)."""
    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    return isinstance(err, oom) or "out of memory" in str(err).lower()
