"""Apply parallelism (and activation checkpointing / compile) to a parallelism-free model from the outside.

``parallelize_model(model, pdims, cfg)`` applies, in this order (each step optional):

1. tensor parallel (DTensor ``parallelize_module``): wq/wk/wv/w1/w3 column-wise, wo/w2 row-wise; the
   attention module's head counts are divided by ``tp``. Embeddings, norms and the output head stay
   replicated across the tp group (their gradients are identical on every tp rank).
2. activation checkpointing (``training.activation_checkpointing``, ``ac_every``, ``ac_selective``;
   non-reentrant, RNG preserved; canonical FQNs are kept).
3. ``torch.compile`` per block (``training.compile``, ``compile_cache_dir``).
4. data parallel over the "dp" dims:
   - zero3: FSDP2 ``fully_shard`` per block then root, ``reshard_after_forward=True`` (params, grads and
     optimizer states sharded; params re-gathered in backward).
   - zero2: the same with ``reshard_after_forward=False`` (params stay gathered from forward to backward;
     grads and optimizer states sharded). FSDP2 always reduce-scatters gradients, so zero2 memory for
     gradients equals zero3's; the difference is the unsharded params held between forward and backward.
   - HSDP: zero2/zero3 with ``dp_replicate > 1`` shard inside a replica group and all-reduce across groups.
   - zero1: ``DistributedDataParallel`` (full params and grads on every rank) plus
     ``ZeroRedundancyOptimizer`` (each rank keeps optimizer state for ~1/dp of the parameters); call
     ``shard_optimizer`` on the optimizer the trainer builds.
   - ddp: ``DistributedDataParallel`` over the flattened "dp" group.
   ``cpu_offload`` → ``CPUOffloadPolicy``; ``param_dtype``/``reduce_dtype`` → ``MixedPrecisionPolicy``.

Pipeline parallel (``pp > 1``) splits the model first, see ``lmforge.distributed.pipeline``.
"""

from __future__ import annotations

import os
from functools import partial
from typing import Callable, Optional

import torch
import torch.nn as nn

from lmforge.config import ConfigError
from lmforge.distributed.mesh import ParallelDims

_HEAD_ATTRS = ("n_heads", "n_kv_heads", "n_local_heads", "n_local_kv_heads", "num_heads", "num_kv_heads")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# ops whose outputs selective checkpointing keeps (the expensive ones); everything else is recomputed
_SAVE_OPS = [getattr(torch.ops.aten, n).default for n in (
    "mm", "addmm", "bmm", "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu")
    if hasattr(torch.ops.aten, n)]

_BLOCK_LISTS = ("layers", "layer")  # lmforge models; transformers encoders (encoder.layer)


def _block_list(model: nn.Module) -> Optional[nn.Module]:
    """``model.layers``, else the shallowest submodule's ``layers`` / ``layer`` container, so a model wrapped
    from outside (a fine-tuning task model, peft-injected layers, a transformers encoder) is found too."""
    layers = getattr(model, "layers", None)
    if layers is not None:
        return layers
    queue = [model]
    while queue:
        nxt = []
        for mod in queue:
            for attr in _BLOCK_LISTS:
                found = getattr(mod, attr, None)
                if isinstance(found, (nn.ModuleList, nn.ModuleDict)):
                    return found
            nxt += list(mod.children())
        queue = nxt
    return None


def blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, block) pairs of the model's repeated blocks: ``model.layers`` (ModuleList or ModuleDict) or the
    first such container found breadth-first inside a wrapper; names are the container's keys."""
    layers = _block_list(model)
    if layers is None:
        raise TypeError(f"{type(model).__name__} has no 'layers' (nor a submodule with 'layers' / 'layer'); "
                        "parallelize_model expects the Llama layout")
    items = layers.items() if isinstance(layers, nn.ModuleDict) else ((str(i), b) for i, b in enumerate(layers))
    return [(n, b) for n, b in items]


def _set_block(model: nn.Module, name: str, block: nn.Module) -> None:
    layers = _block_list(model)  # the same container ``blocks`` found
    if isinstance(layers, nn.ModuleDict):
        layers[name] = block
    else:
        layers[int(name)] = block


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
    for i, (name, block) in enumerate(blocks(model)):
        if i % every == 0:
            _set_block(model, name, checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT, **kwargs))
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
    for _, block in blocks(model):
        block.compile(dynamic=False)


def apply_tp(model: nn.Module, tp_mesh) -> None:
    """Megatron-style TP on every block; head counts become per-rank."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    tp = tp_mesh.size()
    for name, block in blocks(model):
        attn = block.attention
        for attr in _HEAD_ATTRS:
            val = getattr(attn, attr, None)
            if isinstance(val, int):
                if val % tp:
                    raise ConfigError(f"distributed.tp={tp} must divide the attention head count "
                                      f"({attr}={val} in layers.{name}); pick tp dividing model.n_kv_heads")
                setattr(attn, attr, val // tp)
        ffn_hidden = block.feed_forward.w1.out_features
        if ffn_hidden % tp:
            raise ConfigError(f"distributed.tp={tp} must divide model.ffn_hidden={ffn_hidden}")
        plan = {
            "attention.wq": ColwiseParallel(), "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(), "attention.wo": RowwiseParallel(),
            "feed_forward.w1": ColwiseParallel(), "feed_forward.w3": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(),
        }
        parallelize_module(block, tp_mesh, plan)


def apply_fsdp(model: nn.Module, pdims: ParallelDims, dcfg, precision: str) -> None:
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mesh = pdims.mesh(("dp_replicate", "dp_shard")) if pdims.dp_replicate > 1 else pdims.mesh("dp_shard")
    reshard = dcfg.reshard_after_forward
    if reshard is None:
        reshard = dcfg.strategy == "zero3"
    param_dtype = dcfg.param_dtype or ("bfloat16" if precision == "bf16" else "float32")
    mp = MixedPrecisionPolicy(param_dtype=_DTYPES[param_dtype], reduce_dtype=_DTYPES[dcfg.reduce_dtype])
    offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if dcfg.cpu_offload else OffloadPolicy()
    kw = dict(mesh=mesh, mp_policy=mp, offload_policy=offload)
    block_list = blocks(model)
    for i, (_, block) in enumerate(block_list):
        # the last block's params are needed again right away in backward: never reshard them
        fully_shard(block, reshard_after_forward=reshard and i < len(block_list) - 1, **kw)
    fully_shard(model, reshard_after_forward=reshard, **kw)


def parallelize_model(model: nn.Module, pdims: ParallelDims, cfg,
                      init_fn: Optional[Callable[[nn.Module], None]] = None) -> nn.Module:
    """Apply (pipeline split →) TP → activation checkpointing → compile → data parallel. Returns the module
    to train: the same object, the ``DistributedDataParallel`` wrapper (ddp/zero1), or this rank's
    ``PipelineStageModule`` when ``pp > 1`` (then drive it with ``pipeline.build_schedule``).
    ``init_fn(module)`` materialises a meta-built model after sharding (before the DDP wrap, which
    broadcasts rank 0's weights)."""
    dcfg, tcfg = cfg.distributed, cfg.training
    if pdims.pp > 1:
        from lmforge.distributed.pipeline import split_for_pipeline

        if cfg.data.doc_mask:
            raise ConfigError("data.doc_mask=true is not supported with distributed.pp > 1")
        model = split_for_pipeline(model, pdims)
    if pdims.tp > 1:
        if dcfg.strategy in ("ddp", "zero1") and pdims.dp > 1:
            raise ConfigError(f"distributed.tp={pdims.tp} with distributed.strategy={dcfg.strategy} is not "
                              "supported (DDP cannot hold DTensor params); use zero2 or zero3")
        apply_tp(model, pdims.mesh("tp"))
    if tcfg.activation_checkpointing:
        apply_activation_checkpointing(model, every=tcfg.ac_every, selective=tcfg.ac_selective)
    if tcfg.compile:
        apply_compile(model, cache_dir=tcfg.compile_cache_dir)
    fsdp = pdims.dp > 1 and dcfg.strategy in ("zero2", "zero3")
    if fsdp:
        apply_fsdp(model, pdims, dcfg, tcfg.precision)
    if init_fn is not None:
        init_fn(model)
    if pdims.dp > 1:
        if not fsdp:
            from torch.nn.parallel import DistributedDataParallel as DDP

            dev = [pdims.device.index] if pdims.device.type == "cuda" else None
            model = DDP(model, device_ids=dev, process_group=pdims.group("dp"))
    elif dcfg.cpu_offload and pdims.is_distributed:
        raise ConfigError("distributed.cpu_offload=true needs data-parallel degree > 1 (FSDP2)")
    return model


def shard_optimizer(optimizer: torch.optim.Optimizer, pdims: ParallelDims, cfg) -> torch.optim.Optimizer:
    """zero1: rebuild ``optimizer`` as a ``ZeroRedundancyOptimizer`` over the dp group (same param groups
    and hyper-parameters); any other strategy returns it unchanged."""
    if cfg.distributed.strategy != "zero1" or pdims.dp <= 1:
        return optimizer
    from torch.distributed.optim import ZeroRedundancyOptimizer

    # per-rank partitions cannot keep the full groups' parameter-name lists
    groups = [{k: v for k, v in g.items() if k not in ("initial_lr", "param_names")} for g in optimizer.param_groups]
    first = groups[0]
    defaults = {k: v for k, v in first.items() if k not in ("params", "name")}
    zero = ZeroRedundancyOptimizer(first["params"], optimizer_class=type(optimizer),
                                   process_group=pdims.group("dp"), **defaults)
    zero.param_groups[0].update({k: v for k, v in first.items() if k == "name"})
    for g in groups[1:]:
        zero.add_param_group(g)
    return zero
