"""What the one step needs under any parallelism (``training/engine.py``): global-norm gradient clipping over
DTensor/FSDP/TP/PP params without a host sync, gradient-sync control on accumulation micro-steps, and the
per-rank state bytes a run reports. (Loss normalisation, ``loss_sum × dp / global targets``, is in
``training/step.py``.)"""

from __future__ import annotations

import contextlib
from typing import Iterable

import torch
import torch.distributed as dist
import torch.nn as nn

from lmforge.distributed.mesh import ParallelDims





def _sq_norm(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Sum of squares of the grads' *global* values (float64, on ``device``, no host sync); DTensor grads are
    reduced over their own mesh."""
    from torch.distributed.tensor import DTensor

    total = torch.zeros((), dtype=torch.float64, device=device)
    groups: dict[tuple, list] = {}
    for g in grads:
        if isinstance(g, DTensor):
            groups.setdefault((id(g.device_mesh), g.placements), []).append(g)
        else:
            total = total + g.detach().double().pow(2).sum().to(device)
    for group in groups.values():
        norm = torch.nn.utils.get_total_norm(group, norm_type=2.0, foreach=False)
        norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
        total = total + norm.detach().double().to(device) ** 2
    return total


def clip_grad_norm(parameters: Iterable[torch.Tensor] | nn.Module, max_norm: float | None,
                   pdims: ParallelDims) -> torch.Tensor:
    """Global L2 grad norm over all ranks' params (TP/FSDP DTensors reduced per mesh, pipeline stages summed)
    as a device tensor (no host sync); grads are scaled in place when ``max_norm`` is set. Returns the norm
    before clipping."""
    params = list(parameters.parameters() if isinstance(parameters, nn.Module) else parameters)
    grads = [p.grad for p in params if p.grad is not None]
    sq = _sq_norm(grads, pdims.device)
    if pdims.pp > 1:
        dist.all_reduce(sq, group=pdims.group("pp"))
    total = sq.sqrt()
    if max_norm is not None and grads:
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in grads:  # per tensor: plain and DTensor grads (TP mix) cannot share one foreach call
            g.mul_(coef.to(g.dtype))
    return total


@contextlib.contextmanager
def grad_sync(model: nn.Module, enabled: bool):
    """Context for one accumulation micro-step: ``enabled=False`` skips the gradient all-reduce /
    reduce-scatter (DDP ``no_sync``, FSDP2 ``set_requires_gradient_sync``); use True on the last micro-step."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, nn.parallel.DistributedDataParallel):
        with (contextlib.nullcontext() if enabled else model.no_sync()):
            yield
    elif isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield



def local_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Bytes this rank holds for parameters (local shards) and optimizer states."""
    from torch.distributed.tensor import DTensor

    def nbytes(t: torch.Tensor) -> int:
        t = t.to_local() if isinstance(t, DTensor) else t
        return t.numel() * t.element_size()

    seen, p_bytes = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            p_bytes += nbytes(p)
    o_bytes = 0
    if optimizer is not None:
        inner = getattr(optimizer, "optim", optimizer)  # ZeroRedundancyOptimizer keeps the local one here
        for state in inner.state.values():
            o_bytes += sum(nbytes(v) for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
    return {"params": p_bytes, "optimizer": o_bytes}
