"""Model transforms applied from outside the model: activation checkpointing and per-block torch.compile."""

from __future__ import annotations

import os
from functools import partial
from typing import Optional

import torch
from torch import nn

# ops whose outputs selective checkpointing keeps (the expensive ones); everything else is recomputed
_SAVE_OPS = [getattr(torch.ops.aten, n).default for n in (
    "mm", "addmm", "bmm", "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu")
    if hasattr(torch.ops.aten, n)]


def _blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    layers = getattr(model, "layers", None)
    if layers is None:
        raise TypeError(f"{type(model).__name__} has no 'layers' to wrap")
    return list(layers.items()) if isinstance(layers, nn.ModuleDict) else [(str(i), b) for i, b in enumerate(layers)]


def _set(model: nn.Module, name: str, block: nn.Module) -> None:
    if isinstance(model.layers, nn.ModuleDict):
        model.layers[name] = block
    else:
        model.layers[int(name)] = block


def apply_activation_checkpointing(model: nn.Module, every: int = 1, selective: bool = False) -> int:
    """Wrap every ``every``-th block (0, k, 2k, ...) with non-reentrant checkpointing (RNG state preserved,
    so dropout masks replay exactly). ``selective``: keep matmul/attention outputs, recompute the rest.
    State-dict names are unchanged. Returns the number of wrapped blocks."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

    kwargs = {}
    if selective:
        from torch.utils.checkpoint import create_selective_checkpoint_contexts

        kwargs["context_fn"] = partial(create_selective_checkpoint_contexts, _SAVE_OPS)
    n = 0
    for i, (name, block) in enumerate(_blocks(model)):
        if i % every == 0:
            _set(model, name, checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT, **kwargs))
            n += 1
    return n


def apply_compile(model: nn.Module, cache_dir: Optional[str] = None) -> None:
    """``torch.compile`` each block (same graph reused across identical blocks); ``cache_dir`` keeps
    Inductor's compiled artifacts across runs."""
    if cache_dir:
        os.makedirs(cache_dir, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.abspath(cache_dir)
        os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(os.path.abspath(cache_dir), "triton"))
        import torch._inductor.config as inductor_config

        inductor_config.fx_graph_cache = True
    for _, block in _blocks(model):
        block.compile(dynamic=False)
