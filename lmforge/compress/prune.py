"""``lmforge compress prune``: unstructured (magnitude, Wanda), 2:4 semi-structured, and structured FFN
channels (``structured.py``), with a per-layer sparsity report.

Scores, for the weight W [O, I] of a block's ``nn.Linear`` (the head and embeddings are never pruned):
- magnitude: |W_oi|; the ``s``·O·I smallest of the layer are zeroed.
- Wanda (Sun et al. 2023): |W_oi| · ‖X_i‖₂, X the layer's inputs over the calibration tokens; in each output row
  the ``s``·I lowest are zeroed (the paper's per-output comparison group).
- 2:4: in every group of 4 consecutive inputs of a row the 2 lowest Wanda scores are zeroed (50% exactly).
Calibration tokens come from the run's own validation split (``calib.py``).

Unstructured and 2:4 zeros keep the dense shapes: no kernel on this CPU skips them (torch's semi-structured
sparse kernels are CUDA-only), so speed is unchanged and the report says so.
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.errors import ConfigError

SKIP = ("output", "head", "pooler", "mlm_head", "nsp_head")


def prunable(model: nn.Module) -> dict[str, nn.Linear]:
    """The block linears: every ``nn.Linear`` inside ``layers`` (not the head, pooler or embeddings)."""
    return {n: m for n, m in model.named_modules()
            if type(m) is nn.Linear and ".layers." in f".{n}" and not any(s in n for s in SKIP)}


def keep_mask(weight_OI: torch.Tensor, method: str, sparsity: float, norm_I=None) -> torch.Tensor:
    """True where the weight stays (module doc)."""
    w = weight_OI.detach().abs().float()
    if method == "magnitude":
        k = int(sparsity * w.numel())
        if k == 0:
            return torch.ones_like(w, dtype=torch.bool)
        cut = w.flatten().kthvalue(k).values
        return w > cut
    score = w * norm_I[None, :]
    O, I = score.shape
    if method == "wanda":
        k = int(sparsity * I)
        drop = score.argsort(dim=1)[:, :k]
        return torch.ones_like(score, dtype=torch.bool).scatter_(1, drop, False)
    if method == "2:4":
        if I % 4:
            raise ConfigError(f"prune.method=2:4 needs in-features divisible by 4 (a layer has {I})")
        groups = score.reshape(O, I // 4, 4)
        drop = groups.argsort(dim=2)[:, :, :2]
        return torch.ones_like(groups, dtype=torch.bool).scatter_(2, drop, False).reshape(O, I)
    raise ConfigError(f"prune.method={method!r} is not an unstructured method")


def sparsity_report(model: nn.Module) -> dict[str, float]:
    """Share of exact zeros in each block linear's weight, and the overall share over them."""
    layers = prunable(model)
    rep = {n: float((m.weight == 0).float().mean()) for n, m in layers.items()}
    total = sum(m.weight.numel() for m in layers.values())
    rep["(all block linears)"] = sum(float((m.weight == 0).sum()) for m in layers.values()) / max(total, 1)
    return rep


def prune(ctx):
    from lmforge.compress.run import Result

    from lmforge.compress.calib import calibration_batches, calibration_note, input_stats

    pc, src = ctx.cfg.prune, ctx.src
    if pc.method == "structured":
        from lmforge.compress.structured import structured

        return structured(ctx)
    model = src.copy_model()
    lm = model if src.kind == "lm" else model.backbone.model
    layers = prunable(lm)
    if not layers:
        raise ConfigError(f"prune: no block linear layers found in {src.path}")
    norms = {}
    if pc.method in ("wanda", "2:4"):
        norms = input_stats(model, layers, calibration_batches(ctx, pc.calib_batches), src.kind)
    sparsity = 0.5 if pc.method == "2:4" else pc.sparsity
    with torch.no_grad():
        for name, lin in layers.items():
            lin.weight.mul_(keep_mask(lin.weight, pc.method, sparsity, norms.get(name)))
    rep = sparsity_report(lm)
    step = {"method": "prune", "prune": pc.method, "sparsity": sparsity, "calib_batches": pc.calib_batches
            if norms else 0, "layers_report": rep}
    notes = [f"{pc.method}: {rep['(all block linears)']:.1%} of the block linear weights are zero; dense storage "
             "and dense kernels (no sparse kernel on this device), so size and speed are unchanged by design"]
    if pc.method == "2:4":
        notes.append("2:4 pattern on every block linear (Wanda scores); torch's semi-structured sparse kernels "
                     "(to_sparse_semi_structured) need CUDA, so the CPU numbers here are dense")
    if norms:
        notes.append(calibration_note(src.kind, pc.calib_batches))
    return Result(model, step, notes)
