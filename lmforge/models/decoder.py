"""The decoder body Llama and GPT-2 share: token embeddings → pre-norm blocks → final norm → output head.

A family subclasses ``Decoder`` and ``PreNormBlock`` and writes only what differs: attention, MLP, norm type,
positions (RoPE tables or learned embeddings) and which projections get which init std. Masks, the KV cache,
logits, the next-token loss, the tied head, the init order, parameter and FLOP counts are written here once.

Contract (every trainable lmforge LM; ``bert.Bert`` follows the same protocol):
- ``forward(tokens_BT, doc_ids_BT=None, *, labels_BT=None, reduction="mean", **kw)``: without labels, float
  logits [B, T, V]; with labels, ``loss(...)``. DDP / FSDP2 / DeepSpeed run their hooks through ``forward``,
  so the trainer reaches the fused loss there.
- ``loss(tokens_BT, labels_BT, doc_ids_BT=None, ignore_index=IGNORE_INDEX, reduction="mean", **kw)``: next-token
  cross-entropy with the labels already shifted, in float32:
  sum = Σ_{t: y_t ≠ ignore} −log softmax(W h_t)[y_t], mean = sum / max(1, #{t: y_t ≠ ignore}).
  A plain, bias-free, unsharded ``output`` takes the fused chunked path (``losses.linear_cross_entropy``, no
  [B·T, V] logits); a swapped or sharded head takes the plain path on materialised logits.

Legend: B batch, T tokens, D d_model, V vocab.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import nn

from lmforge.config import ModelConfig
from lmforge.errors import ConfigError, DataError
from lmforge.models.common import (KVCache, attention_mask, count_params, fill_const_, fill_normal_, init_generator,
                                   linear_weights)
from lmforge.models.losses import IGNORE_INDEX, cross_entropy, fused_head_ok, linear_cross_entropy


class PreNormBlock(nn.Module):
    """x ← x + drop(attention(attention_norm(x), *attn_args)); x ← x + drop(feed_forward(ffn_norm(x))).

    A family's block sets ``attention``, ``feed_forward``, ``attention_norm`` and ``ffn_norm`` in its own
    order (that order fixes the parameter order checkpoints and optimizers see) and defines
    ``init_plan(std, out_std) -> [(projection, std), ...]`` in the order the values are drawn. ``attn_args``
    reach its attention unchanged, then ``layer_idx=``: Llama (cos, sin, mask, cache), GPT-2 (mask, cache).
    """

    def __init__(self, layer_idx: int, dropout: float):
        super().__init__()
        self.layer_idx = layer_idx
        self.resid_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x_BTD: torch.Tensor, *attn_args) -> torch.Tensor:
        h_BTD = self.attention(self.attention_norm(x_BTD), *attn_args, layer_idx=self.layer_idx)
        x_BTD = x_BTD + self.resid_dropout(h_BTD)
        return x_BTD + self.resid_dropout(self.feed_forward(self.ffn_norm(x_BTD)))


def _unit_norm_(norm: nn.Module) -> None:
    fill_const_(norm.weight, 1.0)
    if getattr(norm, "bias", None) is not None:
        fill_const_(norm.bias, 0.0)


class Decoder(nn.Module):
    """Decoder-only LM. Parameter order: tok_embeddings, the family's positions, layers, norm, output.

    A family defines its positions with three methods:
    - ``_build_positions()``: register the tables (called before the blocks are built);
    - ``_init_positions(std, gen)``: (re)fill them, drawn right after the token embeddings;
    - ``embed(tokens_BT, positions_BT, start) -> (x_BTD, pos_args)``: the input of the first block and the
      positional arguments each block passes to its attention (``positions_BT`` None: start, start+1, ...).
    """

    def __init__(self, cfg: ModelConfig, block: Callable[[ModelConfig, int], PreNormBlock],
                 norm: Callable[[], nn.Module]):
        super().__init__()
        if cfg.vocab_size is None:
            raise ConfigError("model.vocab_size is not set")
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self._build_positions()
        self.emb_dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.layers = nn.ModuleList(block(cfg, i) for i in range(cfg.n_layers))
        self.norm = norm()
        self.output = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.tie_weights()

    # ------------------------------------------------------------------ init / bookkeeping
    def tie_weights(self) -> None:
        """With ``tie_embeddings`` the head shares the token table (``to_empty`` can break the tie: re-tie)."""
        if self.cfg.tie_embeddings and self.output.weight is not self.tok_embeddings.weight:
            self.output.weight = self.tok_embeddings.weight

    @torch.no_grad()
    def init_weights(self, seed: Optional[int] = None) -> None:
        """N(0, init_std) embeddings and projections, residual outputs with init_std/sqrt(2·n_layers), zero
        biases, unit norms. Each tensor is drawn whole on CPU from one generator in a fixed order, so values do
        not depend on device or sharding. Works after meta + ``to_empty``."""
        self.tie_weights()
        cfg = self.cfg
        gen = init_generator(seed)
        std, out_std = cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.n_layers)
        fill_normal_(self.tok_embeddings.weight, std, gen)
        self._init_positions(std, gen)
        for layer in self.layers:
            for lin, s in layer.init_plan(std, out_std):
                fill_normal_(lin.weight, s, gen)
                if lin.bias is not None:
                    fill_const_(lin.bias, 0.0)
            _unit_norm_(layer.attention_norm)
            _unit_norm_(layer.ffn_norm)
        _unit_norm_(self.norm)
        if not cfg.tie_embeddings:
            fill_normal_(self.output.weight, std, gen)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        return count_params(self, exclude_embeddings)

    def flops_per_token(self, seq_len: int) -> float:
        """Training (fwd+bwd) FLOPs per token: 6·(matmul weights, output head included) + 12·L·D·T
        (attention scores and values, H·Dh = D)."""
        return 6.0 * linear_weights(self) + 12.0 * self.cfg.n_layers * self.cfg.d_model * seq_len

    def new_cache(self, batch_size: int, max_len: int, device=None) -> KVCache:
        device = device if device is not None else self.tok_embeddings.weight.device
        return KVCache(batch_size, max_len, self.cfg.n_layers, device)

    # ------------------------------------------------------------------ forward
    def _check_positions(self, positions_BT: Optional[torch.Tensor], start: int, T: int) -> None:
        top = int(positions_BT.max()) + 1 if positions_BT is not None else start + T
        if top > self.cfg.max_seq_len:
            raise DataError(f"position {top - 1} exceeds model.max_seq_len={self.cfg.max_seq_len} (tokens_BT of "
                            f"{T} tokens from position {start})")

    def _mask(self, tokens_BT: torch.Tensor, doc_ids_BT: Optional[torch.Tensor], cache: Optional[KVCache],
              pad_mask_BT: Optional[torch.Tensor]) -> tuple[Optional[torch.Tensor], int]:
        """(attention mask, or None for plain causal; position of the first new token). With a cache this
        reserves its slots for the new tokens."""
        T = tokens_BT.shape[1]
        if cache is not None:
            if doc_ids_BT is not None:
                raise ValueError("doc_ids_BT cannot be combined with a KV cache")
            start = cache.pos
            cache.begin(T, pad_mask_BT)
            return cache.attn_mask(T), start
        if doc_ids_BT is not None and doc_ids_BT.shape != tokens_BT.shape:
            raise DataError(f"doc_ids_BT shape {tuple(doc_ids_BT.shape)} != tokens shape {tuple(tokens_BT.shape)}")
        return attention_mask(T, pad_mask_BT, doc_ids_BT), 0

    def hidden_states(self, tokens_BT: torch.Tensor, doc_ids_BT: Optional[torch.Tensor] = None, *,
                      cache: Optional[KVCache] = None, positions_BT: Optional[torch.Tensor] = None,
                      pad_mask_BT: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Final-norm hidden states [B, T, D]. ``pad_mask_BT`` (True = real token) hides padding keys;
        ``doc_ids_BT`` keeps attention inside each document. With ``cache``: incremental decoding, positions
        default to the cache offset (left-padded batches pass ``positions_BT`` and ``pad_mask_BT``)."""
        mask, start = self._mask(tokens_BT, doc_ids_BT, cache, pad_mask_BT)
        x_BTD, pos_args = self.embed(tokens_BT, positions_BT, start)
        for layer in self.layers:
            x_BTD = layer(x_BTD, *pos_args, mask, cache)
        if cache is not None:
            cache.advance(tokens_BT.shape[1])
        return self.norm(x_BTD)

    def forward(self, tokens_BT: torch.Tensor, doc_ids_BT: Optional[torch.Tensor] = None, *,
                labels_BT: Optional[torch.Tensor] = None, reduction: str = "mean", **kw) -> torch.Tensor:
        """Logits [B, T, V] (float32), or with ``labels_BT`` the loss of ``loss(...)``."""
        if labels_BT is not None:
            return self.loss(tokens_BT, labels_BT, doc_ids_BT, reduction=reduction, **kw)
        return self.output(self.hidden_states(tokens_BT, doc_ids_BT, **kw)).float()

    def loss(self, tokens_BT: torch.Tensor, labels_BT: torch.Tensor, doc_ids_BT: Optional[torch.Tensor] = None,
             ignore_index: int = IGNORE_INDEX, reduction: str = "mean", **kw) -> torch.Tensor:
        """Next-token cross-entropy (see the module docstring); equals
        ``F.cross_entropy(model(tokens).flatten(0, 1), labels.flatten())`` without materialising all logits."""
        h_BTD = self.hidden_states(tokens_BT, doc_ids_BT, **kw)
        if not fused_head_ok(self.output):  # swapped or sharded head: plain path
            return cross_entropy(self.output(h_BTD).flatten(0, 1), labels_BT.flatten(), ignore_index, reduction)
        return linear_cross_entropy(h_BTD.flatten(0, 1), self.output.weight, labels_BT.flatten(), ignore_index,
                                    reduction=reduction)
