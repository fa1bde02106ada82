"""Llama-style decoder: RoPE, RMSNorm, SwiGLU, grouped-query attention, optional tied embeddings.

Module names follow torchtitan (tok_embeddings, layers.N.attention.wq, ..., norm, output). RoPE uses the
"rotate half" layout (as in HF transformers), so HF Llama checkpoints load without permuting wq/wk.

Legend: B batch, T tokens, S key slots, D d_model, H query heads, K kv heads, Dh head dim, F ffn hidden,
V vocab.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import ModelConfig
from lmforge.models.common import (KVCache, attention, doc_causal_mask, ffn_hidden_default, fill_const_,
                                   fill_normal_, init_generator, linear_weights, pad_causal_mask)
from lmforge.models.kernels import rms_norm, rope
from lmforge.models.losses import cross_entropy, fused_head_ok, linear_cross_entropy


def rope_tables(head_dim: int, max_len: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos [max_len, Dh] and sign-folded sin [max_len, Dh] (-sin on the first half, +sin on the second)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim))
    angles_TF = torch.arange(max_len, dtype=torch.float64, device=device)[:, None] * inv_freq[None, :]
    cos, sin = angles_TF.cos(), angles_TF.sin()
    return torch.cat([cos, cos], -1).float(), torch.cat([-sin, sin], -1).float()


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads or cfg.n_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.dropout = cfg.dropout
        self.wq = nn.Linear(cfg.d_model, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, cfg.d_model, bias=False)

    def forward(self, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: Optional[torch.Tensor],
                cache: Optional[KVCache] = None, layer_idx: int = 0) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        # a wq/wk/wv module may be swapped (LoRA, TP); use their outputs' real sizes
        q_BTHD = self.wq(x_BTD).view(B, T, -1, self.head_dim)
        k_BTKD = self.wk(x_BTD).view(B, T, -1, self.head_dim)
        v_BTKD = self.wv(x_BTD).view(B, T, -1, self.head_dim)
        q_BHTD = rope(q_BTHD, cos, sin).transpose(1, 2)
        k_BKTD = rope(k_BTKD, cos, sin).transpose(1, 2)
        v_BKTD = v_BTKD.transpose(1, 2)
        causal = True
        if cache is not None:
            k_BKTD, v_BKTD = cache.update(layer_idx, k_BKTD, v_BKTD)
            causal = mask is None and T > 1
        out_BHTD = attention(q_BHTD, k_BKTD, v_BKTD, mask, causal, self.dropout if self.training else 0.0)
        return self.wo(out_BHTD.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, hidden, bias=False)  # gate
        self.w3 = nn.Linear(d_model, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, d_model, bias=False)  # down

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x_BTD)) * self.w3(x_BTD))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dev = x.device.type
        # under autocast, cast once here rather than once per consuming Linear
        out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        return rms_norm(x, self.weight, self.eps, out_dtype)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg.d_model, cfg.ffn_hidden or ffn_hidden_default(cfg.d_model))
        self.attention_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.resid_dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def forward(self, x_BTD, cos, sin, mask=None, cache: Optional[KVCache] = None) -> torch.Tensor:
        h = self.attention(self.attention_norm(x_BTD), cos, sin, mask, cache, self.layer_idx)
        x_BTD = x_BTD + self.resid_dropout(h)
        return x_BTD + self.resid_dropout(self.feed_forward(self.ffn_norm(x_BTD)))


class Llama(nn.Module):
    """Decoder-only LM. ``forward(tokens_BT, doc_ids_BT=None) -> logits_BTV`` (float)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("model.vocab_size is not set")
        self.cfg = cfg
        self.head_dim = cfg.d_model // cfg.n_heads
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(TransformerBlock(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.output = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.emb_dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = rope_tables(self.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    # ------------------------------------------------------------------ init / bookkeeping
    @torch.no_grad()
    def init_weights(self, seed: Optional[int] = None) -> None:
        """Deterministic for a seed, independent of device and sharding. Works after meta + ``to_empty``."""
        cfg = self.cfg
        if cfg.tie_embeddings and self.output.weight is not self.tok_embeddings.weight:
            self.output.weight = self.tok_embeddings.weight  # to_empty() can break the tie
        cos, sin = rope_tables(self.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.rope_cos = cos.to(self.rope_cos.device)
        self.rope_sin = sin.to(self.rope_sin.device)
        gen = init_generator(seed)
        std, out_std = cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.n_layers)
        fill_normal_(self.tok_embeddings.weight, std, gen)
        for layer in self.layers:
            a, f = layer.attention, layer.feed_forward
            for lin, s in ((a.wq, std), (a.wk, std), (a.wv, std), (a.wo, out_std),
                           (f.w1, std), (f.w3, std), (f.w2, out_std)):
                fill_normal_(lin.weight, s, gen)
            fill_const_(layer.attention_norm.weight, 1.0)
            fill_const_(layer.ffn_norm.weight, 1.0)
        fill_const_(self.norm.weight, 1.0)
        if not cfg.tie_embeddings:
            fill_normal_(self.output.weight, std, gen)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # tied weights counted once
        if exclude_embeddings:
            n -= self.tok_embeddings.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training (fwd+bwd) FLOPs per token: 6·(matmul weights, output head included) + 12·L·H·Dh·T."""
        cfg = self.cfg
        return 6.0 * linear_weights(self) + 12.0 * cfg.n_layers * cfg.n_heads * self.head_dim * seq_len

    def new_cache(self, batch_size: int, max_len: int, device=None) -> KVCache:
        device = device if device is not None else self.tok_embeddings.weight.device
        return KVCache(batch_size, max_len, self.cfg.n_layers, device)

    # ------------------------------------------------------------------ forward
    def _rope(self, T: int, positions_BT: Optional[torch.Tensor], start: int) -> tuple[torch.Tensor, torch.Tensor]:
        if positions_BT is not None:
            top = int(positions_BT.max()) + 1
            if top > self.rope_cos.shape[0]:
                raise ValueError(f"position {top - 1} exceeds model.max_seq_len={self.cfg.max_seq_len}")
            return self.rope_cos[positions_BT][:, :, None], self.rope_sin[positions_BT][:, :, None]
        if start + T > self.rope_cos.shape[0]:
            raise ValueError(f"sequence of {start + T} tokens exceeds model.max_seq_len={self.cfg.max_seq_len}")
        return self.rope_cos[start:start + T, None], self.rope_sin[start:start + T, None]

    def hidden_states(self, tokens_BT: torch.Tensor, doc_ids_BT: Optional[torch.Tensor] = None, *,
                      cache: Optional[KVCache] = None, positions_BT: Optional[torch.Tensor] = None,
                      pad_mask_BT: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Final-norm hidden states [B, T, D]. With ``cache``: incremental decoding (positions default to
        the cache offset; ``pad_mask_BT`` marks real tokens for left-padded batches)."""
        B, T = tokens_BT.shape
        mask = None
        start = 0
        if cache is not None:
            if doc_ids_BT is not None:
                raise ValueError("doc_ids_BT cannot be combined with a KV cache")
            start = cache.pos
            cache.begin(T, pad_mask_BT)
            mask = cache.attn_mask(T)
        elif doc_ids_BT is not None:
            if doc_ids_BT.shape != tokens_BT.shape:
                raise ValueError(f"doc_ids_BT shape {tuple(doc_ids_BT.shape)} != tokens shape {(B, T)}")
            mask = doc_causal_mask(doc_ids_BT)
        if cache is None and pad_mask_BT is not None:
            mask = pad_causal_mask(pad_mask_BT, doc_ids_BT)
        cos, sin = self._rope(T, positions_BT, start)
        dev = tokens_BT.device.type
        if torch.is_autocast_enabled(dev):
            cos, sin = cos.to(torch.get_autocast_dtype(dev)), sin.to(torch.get_autocast_dtype(dev))
        x_BTD = self.emb_dropout(self.tok_embeddings(tokens_BT))
        for layer in self.layers:
            x_BTD = layer(x_BTD, cos, sin, mask, cache)
        if cache is not None:
            cache.advance(T)
        return self.norm(x_BTD)

    def forward(self, tokens_BT: torch.Tensor, doc_ids_BT: Optional[torch.Tensor] = None, **kw) -> torch.Tensor:
        h_BTD = self.hidden_states(tokens_BT, doc_ids_BT, **kw)
        return self.output(h_BTD).float()

    def loss(self, tokens_BT: torch.Tensor, labels_BT: torch.Tensor, doc_ids_BT: Optional[torch.Tensor] = None,
             ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
        """Next-token cross-entropy (labels already shifted), "mean" over valid labels or "sum". Equals
        ``F.cross_entropy(model(tokens).flatten(0, 1), labels.flatten())`` without materialising all logits."""
        h_BTD = self.hidden_states(tokens_BT, doc_ids_BT)
        if not fused_head_ok(self.output):  # swapped or sharded head: plain path
            return cross_entropy(self.output(h_BTD).flatten(0, 1), labels_BT.flatten(), ignore_index, reduction)
        return linear_cross_entropy(h_BTD.flatten(0, 1), self.output.weight, labels_BT.flatten(), ignore_index,
                                    reduction=reduction)
