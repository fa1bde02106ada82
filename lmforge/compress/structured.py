"""Structured pruning: whole FFN channels and attention heads removed, the matrices really shrunk, then a
recovery fine-tune.

Channel score (per layer, f an FFN hidden channel): s_f = ‖h_f‖₂ · ‖W_down[:, f]‖₂, where h is the FFN's hidden
activation (the input of its down projection: silu(w1 x) ⊙ w3 x for Llama, act(fc x) for GPT-2 / BERT) over the
calibration tokens: removing channel f deletes exactly the term W_down[:, f] h_f from the block's output. Every
layer keeps the same k = F − round(F · prune.ffn_fraction) highest-scoring channels, so the result is an
ordinary model whose config says ``ffn_hidden: k`` and whose checkpoint loads as any run. Heads likewise:
s_h = ‖o_h‖₂ · ‖W_o[:, h]‖_F with o_h head h's attention output (the input of ``wo``); every layer keeps the
same number (whole key/value groups under GQA) and the config says ``n_heads``, ``head_dim``.

The recovery fine-tune (``prune.recover_steps``) goes through the one training loop (``trainjobs``).

Legend: D d_model, F FFN hidden, k kept channels.
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.errors import ConfigError


def ffn_parts(block: nn.Module) -> tuple[list[nn.Linear], nn.Linear]:
    """(the projections producing the hidden channels, the down projection) of a block's FFN."""
    ff = block.feed_forward
    if hasattr(ff, "w1"):
        return [ff.w1, ff.w3], ff.w2
    if hasattr(ff, "fc"):
        return [ff.fc], ff.proj
    raise ConfigError(f"unknown FFN module {type(ff).__name__}: structured pruning and SmoothQuant know Llama's "
                      "(w1, w2, w3) and GPT-2 / BERT's (fc, proj)")


def _shrunk(lin: nn.Linear, keep: torch.Tensor, dim: int) -> nn.Linear:
    out_f, in_f = lin.weight.shape
    new = nn.Linear(in_f if dim == 0 else len(keep), len(keep) if dim == 0 else out_f, bias=lin.bias is not None)
    with torch.no_grad():
        new.weight.copy_(lin.weight.index_select(dim, keep))
        if lin.bias is not None:
            new.bias.copy_(lin.bias[keep] if dim == 0 else lin.bias)
    return new


def shrink_ffn(lm: nn.Module, norms: dict[int, torch.Tensor], fraction: float) -> tuple[int, int]:
    """Remove the lowest-scoring channels of every layer in place; returns (F, k). ``norms[i]`` = ‖h_f‖₂ of
    layer i."""
    blocks = list(lm.layers)
    F_ = ffn_parts(blocks[0])[1].in_features
    k = F_ - round(F_ * fraction)
    if k < 1:
        raise ConfigError(f"prune.ffn_fraction={fraction} removes every FFN channel ({F_} per layer)")
    for i, block in enumerate(blocks):
        ups, down = ffn_parts(block)
        score_F = norms[i] * down.weight.detach().float().norm(dim=0)
        keep = score_F.topk(k).indices.sort().values
        ff = block.feed_forward
        for lin in ups:
            setattr(ff, _attr(ff, lin), _shrunk(lin, keep, 0))
        setattr(ff, _attr(ff, down), _shrunk(down, keep, 1))
    lm.cfg = lm.cfg.model_copy(update={"ffn_hidden": k})
    return F_, k


def shrink_heads(lm: nn.Module, norms: dict[int, torch.Tensor], fraction: float) -> tuple[int, int]:
    """Remove the lowest-scoring attention heads of every layer in place (whole key/value groups under GQA, so
    every kept query head keeps its key/value head); returns (H, kept H). ``norms[i]``: ‖x‖₂ per input feature
    of layer i's output projection ``wo``, i.e. per (head, dim) of the attention output."""
    cfg = lm.cfg
    H, K, Dh = cfg.n_heads, cfg.n_kv_heads or cfg.n_heads, cfg.dims_per_head
    rep, keep_groups = H // K, K - round(K * fraction)
    if keep_groups < 1:
        raise ConfigError(f"prune.heads_fraction={fraction} removes every attention head ({H} per layer, "
                          f"{K} key/value groups)")
    for i, block in enumerate(lm.layers):
        att = block.attention
        wo_DHd = att.wo.weight.detach().float().reshape(-1, H, Dh)
        score_H = norms[i].reshape(H, Dh).norm(dim=1) * wo_DHd.norm(dim=(0, 2))
        groups = score_H.reshape(K, rep).sum(1).topk(keep_groups).indices.sort().values
        heads = (groups[:, None] * rep + torch.arange(rep)).flatten()
        q_rows = (heads[:, None] * Dh + torch.arange(Dh)).flatten()
        kv_rows = (groups[:, None] * Dh + torch.arange(Dh)).flatten() if K != H else q_rows
        att.wq, att.wk, att.wv = _shrunk(att.wq, q_rows, 0), _shrunk(att.wk, kv_rows, 0), _shrunk(att.wv, kv_rows, 0)
        att.wo = _shrunk(att.wo, q_rows, 1)
        att.n_heads = len(heads)
        if hasattr(att, "n_kv_heads"):
            att.n_kv_heads = len(groups)
    kv = None if cfg.n_kv_heads is None else keep_groups
    lm.cfg = cfg.model_copy(update={"n_heads": keep_groups * rep, "n_kv_heads": kv, "head_dim": Dh})
    return H, keep_groups * rep


def _attr(owner: nn.Module, child: nn.Module) -> str:
    return next(n for n, m in owner.named_children() if m is child)


def structured(ctx):
    from lmforge.compress.calib import calibration_batches, calibration_note, input_stats
    from lmforge.compress.run import Result

    pc, src = ctx.cfg.prune, ctx.src
    if pc.ffn_fraction <= 0 and pc.heads_fraction <= 0:
        raise ConfigError("prune.ffn_fraction=0 and prune.heads_fraction=0 remove nothing; give a share in (0, 1)")
    model = src.copy_model()
    lm = model if src.kind == "lm" else model.backbone.model
    taps = {f"{i}.down": ffn_parts(b)[1] for i, b in enumerate(lm.layers)}
    taps.update({f"{i}.wo": b.attention.wo for i, b in enumerate(lm.layers)})
    norms = input_stats(model, taps, calibration_batches(ctx, pc.calib_batches), src.kind)
    n = len(lm.layers)
    step = {"method": "prune", "prune": "structured", "ffn_fraction": pc.ffn_fraction,
            "heads_fraction": pc.heads_fraction, "recover_steps": pc.recover_steps}
    notes = []
    if pc.ffn_fraction > 0:
        F_, k = shrink_ffn(lm, {i: norms[f"{i}.down"] for i in range(n)}, pc.ffn_fraction)
        step["ffn_hidden"] = [F_, k]
        notes.append(f"FFN channels {F_} → {k} per layer (score ‖h_f‖·‖W_down[:, f]‖); config ffn_hidden: {k}")
    if pc.heads_fraction > 0:
        H, kh = shrink_heads(lm, {i: norms[f"{i}.wo"] for i in range(n)}, pc.heads_fraction)
        step["n_heads"] = [H, kh]
        notes.append(f"attention heads {H} → {kh} per layer (score ‖o_h‖·‖W_o[:, h]‖, o_h the head's output); "
                     f"config n_heads: {kh}, head_dim: {lm.cfg.head_dim}")
    notes.append(calibration_note(src.kind, pc.calib_batches))
    extra = {}
    if pc.recover_steps:
        from lmforge.compress.trainjobs import done, train_classifier, train_lm, work_dir

        extra["pruned, no recovery"] = (_frozen(model), None, None)
        ctx.cfg.train.steps = pc.recover_steps
        train = train_lm if src.kind == "lm" else train_classifier
        model, summary = train(ctx, lm if src.kind == "lm" else model, work_dir(ctx, "recover"))
        done(ctx)
        step["recovery"] = _summary(summary)
        notes.append(f"recovery: {pc.recover_steps} steps through the training loop (lr {ctx.cfg.train.lr:g}, "
                     f"batch {ctx.cfg.train.batch_size}), stop reason {summary.get('stop_reason')}")
    return Result(model, step, notes, extra=extra)


def _frozen(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model).eval()


def _summary(s: dict) -> dict:
    keep = ("stop_reason", "steps", "val_loss", "val_ppl", "elapsed_s", "best_value", "loop_seconds")
    return {k: s[k] for k in keep if k in s and isinstance(s[k], (int, float, str))}
