"""Optimizers with decay / no-decay parameter groups.

Rule: a parameter gets weight decay iff it has ``ndim >= 2`` and is not an embedding table (any
``nn.Embedding.weight``; a tied output head shares that tensor and therefore gets no decay either).
Norm gains, biases and other vectors/scalars never decay. ``optimizer.no_decay_patterns`` adds more
exclusions by parameter name (substring match); ``optimizer.embedding_weight_decay`` overrides the
rate for embeddings instead of 0 (per-group weight decay).
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.config import ConfigError, OptimizerConfig


def _embedding_param_ids(model: nn.Module) -> set[int]:
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}


def param_groups(model: nn.Module, cfg: OptimizerConfig) -> list[dict]:
    """Decay / no-decay / embedding groups (empty groups dropped); each param appears once."""
    emb = _embedding_param_ids(model)
    extra = tuple(cfg.no_decay_patterns)
    emb_wd = cfg.embedding_weight_decay
    decay, no_decay, embeds = [], [], []
    names = {"decay": [], "no_decay": [], "embedding": []}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in emb:
            (embeds if emb_wd else no_decay).append(p)
            names["embedding" if emb_wd else "no_decay"].append(name)
        elif p.ndim < 2 or any(pat in name for pat in extra):
            no_decay.append(p)
            names["no_decay"].append(name)
        else:
            decay.append(p)
            names["decay"].append(name)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay, "name": "decay", "param_names": names["decay"]},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay", "param_names": names["no_decay"]},
        {"params": embeds, "weight_decay": emb_wd or 0.0, "name": "embedding", "param_names": names["embedding"]},
    ]
    return [g for g in groups if g["params"]]


def _impl_kwargs(params: list[torch.Tensor], fused_ok: bool) -> dict:
    """The fused kernel where torch has one for the device (CUDA, and CPU since torch 2.4: ~3x faster than
    foreach here), foreach otherwise; sharded (DTensor) parameters keep foreach."""
    from torch.distributed.tensor import DTensor

    devices = {p.device.type for p in params}
    plain = not any(isinstance(p, DTensor) for p in params)
    if fused_ok and plain and len(devices) == 1 and devices <= {"cuda", "cpu"} \
            and all(p.dtype.is_floating_point for p in params):
        return {"fused": True}
    return {"foreach": True}


def build_optimizer(model: nn.Module, cfg: OptimizerConfig, substitute: dict | None = None) -> torch.optim.Optimizer:
    """AdamW / Adam / SGD / Lion / Adafactor over ``param_groups(model, cfg)``; ``substitute`` maps
    id(model parameter) → the tensor the optimizer steps instead (fp32 master weights)."""
    groups = param_groups(model, cfg)
    if substitute:
        groups = [{**g, "params": [substitute[id(p)] for p in g["params"]]} for g in groups]
    if not groups:
        raise ConfigError("model has no trainable parameters (all requires_grad=False)")
    params = [p for g in groups for p in g["params"]]
    name = cfg.name
    if name in ("adamw", "adam"):
        cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
        return cls(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, **_impl_kwargs(params, True))
    if name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               **_impl_kwargs(params, True))
    if name == "lion":
        from lmforge.training.lion import Lion

        return Lion(groups, lr=cfg.lr, betas=tuple(cfg.betas))
    if name == "adafactor":
        return torch.optim.Adafactor(groups, lr=cfg.lr, foreach=True)
    raise ConfigError(f"invalid value for 'optimizer.name': {name!r}")
