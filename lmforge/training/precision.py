"""Mixed precision: fp16 dynamic loss scaling (DeepSpeed's knobs) and fp32 master weights for bf16 params."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class DynamicLossScaler:
    """Dynamic loss scale with DeepSpeed's semantics (``deepspeed.runtime.fp16.loss_scaler``). An overflow
    step is skipped; an overflow with ``hysteresis`` used up halves the scale (not below ``min_scale``),
    otherwise it uses up one unit of hysteresis; after ``window`` overflow-free steps following the last
    overflow (the first growth comes one step later, as in DeepSpeed) the scale doubles and hysteresis is
    restored. ``max_skips_at_min`` overflows in a row at ``min_scale`` make ``update`` return a stop message."""

    def __init__(self, init_scale: float = 2.0 ** 16, window: int = 1000, hysteresis: int = 2,
                 min_scale: float = 1.0, max_skips_at_min: int = 10, factor: float = 2.0):
        self.scale, self.window, self.hysteresis, self.min_scale = float(init_scale), window, hysteresis, min_scale
        self.max_skips_at_min, self.factor = max_skips_at_min, factor
        self.cur_hysteresis, self.skips_at_min, self.overflows = hysteresis, 0, 0
        self.iter, self.last_overflow_iter = 0, -1

    def unscale_(self, params) -> bool:
        """Divide grads by the scale in place; True when all are finite (a host read)."""
        return not bool(self.found_inf_(params).item())

    def found_inf_(self, params) -> torch.Tensor:
        """Divide grads by the scale in place; a device tensor, nonzero when some grad is inf/NaN (no sync)."""
        grads = [p.grad for p in params if p.grad is not None]
        found_inf = torch.zeros(1, device=grads[0].device if grads else "cpu")
        if not grads:
            return found_inf
        inv = torch.full((1,), 1.0 / self.scale, device=grads[0].device)
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for g in grads:
            by_dtype.setdefault(g.dtype, []).append(g)
        for gs in by_dtype.values():
            torch._amp_foreach_non_finite_check_and_unscale_(gs, found_inf, inv)
        return found_inf

    def update(self, found_inf: bool) -> Optional[str]:
        msg = None
        if found_inf:
            self.overflows += 1
            if self.scale <= self.min_scale:
                self.skips_at_min += 1
                if self.skips_at_min >= self.max_skips_at_min:
                    msg = (f"fp16: {self.skips_at_min} overflow steps in a row at the minimum loss scale "
                           f"{self.min_scale}; the model does not fit fp16's range. Use training.precision=bf16")
            if self.cur_hysteresis <= 1:
                self.scale = max(self.scale / self.factor, self.min_scale)
            else:
                self.cur_hysteresis -= 1
            self.last_overflow_iter = self.iter
        else:
            self.skips_at_min = 0
            stable = self.iter - self.last_overflow_iter - 1
            if stable > 0 and stable % self.window == 0:
                self.scale *= self.factor
                self.cur_hysteresis = self.hysteresis
        self.iter += 1
        return msg

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("scale", "cur_hysteresis", "skips_at_min", "overflows", "iter",
                                             "last_overflow_iter")}

    def load_state_dict(self, st: dict) -> None:
        for k, v in st.items():
            setattr(self, k, v)


def make_loss_scaler(tc) -> Optional[DynamicLossScaler]:
    if tc.precision != "fp16":
        return None
    return DynamicLossScaler(tc.loss_scale_init, tc.loss_scale_window, tc.loss_scale_hysteresis,
                             tc.loss_scale_min, tc.loss_scale_max_skips_at_min)


def cast_params_(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast parameters only (buffers such as RoPE tables stay fp32); tied params stay tied."""
    for p in {id(p): p for p in model.parameters()}.values():
        p.data = p.data.to(dtype)


class MasterWeights:
    """fp32 copies of low-precision params. The optimizer steps the copies (same parameter groups, see
    ``build_optimizer(substitute=...)``); after each step the model gets them rounded."""

    def __init__(self, model: nn.Module):
        named: dict[int, tuple[str, nn.Parameter]] = {}
        for name, p in model.named_parameters():  # tied parameters once
            named.setdefault(id(p), (canonical_name(name), p))
        self.names = [n for n, _ in named.values()]
        self.model_params = [p for _, p in named.values()]
        self.master_params = [nn.Parameter(p.detach().float().clone(), requires_grad=p.requires_grad)
                              for p in self.model_params]

    @classmethod
    def maybe(cls, model: nn.Module, tc) -> Optional["MasterWeights"]:
        if tc.param_dtype != "bfloat16":
            return None
        cast_params_(model, torch.bfloat16)
        return cls(model) if tc.master_weights else None

    def substitute(self) -> dict[int, nn.Parameter]:
        """id(model parameter) → its fp32 master, for building the optimizer over the masters."""
        return {id(p): m for p, m in zip(self.model_params, self.master_params)}

    @torch.no_grad()
    def grads_to_master(self) -> None:
        for p, m in zip(self.model_params, self.master_params):
            m.grad = None if p.grad is None else p.grad.to(torch.float32)

    @torch.no_grad()
    def master_to_model(self) -> None:
        torch._foreach_copy_(self.model_params, self.master_params)

    def zero_grad(self) -> None:
        for p in self.model_params:
            p.grad = None

    def state_dict(self) -> dict:
        return {n: m.detach().cpu() for n, m in zip(self.names, self.master_params)}

    @torch.no_grad()
    def load_state_dict(self, sd: dict) -> None:
        for n, m in zip(self.names, self.master_params):
            m.copy_(sd[n])
        self.master_to_model()


def canonical_name(name: str) -> str:
    """A parameter name without the wrappers' prefixes (DDP, activation checkpointing, torch.compile)."""
    return name.replace("_orig_mod.", "").replace("_checkpoint_wrapped_module.", "").removeprefix("module.")
