"""Pooling of hidden states for sequence-level task heads (``finetune.model.TaskModel`` puts the head on).

Legend: B batch, T tokens, D d_model.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch

Pooling = Literal["cls", "mean", "last"]
POOLINGS = ("cls", "mean", "last")


def pool(h_BTD: torch.Tensor, pad_mask_BT: Optional[torch.Tensor], how: Pooling) -> torch.Tensor:
    """[B, D] summary of each row. ``pad_mask_BT``: True = real token (None: every token is real).
    cls: h[:, 0]; mean: Σ_t m_t·h_t / max(1, Σ_t m_t); last: h at the last real token (decoders; any padding
    side, and token 0 for a row without real tokens)."""
    if how == "cls":
        return h_BTD[:, 0]
    if pad_mask_BT is None:
        pad_mask_BT = torch.ones(h_BTD.shape[:2], dtype=torch.bool, device=h_BTD.device)
    m_BT1 = pad_mask_BT.to(h_BTD.dtype)[:, :, None]
    if how == "mean":
        return (h_BTD * m_BT1).sum(1) / m_BT1.sum(1).clamp(min=1)
    if how == "last":
        last_B = pad_mask_BT.long().cumsum(1).argmax(1)  # first index of the largest count: the last real token
        return h_BTD[torch.arange(h_BTD.shape[0], device=h_BTD.device), last_B]
    raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}; got {how!r}")
