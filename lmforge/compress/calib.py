"""Calibration for the methods that look at activations (Wanda, 2:4, structured pruning, SmoothQuant): batches
from the source's own validation split and per-input-feature statistics of chosen linear layers.

Calibration tokens come from the *tail* of the validation split: decoders take the windows after those the
perplexity is measured on, so a score is not fitted to the scored batches; classifiers take the last
validation examples.
"""

from __future__ import annotations

import torch
from torch import nn


def calibration_batches(ctx, n: int) -> list[dict]:
    """``n`` batches from the tail of the validation split (decoders: windows; classifiers: examples)."""
    src = ctx.src
    if src.kind == "classifier":
        from lmforge.finetune.data import collate

        pad = src.tok.pad_id if src.tok.pad_id is not None else 0
        tail = src.data.val[-n * 16:]
        return [collate(tail[i:i + 16], pad) for i in range(0, len(tail), 16)]
    from lmforge.data.loader import SequentialEvalLoader, TokenShards

    shards = TokenShards(src.cfg.data.path, "val")
    seq = ctx.batches[0]["input_ids"].shape[1]
    every = list(SequentialEvalLoader(shards, seq, ctx.cfg.eval.batch_size))
    return every[-n:]


def calibration_note(kind: str, n: int) -> str:
    if kind == "lm":
        return (f"calibration: {n} batches from the tail of the validation split (disjoint from the scored "
                "batches when the split holds more than eval.batches + calib_batches batches)")
    return f"calibration: the last {n}×16 validation examples (accuracy is scored on all of them, these included)"


@torch.inference_mode()
def input_stats(model: nn.Module, layers: dict[str, nn.Module], batches: list[dict], kind: str,
                stat: str = "l2") -> dict[str, torch.Tensor]:
    """Per input feature of each layer over every calibration token (forward hooks on ``model``'s forward):
    ``l2``: ‖X_i‖₂ (Wanda, structured scores); ``absmax``: max |X_i| (SmoothQuant)."""
    acc = {n: torch.zeros(m.in_features, dtype=torch.float64) for n, m in layers.items()}

    def hook(name):
        def fn(_m, args, _out):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            if stat == "l2":
                acc[name] += (x * x).sum(0)
            else:
                acc[name] = torch.maximum(acc[name], x.abs().amax(0))
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    was = model.training
    try:
        model.eval()
        for b in batches:
            model(b["input_ids"]) if kind == "lm" else model(b["input_ids"], b["attention_mask"])
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return {n: (v.sqrt() if stat == "l2" else v).float() for n, v in acc.items()}
