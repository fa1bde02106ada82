"""Llama-style decoder: RoPE, RMSNorm, SwiGLU, grouped-query attention, optional tied embeddings. The body
(embeddings → blocks → norm → head, masks, cache, loss, init order) is ``decoder.Decoder``.

Module names follow torchtitan (tok_embeddings, layers.N.attention.wq, ..., norm, output). RoPE uses the
"rotate half" layout (as in HF transformers), so HF Llama checkpoints load without permuting wq/wk.

Legend: B batch, T tokens, S key slots, D d_model, H query heads, K kv heads, Dh head dim, F ffn hidden,
V vocab.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import ModelConfig
from lmforge.models.common import KVCache, SelfAttention, ffn_hidden_default
from lmforge.models.decoder import Decoder, PreNormBlock
from lmforge.models.kernels import rms_norm, rope


def rope_tables(head_dim: int, max_len: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos [max_len, Dh] and sign-folded sin [max_len, Dh] (-sin on the first half, +sin on the second)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim))
    angles_TF = torch.arange(max_len, dtype=torch.float64, device=device)[:, None] * inv_freq[None, :]
    cos, sin = angles_TF.cos(), angles_TF.sin()
    return torch.cat([cos, cos], -1).float(), torch.cat([-sin, sin], -1).float()


class Attention(SelfAttention):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads or cfg.n_heads
        self.head_dim = cfg.dims_per_head
        self.dropout = cfg.dropout
        self.wq = nn.Linear(cfg.d_model, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, cfg.d_model, bias=False)

    def forward(self, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: Optional[torch.Tensor],
                cache: Optional[KVCache] = None, layer_idx: int = 0) -> torch.Tensor:
        q_BTHD, k_BTKD, v_BTKD = self.project(x_BTD)
        q_BHTD = rope(q_BTHD, cos, sin).transpose(1, 2)
        k_BKTD = rope(k_BTKD, cos, sin).transpose(1, 2)
        return self.attend(q_BHTD, k_BKTD, v_BTKD.transpose(1, 2), mask, cache, layer_idx)


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


class TransformerBlock(PreNormBlock):
    """``forward(x_BTD, cos, sin, mask=None, cache=None)``."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__(layer_idx, cfg.dropout)
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg.d_model, cfg.ffn_hidden or ffn_hidden_default(cfg.d_model))
        self.attention_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)

    def init_plan(self, std: float, out_std: float) -> list[tuple[nn.Linear, float]]:
        a, f = self.attention, self.feed_forward
        return [(a.wq, std), (a.wk, std), (a.wv, std), (a.wo, out_std), (f.w1, std), (f.w3, std), (f.w2, out_std)]


class Llama(Decoder):
    """Decoder-only LM with rotary positions (tables ``rope_cos`` / ``rope_sin``, not saved)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, TransformerBlock, lambda: RMSNorm(cfg.d_model, cfg.norm_eps))

    def _build_positions(self) -> None:
        self.head_dim = self.cfg.dims_per_head
        cos, sin = rope_tables(self.head_dim, self.cfg.max_seq_len, self.cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def _init_positions(self, std: float, gen: Optional[torch.Generator]) -> None:
        cos, sin = rope_tables(self.head_dim, self.cfg.max_seq_len, self.cfg.rope_theta)
        self.rope_cos = cos.to(self.rope_cos.device)
        self.rope_sin = sin.to(self.rope_sin.device)

    def embed(self, tokens_BT: torch.Tensor, positions_BT: Optional[torch.Tensor], start: int
              ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Token embeddings and the RoPE tables of the positions: cos, sin [T, 1, Dh] or [B, T, 1, Dh]."""
        T = tokens_BT.shape[1]
        self._check_positions(positions_BT, start, T)
        if positions_BT is not None:
            cos, sin = self.rope_cos[positions_BT][:, :, None], self.rope_sin[positions_BT][:, :, None]
        else:
            cos, sin = self.rope_cos[start:start + T, None], self.rope_sin[start:start + T, None]
        dev = tokens_BT.device.type
        if torch.is_autocast_enabled(dev):
            cos, sin = cos.to(torch.get_autocast_dtype(dev)), sin.to(torch.get_autocast_dtype(dev))
        return self.emb_dropout(self.tok_embeddings(tokens_BT)), (cos, sin)
