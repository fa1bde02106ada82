"""GPT-2-style decoder: learned positions, pre-LayerNorm, GELU MLP, biases, tied output head.

Also holds the biased multi-head attention and MLP that the BERT encoder reuses. Same forward/cache API as
``Llama`` so ``generate`` works unchanged.

Legend: B batch, T tokens, S key slots, D d_model, H heads, Dh head dim, V vocab.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import ModelConfig
from lmforge.models.common import (KVCache, attention, doc_causal_mask, fill_const_, fill_normal_, init_generator,
                                   linear_weights, pad_causal_mask)
from lmforge.models.losses import cross_entropy, fused_head_ok, linear_cross_entropy

ACTIVATIONS = {"gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu}


class BiasedAttention(nn.Module):
    """Multi-head attention with biases and no positional rotation (positions are added to embeddings)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.n_heads, self.head_dim, self.dropout = cfg.n_heads, d // cfg.n_heads, cfg.dropout
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x_BTD, mask: Optional[torch.Tensor], causal: bool, cache: Optional[KVCache] = None,
                layer_idx: int = 0) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        q_BHTD = self.wq(x_BTD).view(B, T, -1, self.head_dim).transpose(1, 2)
        k_BHTD = self.wk(x_BTD).view(B, T, -1, self.head_dim).transpose(1, 2)
        v_BHTD = self.wv(x_BTD).view(B, T, -1, self.head_dim).transpose(1, 2)
        if cache is not None:
            k_BHTD, v_BHTD = cache.update(layer_idx, k_BHTD, v_BHTD)
            causal = mask is None and T > 1
        out_BHTD = attention(q_BHTD, k_BHTD, v_BHTD, mask, causal, self.dropout if self.training else 0.0)
        return self.wo(out_BHTD.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, d_model: int, hidden: int, activation: str):
        super().__init__()
        self.fc = nn.Linear(d_model, hidden)
        self.proj = nn.Linear(hidden, d_model)
        self.act = ACTIVATIONS[activation]

    def forward(self, x):
        return self.proj(self.act(self.fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.attention_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attention = BiasedAttention(cfg)
        self.ffn_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.feed_forward = MLP(cfg.d_model, cfg.ffn_hidden or 4 * cfg.d_model, cfg.activation or "gelu_tanh")
        self.resid_dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def forward(self, x_BTD, mask=None, cache: Optional[KVCache] = None):
        h = self.attention(self.attention_norm(x_BTD), mask, True, cache, self.layer_idx)
        x_BTD = x_BTD + self.resid_dropout(h)
        return x_BTD + self.resid_dropout(self.feed_forward(self.ffn_norm(x_BTD)))


class GPT2(nn.Module):
    """Decoder-only LM with learned absolute positions. ``forward(tokens_BT, doc_ids_BT=None) -> logits``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("model.vocab_size is not set")
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embeddings = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.emb_dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.layers = nn.ModuleList(GPT2Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.output = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    @torch.no_grad()
    def init_weights(self, seed: Optional[int] = None) -> None:
        """N(0, init_std) weights (residual projections scaled by 1/sqrt(2·n_layers)), zero biases."""
        cfg = self.cfg
        if cfg.tie_embeddings and self.output.weight is not self.tok_embeddings.weight:
            self.output.weight = self.tok_embeddings.weight
        gen = init_generator(seed)
        std, out_std = cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.n_layers)
        fill_normal_(self.tok_embeddings.weight, std, gen)
        fill_normal_(self.pos_embeddings.weight, std / 2, gen)
        for layer in self.layers:
            a, f = layer.attention, layer.feed_forward
            for lin, s in ((a.wq, std), (a.wk, std), (a.wv, std), (a.wo, out_std), (f.fc, std), (f.proj, out_std)):
                fill_normal_(lin.weight, s, gen)
                fill_const_(lin.bias, 0.0)
            for norm in (layer.attention_norm, layer.ffn_norm):
                fill_const_(norm.weight, 1.0)
                fill_const_(norm.bias, 0.0)
        fill_const_(self.norm.weight, 1.0)
        fill_const_(self.norm.bias, 0.0)
        if not cfg.tie_embeddings:
            fill_normal_(self.output.weight, std, gen)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.tok_embeddings.weight.numel() + self.pos_embeddings.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        cfg = self.cfg
        return 6.0 * linear_weights(self) + 12.0 * cfg.n_layers * cfg.d_model * seq_len

    def new_cache(self, batch_size: int, max_len: int, device=None) -> KVCache:
        device = device if device is not None else self.tok_embeddings.weight.device
        return KVCache(batch_size, max_len, self.cfg.n_layers, device)

    def hidden_states(self, tokens_BT, doc_ids_BT=None, *, cache: Optional[KVCache] = None,
                      positions_BT: Optional[torch.Tensor] = None, pad_mask_BT: Optional[torch.Tensor] = None):
        B, T = tokens_BT.shape
        mask, start = None, 0
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
        if positions_BT is None:
            positions_BT = torch.arange(start, start + T, device=tokens_BT.device)[None]
        top = int(positions_BT.max()) + 1
        if top > self.cfg.max_seq_len:
            raise ValueError(f"position {top - 1} exceeds model.max_seq_len={self.cfg.max_seq_len}")
        x_BTD = self.emb_dropout(self.tok_embeddings(tokens_BT) + self.pos_embeddings(positions_BT))
        for layer in self.layers:
            x_BTD = layer(x_BTD, mask, cache)
        if cache is not None:
            cache.advance(T)
        return self.norm(x_BTD)

    def forward(self, tokens_BT, doc_ids_BT=None, **kw) -> torch.Tensor:
        return self.output(self.hidden_states(tokens_BT, doc_ids_BT, **kw)).float()

    def loss(self, tokens_BT: torch.Tensor, labels_BT: torch.Tensor, doc_ids_BT: Optional[torch.Tensor] = None,
             ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
        """Next-token cross-entropy (labels already shifted), "mean" over valid labels or "sum". Equals
        ``F.cross_entropy(model(tokens).flatten(0, 1), labels.flatten())`` without materialising all logits."""
        h_BTD = self.hidden_states(tokens_BT, doc_ids_BT)
        if not fused_head_ok(self.output):  # swapped or sharded head: plain path
            return cross_entropy(self.output(h_BTD).flatten(0, 1), labels_BT.flatten(), ignore_index, reduction)
        return linear_cross_entropy(h_BTD.flatten(0, 1), self.output.weight, labels_BT.flatten(), ignore_index,
                                    reduction=reduction)
