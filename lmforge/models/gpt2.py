"""GPT-2-style decoder: learned positions, pre-LayerNorm, GELU MLP, biases, tied output head.

The body (embeddings → blocks → norm → head, masks, cache, loss, init order) is ``decoder.Decoder``, as for
``Llama``. Also holds the biased multi-head attention and MLP that the BERT encoder reuses.

Legend: B batch, T tokens, S key slots, D d_model, H heads, Dh head dim, V vocab.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import ModelConfig
from lmforge.models.common import KVCache, SelfAttention, fill_normal_
from lmforge.models.decoder import Decoder, PreNormBlock

ACTIVATIONS = {"gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu}


class BiasedAttention(SelfAttention):
    """Multi-head attention with biases and no positional rotation (positions are added to embeddings);
    ``causal=False`` for encoders."""

    def __init__(self, cfg: ModelConfig, causal: bool = True):
        super().__init__()
        d, inner = cfg.d_model, cfg.n_heads * cfg.dims_per_head  # inner < d after structured head pruning
        self.n_heads, self.head_dim, self.dropout, self.causal = cfg.n_heads, cfg.dims_per_head, cfg.dropout, causal
        self.wq, self.wk, self.wv = (nn.Linear(d, inner) for _ in range(3))
        self.wo = nn.Linear(inner, d)

    def forward(self, x_BTD, mask: Optional[torch.Tensor] = None, cache: Optional[KVCache] = None,
                layer_idx: int = 0) -> torch.Tensor:
        q_BHTD, k_BHTD, v_BHTD = (t.transpose(1, 2) for t in self.project(x_BTD))
        return self.attend(q_BHTD, k_BHTD, v_BHTD, mask, cache, layer_idx, self.causal)


class MLP(nn.Module):
    def __init__(self, d_model: int, hidden: int, activation: str):
        super().__init__()
        self.fc = nn.Linear(d_model, hidden)
        self.proj = nn.Linear(hidden, d_model)
        self.act = ACTIVATIONS[activation]

    def forward(self, x):
        return self.proj(self.act(self.fc(x)))


class GPT2Block(PreNormBlock):
    """``forward(x_BTD, mask=None, cache=None)``."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__(layer_idx, cfg.dropout)
        self.attention_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attention = BiasedAttention(cfg)
        self.ffn_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.feed_forward = MLP(cfg.d_model, cfg.ffn_hidden or 4 * cfg.d_model, cfg.activation or "gelu_tanh")

    def init_plan(self, std: float, out_std: float) -> list[tuple[nn.Linear, float]]:
        a, f = self.attention, self.feed_forward
        return [(a.wq, std), (a.wk, std), (a.wv, std), (a.wo, out_std), (f.fc, std), (f.proj, out_std)]


class GPT2(Decoder):
    """Decoder-only LM with learned absolute positions (``pos_embeddings``, drawn with std init_std/2)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, GPT2Block, lambda: nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps))

    def _build_positions(self) -> None:
        self.pos_embeddings = nn.Embedding(self.cfg.max_seq_len, self.cfg.d_model)

    def _init_positions(self, std: float, gen: Optional[torch.Generator]) -> None:
        fill_normal_(self.pos_embeddings.weight, std / 2, gen)

    def embed(self, tokens_BT: torch.Tensor, positions_BT: Optional[torch.Tensor], start: int
              ) -> tuple[torch.Tensor, tuple]:
        T = tokens_BT.shape[1]
        self._check_positions(positions_BT, start, T)
        if positions_BT is None:
            positions_BT = torch.arange(start, start + T, device=tokens_BT.device)[None]
        return self.emb_dropout(self.tok_embeddings(tokens_BT) + self.pos_embeddings(positions_BT)), ()
