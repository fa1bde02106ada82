"""BERT-style encoder: learned positions + token types, post-LayerNorm blocks, GELU MLP, MLM and NSP heads.

``forward(tokens_BT, doc_ids_BT=None, *, labels_BT=None, reduction="mean", token_type_ids_BT=None,
pad_mask_BT=None)`` → MLM logits [B, T, V], or with ``labels_BT`` the MLM loss of ``loss(...)`` (the protocol
of ``decoder.Decoder``): sum = Σ_{t: y_t ≠ ignore} −log softmax(logits_t)[y_t] (no shift), mean = sum / #{t:
y_t ≠ ignore}. Attention is bidirectional; ``pad_mask_BT`` (True = real token) hides padding keys and
``doc_ids_BT`` restricts attention to the same document.

Legend: B batch, T tokens, D d_model, V vocab.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from lmforge.config import ModelConfig
from lmforge.errors import ConfigError, DataError
from lmforge.models.common import (attention_mask, count_params, fill_const_, fill_normal_, init_generator,
                                   linear_weights)
from lmforge.models.gpt2 import ACTIVATIONS, MLP, BiasedAttention
from lmforge.models.losses import IGNORE_INDEX, cross_entropy


class BertBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention = BiasedAttention(cfg, causal=False)
        self.attention_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.feed_forward = MLP(cfg.d_model, cfg.ffn_hidden or 4 * cfg.d_model, cfg.activation or "gelu")
        self.ffn_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def forward(self, x_BTD, mask):
        x_BTD = self.attention_norm(x_BTD + self.dropout(self.attention(x_BTD, mask)))
        return self.ffn_norm(x_BTD + self.dropout(self.feed_forward(x_BTD)))


class MLMHead(nn.Module):
    """dense → activation → LayerNorm → decoder (weight tied to the token embeddings) + bias."""

    def __init__(self, cfg: ModelConfig, embedding: nn.Embedding):
        super().__init__()
        self.dense = nn.Linear(cfg.d_model, cfg.d_model)
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.act = ACTIVATIONS[cfg.activation or "gelu"]
        self.decoder = nn.Linear(cfg.d_model, cfg.vocab_size)
        self.decoder.weight = embedding.weight

    def transform(self, h_BTD):
        return self.norm(self.act(self.dense(h_BTD)))

    def forward(self, h_BTD):
        return self.decoder(self.transform(h_BTD))


class Bert(nn.Module):
    def __init__(self, cfg: ModelConfig, nsp_head: bool = False):
        super().__init__()
        if cfg.vocab_size is None:
            raise ConfigError("model.vocab_size is not set")
        self.cfg = cfg
        d = cfg.d_model
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, d)
        self.pos_embeddings = nn.Embedding(cfg.max_seq_len, d)
        self.type_embeddings = nn.Embedding(cfg.type_vocab_size, d)
        self.emb_norm = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.emb_dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.layers = nn.ModuleList(BertBlock(cfg) for _ in range(cfg.n_layers))
        self.pooler = nn.Linear(d, d)
        self.mlm_head = MLMHead(cfg, self.tok_embeddings)
        self.nsp_head = nn.Linear(d, 2) if nsp_head else None

    @torch.no_grad()
    def init_weights(self, seed: Optional[int] = None) -> None:
        """BERT init: N(0, init_std) weights and embeddings, zero biases, unit LayerNorms."""
        if self.mlm_head.decoder.weight is not self.tok_embeddings.weight:
            self.mlm_head.decoder.weight = self.tok_embeddings.weight
        gen = init_generator(seed)
        std = self.cfg.init_std
        for name, mod in self.named_modules():
            if isinstance(mod, nn.Embedding):
                fill_normal_(mod.weight, std, gen)
            elif isinstance(mod, nn.Linear):
                if name != "mlm_head.decoder":
                    fill_normal_(mod.weight, std, gen)
                if mod.bias is not None:
                    fill_const_(mod.bias, 0.0)
            elif isinstance(mod, nn.LayerNorm):
                fill_const_(mod.weight, 1.0)
                fill_const_(mod.bias, 0.0)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        return count_params(self, exclude_embeddings)

    def flops_per_token(self, seq_len: int) -> float:
        """Encoder + MLM head, full (non-causal) attention: 6·matmul weights + 12·L·D·T."""
        n = linear_weights(self) - self.pooler.weight.numel() - (self.nsp_head.weight.numel() if self.nsp_head else 0)
        return 6.0 * n + 12.0 * self.cfg.n_layers * self.cfg.d_model * seq_len

    def hidden_states(self, tokens_BT, doc_ids_BT=None, *, token_type_ids_BT: Optional[torch.Tensor] = None,
                      pad_mask_BT: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Last-layer hidden states [B, T, D]."""
        T = tokens_BT.shape[1]
        if T > self.cfg.max_seq_len:
            raise DataError(f"tokens_BT of {T} tokens exceeds model.max_seq_len={self.cfg.max_seq_len}")
        mask = attention_mask(T, pad_mask_BT, doc_ids_BT, causal=False)
        types = token_type_ids_BT if token_type_ids_BT is not None else torch.zeros_like(tokens_BT)
        pos = torch.arange(T, device=tokens_BT.device)[None]
        x_BTD = self.tok_embeddings(tokens_BT) + self.pos_embeddings(pos) + self.type_embeddings(types)
        x_BTD = self.emb_dropout(self.emb_norm(x_BTD))
        for layer in self.layers:
            x_BTD = layer(x_BTD, mask)
        return x_BTD

    def pooled(self, h_BTD: torch.Tensor) -> torch.Tensor:
        """tanh(dense(h[:, 0])) — the [CLS] summary used by NSP."""
        return torch.tanh(self.pooler(h_BTD[:, 0]))

    def forward(self, tokens_BT, doc_ids_BT=None, *, labels_BT: Optional[torch.Tensor] = None,
                reduction: str = "mean", **kw) -> torch.Tensor:
        if labels_BT is not None:
            return self.loss(tokens_BT, labels_BT, doc_ids_BT, reduction=reduction, **kw)
        return self.mlm_head(self.hidden_states(tokens_BT, doc_ids_BT, **kw)).float()

    def nsp_logits(self, tokens_BT, **kw) -> torch.Tensor:
        if self.nsp_head is None:
            raise ValueError("this BERT model was built without an NSP head (nsp_head=True)")
        return self.nsp_head(self.pooled(self.hidden_states(tokens_BT, **kw))).float()

    def loss(self, tokens_BT, labels_BT, doc_ids_BT=None, ignore_index: int = IGNORE_INDEX, reduction: str = "mean",
             **kw) -> torch.Tensor:
        """Masked-LM loss over positions whose label != ignore_index (module docstring); 0 when there are none."""
        h_ND = self.mlm_head.transform(self.hidden_states(tokens_BT, doc_ids_BT, **kw)).flatten(0, 1)
        labels_N = labels_BT.flatten()
        keep = labels_N != ignore_index  # only masked positions need the vocab projection
        logits_NV = torch.nn.functional.linear(h_ND[keep], self.mlm_head.decoder.weight, self.mlm_head.decoder.bias)
        if keep.sum() == 0:
            return logits_NV.sum() * 0.0
        return cross_entropy(logits_NV, labels_N[keep], reduction=reduction)
