"""Perplexity and bits-per-byte of a trained LM, scored honestly on documents longer than its context.

Legend: B windows per batch, T window length, V vocab.

Sliding window (``window`` W ≤ model.max_seq_len, ``stride`` S ≤ W): a document of tokens x_0..x_{N-1} (an
EOS is put in front when the tokenizer has one, so x_0 is scored too) is cut into windows starting at 0, S,
2S, ...; each window reads up to W tokens and predicts the next token at each position, but only targets not
scored by an earlier window count. Every target is scored exactly once, and every one after the first window
with at least W - S tokens of context (S = W: disjoint chunks, the cheapest and least fair).

    NLL      = Σ_targets -log p(x_t | x_{<t} within its window)          (nats)
    ppl      = exp(NLL / n_tokens)
    bpb      = NLL / (ln 2 · n_bytes)          n_bytes: UTF-8 bytes of the scored text (tokenizer-independent)

Standard errors are over documents' per-token losses (delta method for ppl), reported in the results JSON.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch

from lmforge.errors import ConfigError, DataError


def windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_scored): input ids[begin:end], targets ids[begin+1:end+1]; targets at positions
    ≥ first_scored count. Covers target positions 1..n_tokens-1 exactly once."""
    if not 1 <= stride <= window:
        raise ConfigError(f"stride {stride} must be in [1, window={window}]")
    out, next_target, begin = [], 1, 0
    while next_target < n_tokens:
        end = min(begin + window, n_tokens - 1)
        out.append((begin, end, next_target))
        next_target = end + 1
        begin += stride
    return out


@torch.no_grad()
def token_logprobs(model, ids: Sequence[int], window: int, stride: int, device, batch_size: int = 8) -> torch.Tensor:
    """log p of every token x_1..x_{N-1} of ``ids`` (float64, length N-1), windows batched."""
    ids_t = torch.tensor(list(ids), dtype=torch.long)
    out = torch.zeros(max(len(ids) - 1, 0), dtype=torch.float64)
    spans = windows(len(ids), window, stride)
    for i in range(0, len(spans), batch_size):
        chunk = spans[i:i + batch_size]
        T = max(e - b for b, e, _ in chunk)
        tokens_BT = torch.zeros(len(chunk), T, dtype=torch.long)
        for r, (b, e, _) in enumerate(chunk):
            tokens_BT[r, : e - b] = ids_t[b:e]
        logits_BTV = model(tokens_BT.to(device)).float()
        logp_BTV = torch.log_softmax(logits_BTV, dim=-1).double().cpu()
        for r, (b, e, first) in enumerate(chunk):
            targets = ids_t[b + 1:e + 1]
            lp = logp_BTV[r, : e - b].gather(1, targets[:, None])[:, 0]
            keep = torch.arange(b + 1, e + 1) >= first
            out[(torch.arange(b + 1, e + 1)[keep] - 1)] = lp[keep]
    return out


def score_documents(model, tok, texts: Iterable[str], window: int, stride: int, device="cpu",
                    batch_size: int = 8) -> dict:
    """Perplexity / bits-per-byte over documents (see the module doc)."""
    nll, n_tok, n_bytes, per_doc = 0.0, 0, 0, []
    for text in texts:
        if not text:
            continue
        ids = tok.encode(text)
        lead = [tok.eos_id] if tok.eos_id is not None else []
        full = lead + list(ids)
        if len(full) < 2:
            continue
        lp = token_logprobs(model, full, window, stride, device, batch_size)
        scored_bytes = len(text.encode("utf-8")) if lead else len(text.encode("utf-8")) - len(
            tok.decode(full[:1]).encode("utf-8"))
        d_nll = -float(lp.sum())
        nll, n_tok, n_bytes = nll + d_nll, n_tok + lp.numel(), n_bytes + max(scored_bytes, 1)
        per_doc.append((d_nll, lp.numel()))
    if n_tok == 0:
        raise DataError("no text to score (every document was empty)")
    loss = nll / n_tok
    se = _stderr(per_doc, loss)
    return {"documents": len(per_doc), "tokens": n_tok, "bytes": n_bytes, "loss": loss,
            "perplexity": math.exp(min(loss, 50.0)), "bits_per_byte": nll / (math.log(2) * n_bytes),
            "loss_stderr": se, "perplexity_stderr": math.exp(min(loss, 50.0)) * se,
            "bits_per_byte_stderr": se * n_tok / (math.log(2) * n_bytes), "window": window, "stride": stride}


def _stderr(per_doc: list[tuple[float, int]], mean: float) -> float:
    """Standard error of the token-weighted mean loss, treating documents as the independent units."""
    k = len(per_doc)
    if k < 2:
        return float("nan")
    total = sum(n for _, n in per_doc)
    w = [n / total for _, n in per_doc]
    dev = [(s / n - mean) for s, n in per_doc]
    return math.sqrt(k / (k - 1) * sum((wi * di) ** 2 for wi, di in zip(w, dev)))


def read_texts(files: list[str]) -> list[str]:
    out = []
    for f in files:
        p = Path(f)
        if not p.is_file():
            raise ConfigError(f"--text: file not found: {f}")
        try:
            out.append(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise DataError(f"{f}: not UTF-8 text (byte {e.start})") from None
    return out


def packed_texts(path: str, tok, split: str = "val", max_tokens: Optional[int] = None) -> list[str]:
    """A packed folder's split as documents (cut at EOS tokens), decoded back to text for byte counts."""
    import numpy as np

    from lmforge.data.loader import TokenShards

    try:
        shards = TokenShards(path, split)
    except KeyError:
        raise DataError(f"{path}: no '{split}' split in the packed data") from None
    n = len(shards) if max_tokens is None else min(len(shards), max_tokens)
    ids = shards.read(0, n).astype(np.int64)
    eos = tok.eos_id
    docs, start = [], 0
    if eos is not None:
        for i in np.flatnonzero(ids == eos).tolist() + [n]:
            if i > start:
                docs.append(tok.decode(ids[start:i].tolist()))
            start = i + 1
    else:
        docs = [tok.decode(ids.tolist())]
    return [d for d in docs if d]

