"""Task heads on any lmforge backbone (Llama, GPT-2, BERT): sequence and token classification.

A backbone provides ``hidden_states(tokens_BT, **kw) -> [B, T, D]``. Padding is given as ``pad_mask_BT``
(True = real token); padding keys are hidden from attention. Right padding is preferred for decoders
(GPT-2's absolute positions would otherwise start after the left padding).

Legend: B batch, T tokens, D d_model, C classes.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

Pooling = Literal["cls", "mean", "last"]


def _hidden(backbone: nn.Module, tokens_BT, pad_mask_BT, **kw) -> torch.Tensor:
    return backbone.hidden_states(tokens_BT, pad_mask_BT=pad_mask_BT, **kw)


def pool(h_BTD: torch.Tensor, pad_mask_BT: Optional[torch.Tensor], how: Pooling) -> torch.Tensor:
    """cls: first token; mean: average of real tokens; last: last real token (decoders)."""
    if how == "cls":
        return h_BTD[:, 0]
    if pad_mask_BT is None:
        pad_mask_BT = torch.ones(h_BTD.shape[:2], dtype=torch.bool, device=h_BTD.device)
    m_BT1 = pad_mask_BT.to(h_BTD.dtype)[:, :, None]
    if how == "mean":
        return (h_BTD * m_BT1).sum(1) / m_BT1.sum(1).clamp(min=1)
    if how == "last":
        last_B = pad_mask_BT.long().cumsum(1).argmax(1)  # index of the last real token
        return h_BTD[torch.arange(h_BTD.shape[0], device=h_BTD.device), last_B]
    raise ValueError(f"pooling must be one of cls, mean, last; got {how!r}")


class SequenceClassifier(nn.Module):
    """backbone → pool → dropout → linear. ``forward(tokens_BT, pad_mask_BT=None) -> logits_BC``."""

    def __init__(self, backbone: nn.Module, num_classes: int, pooling: Pooling = "cls", dropout: float = 0.0):
        super().__init__()
        if pooling not in ("cls", "mean", "last"):
            raise ValueError(f"pooling must be one of cls, mean, last; got {pooling!r}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.backbone, self.pooling = backbone, pooling
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(backbone.cfg.d_model, num_classes)
        nn.init.normal_(self.classifier.weight, std=backbone.cfg.init_std)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, tokens_BT, pad_mask_BT=None, **kw) -> torch.Tensor:
        h_BTD = _hidden(self.backbone, tokens_BT, pad_mask_BT, **kw)
        return self.classifier(self.dropout(pool(h_BTD, pad_mask_BT, self.pooling))).float()

    def loss(self, tokens_BT, labels_B, pad_mask_BT=None, **kw) -> torch.Tensor:
        return F.cross_entropy(self(tokens_BT, pad_mask_BT, **kw), labels_B)


class TokenClassifier(nn.Module):
    """backbone → dropout → linear per token. ``forward(tokens_BT, pad_mask_BT=None) -> logits_BTC``."""

    def __init__(self, backbone: nn.Module, num_labels: int, dropout: float = 0.0):
        super().__init__()
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}")
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(backbone.cfg.d_model, num_labels)
        nn.init.normal_(self.classifier.weight, std=backbone.cfg.init_std)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, tokens_BT, pad_mask_BT=None, **kw) -> torch.Tensor:
        return self.classifier(self.dropout(_hidden(self.backbone, tokens_BT, pad_mask_BT, **kw))).float()

    def loss(self, tokens_BT, labels_BT, pad_mask_BT=None, ignore_index: int = -100, **kw) -> torch.Tensor:
        """Mean cross-entropy over tokens whose label != ignore_index (and that are not padding)."""
        logits_BTC = self(tokens_BT, pad_mask_BT, **kw)
        if pad_mask_BT is not None:
            labels_BT = labels_BT.masked_fill(~pad_mask_BT.to(torch.bool), ignore_index)
        return F.cross_entropy(logits_BTC.flatten(0, 1), labels_BT.flatten(), ignore_index=ignore_index)
