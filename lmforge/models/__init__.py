"""Model families and the factory the trainer, CLI and tools call."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from lmforge.config import ConfigError, ModelConfig


def build_model(cfg: ModelConfig, device: str | torch.device = "cpu", seed: Optional[int] = None) -> nn.Module:
    """Build the model for ``cfg.arch``. On "meta" nothing is allocated or initialised: call
    ``model.to_empty(device=...)`` then ``model.init_weights(seed)``. Otherwise weights are initialised
    (deterministically when ``seed`` is given)."""
    if cfg.vocab_size is None:
        raise ConfigError("model.vocab_size is not set (it is normally taken from the data's tokenizer; "
                          "set model.vocab_size or data.path)")
    arch = cfg.arch
    if arch == "llama":
        from lmforge.models.llama import Llama as cls
    elif arch == "gpt2":
        from lmforge.models.gpt2 import GPT2 as cls
    elif arch == "bert":
        from lmforge.models.bert import Bert as cls
    else:
        raise ConfigError(f"invalid value for 'model.arch': {arch!r} (no model registered for it)")
    device = torch.device(device)
    with torch.device(device):
        model = cls(cfg)
    if device.type != "meta":
        model.init_weights(seed)
    return model


__all__ = ["build_model"]
