"""One optimizer step's pieces: gradient accumulation with exact token normalisation, the global grad norm
(with clipping), and evaluation.

Legend: B micro-batch size, T sequence length, V vocab.

Loss normalisation: every micro-batch contributes ``sum of its token CE / N`` where N is the number of valid
(label != -100) target tokens over *all* micro-batches of the step (and, in data parallel, all ranks), so
k micro-batches of size b give exactly the gradient of one batch of size k·b, even when micro-batches hold
different numbers of valid tokens.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -100


def autocast_ctx(device: torch.device, precision: str):
    """bf16/fp16 autocast for the forward pass; fp32 and pure-bf16 params need none."""
    if precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(device_type=device.type, dtype=dtype)
    return contextlib.nullcontext()


def count_valid_tokens(micro_batches: list[dict]) -> int:
    """Valid targets in CPU-resident batches (no device sync)."""
    return int(sum(int((mb["labels"] != IGNORE).sum()) for mb in micro_batches))


def _fused_loss_ok(model: nn.Module) -> bool:
    """A decoder's own ``loss`` (fused head + cross-entropy) is used on an unwrapped model only: DDP and
    FSDP2 run their hooks through ``forward``, which ``loss`` would bypass."""
    from torch.distributed.fsdp import FSDPModule

    return callable(getattr(model, "loss", None)) and getattr(getattr(model, "cfg", None), "arch", None) in (
        "llama", "gpt2") and not isinstance(model, (FSDPModule, nn.parallel.DistributedDataParallel))


def micro_loss_sum(model: nn.Module, batch: dict, device: torch.device) -> torch.Tensor:
    """Summed next-token CE over the micro-batch's valid targets (fp32)."""
    tokens_BT = batch["input_ids"].to(device, non_blocking=True)
    labels_BT = batch["labels"].to(device, non_blocking=True)
    doc_ids_BT = batch.get("doc_ids")
    if doc_ids_BT is not None:
        doc_ids_BT = doc_ids_BT.to(device, non_blocking=True)
    if _fused_loss_ok(model):  # never materialises the [B·T, V] logits
        return model.loss(tokens_BT, labels_BT, doc_ids_BT, ignore_index=IGNORE, reduction="sum")
    logits_BTV = model(tokens_BT, doc_ids_BT) if doc_ids_BT is not None else model(tokens_BT)
    return F.cross_entropy(logits_BTV.flatten(0, 1).float(), labels_BT.flatten(), ignore_index=IGNORE,
                           reduction="sum")


def accumulate_gradients(model: nn.Module, micro_batches: list[dict], device: torch.device, *,
                         total_tokens: Optional[int] = None, precision: str = "fp32", loss_scale: float = 1.0,
                         sync_ctx: Optional[Callable[[bool], contextlib.AbstractContextManager]] = None
                         ) -> torch.Tensor:
    """Backward over all micro-batches (grads accumulate into ``.grad``). Returns the summed token loss
    (device tensor, unscaled, no host sync). ``total_tokens`` defaults to this process's valid targets;
    ``sync_ctx(is_last)`` wraps each micro-step (DDP ``no_sync`` / FSDP gradient-sync control)."""
    n = count_valid_tokens(micro_batches) if total_tokens is None else total_tokens
    denom = max(n, 1)
    loss_sum = torch.zeros((), device=device, dtype=torch.float32)
    for i, mb in enumerate(micro_batches):
        is_last = i == len(micro_batches) - 1
        with (sync_ctx(is_last) if sync_ctx else contextlib.nullcontext()):
            with autocast_ctx(device, precision):
                ce = micro_loss_sum(model, mb, device)
            (ce * (loss_scale / denom)).backward()
        loss_sum += ce.detach()
    return loss_sum


def grad_norm_and_clip(params: Iterable[torch.Tensor], max_norm: Optional[float]) -> torch.Tensor:
    """Global L2 norm of all grads (device tensor); grads scaled in place to ``max_norm`` when set."""
    with_grad = [p for p in params if p.grad is not None]
    if not with_grad:
        return torch.zeros(())
    norm = torch.nn.utils.get_total_norm([p.grad for p in with_grad], norm_type=2.0, foreach=True)
    if max_norm is not None:  # takes the parameters (it scales their .grad), not the grads themselves
        torch.nn.utils.clip_grads_with_norm_(with_grad, max_norm, norm, foreach=True)
    return norm


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[dict], device: torch.device, precision: str = "fp32",
             reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> dict:
    """Token-weighted mean CE and perplexity over ``batches``. ``reduce`` sums [loss, tokens] across ranks."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    try:
        for batch in batches:
            with autocast_ctx(device, precision):
                ce = micro_loss_sum(model, batch, device)
            totals[0] += ce.double()
            totals[1] += float(count_valid_tokens([batch]))
    finally:
        model.train(was_training)
    if reduce is not None:
        totals = reduce(totals)
    loss_sum, ntok = totals.tolist()
    if ntok == 0:
        return {}
    loss = loss_sum / ntok
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": int(ntok)}
