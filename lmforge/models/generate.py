"""Batched autoregressive sampling with a KV cache.

Prompts of different lengths are left-padded; each row gets its own positions and a padding mask, so a
row's output does not depend on the other rows in the batch. A model is usable here when it provides
``new_cache(batch_size, max_len)`` and ``forward(tokens_BT, cache=, positions_BT=, pad_mask_BT=)``.

Legend: B batch, T tokens, V vocab.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch


def _check_args(prompt_ids, max_new_tokens, temperature, top_k, top_p, repetition_penalty) -> None:
    if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise ValueError("generate: every prompt needs at least one token")
    if max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"generate: temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"generate: top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"generate: top_p must be in (0, 1] or None, got {top_p}")
    if repetition_penalty <= 0:
        raise ValueError(f"generate: repetition_penalty must be > 0, got {repetition_penalty}")


def apply_repetition_penalty(logits_BV: torch.Tensor, seen_BV: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style: seen tokens' positive logits are divided by ``penalty``, negative ones multiplied."""
    penalised = torch.where(logits_BV > 0, logits_BV / penalty, logits_BV * penalty)
    return torch.where(seen_BV, penalised, logits_BV)


def filter_logits(logits_BV: torch.Tensor, top_k: Optional[int], top_p: Optional[float]) -> torch.Tensor:
    """Set logits outside the top-k / nucleus (top-p) set to -inf; the most likely token always stays."""
    if top_k is not None and top_k < logits_BV.shape[-1]:
        kth_B1 = torch.topk(logits_BV, top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_BV, idx_BV = torch.sort(logits_BV, dim=-1, descending=True)
        cum_BV = sorted_BV.softmax(-1).cumsum(-1)
        drop_BV = (cum_BV - sorted_BV.softmax(-1)) >= top_p  # mass before this token already reaches top_p
        drop_BV[:, 0] = False
        logits_BV = logits_BV.masked_fill(drop_BV.scatter(-1, idx_BV, drop_BV), float("-inf"))
    return logits_BV


@torch.no_grad()
def generate(model, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, temperature: float = 1.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None, repetition_penalty: float = 1.0,
             eos_id: Optional[int] = None, seed: Optional[int] = None,
             stop_ids: Optional[Sequence[int]] = None, pad_id: int = 0) -> list[list[int]]:
    """Sample up to ``max_new_tokens`` per prompt; returns the new tokens only. A row stops after emitting
    ``eos_id`` or any of ``stop_ids`` (that token is included). ``temperature=0`` is greedy decoding."""
    _check_args(prompt_ids, max_new_tokens, temperature, top_k, top_p, repetition_penalty)
    if max_new_tokens == 0:
        return [[] for _ in prompt_ids]
    was_training = model.training
    model.eval()
    try:
        return _generate(model, prompt_ids, max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                         eos_id, seed, stop_ids, pad_id)
    finally:
        model.train(was_training)


def _generate(model, prompt_ids, max_new_tokens, temperature, top_k, top_p, repetition_penalty, eos_id, seed,
              stop_ids, pad_id) -> list[list[int]]:
    device = next(model.parameters()).device
    B = len(prompt_ids)
    L = max(len(p) for p in prompt_ids)
    tokens_BT = torch.full((B, L), pad_id, dtype=torch.long, device=device)
    pad_mask_BT = torch.zeros(B, L, dtype=torch.bool, device=device)
    for i, p in enumerate(prompt_ids):
        tokens_BT[i, L - len(p):] = torch.tensor(list(p), dtype=torch.long, device=device)
        pad_mask_BT[i, L - len(p):] = True
    padded = not bool(pad_mask_BT.all())
    positions_BT = (pad_mask_BT.long().cumsum(-1) - 1).clamp(min=0)
    next_pos_B = positions_BT[:, -1] + 1

    stops = set(stop_ids or [])
    if eos_id is not None:
        stops.add(eos_id)
    stop_t = torch.tensor(sorted(stops), dtype=torch.long, device=device) if stops else None
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    V = None
    seen_BV = None

    cache = model.new_cache(B, L + max_new_tokens, device=device)
    logits_BTV = model(tokens_BT, cache=cache, positions_BT=positions_BT if padded else None,
                       pad_mask_BT=pad_mask_BT if padded else None)
    logits_BV = logits_BTV[:, -1].float()
    if repetition_penalty != 1.0:
        V = logits_BV.shape[-1]
        seen_BV = torch.zeros(B, V, dtype=torch.bool, device=device)
        seen_BV.scatter_(1, tokens_BT, pad_mask_BT)

    out_BN = torch.empty(B, max_new_tokens, dtype=torch.long, device=device)
    done_B = torch.zeros(B, dtype=torch.bool, device=device)
    n = 0
    for n in range(1, max_new_tokens + 1):
        if seen_BV is not None:
            logits_BV = apply_repetition_penalty(logits_BV, seen_BV, repetition_penalty)
        if temperature == 0 or top_k == 1:
            next_B = logits_BV.argmax(-1)
        else:
            probs_BV = filter_logits(logits_BV / temperature, top_k, top_p).softmax(-1)
            next_B = torch.multinomial(probs_BV, 1, generator=gen).squeeze(1)
        next_B = torch.where(done_B, torch.full_like(next_B, pad_id), next_B)
        out_BN[:, n - 1] = next_B
        if seen_BV is not None:
            seen_BV.scatter_(1, next_B[:, None], ~done_B[:, None])
        if stop_t is not None:
            done_B = done_B | torch.isin(next_B, stop_t)
            if bool(done_B.all()):
                break
        if n == max_new_tokens:
            break
        logits_BTV = model(next_B[:, None], cache=cache, positions_BT=next_pos_B[:, None] if padded else None)
        logits_BV = logits_BTV[:, -1].float()
        next_pos_B = next_pos_B + 1

    result = []
    for row in out_BN[:, :n].tolist():
        kept = []
        for t in row:
            kept.append(t)
            if t in stops:
                break
        result.append(kept)
    return result
