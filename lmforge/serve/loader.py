"""Load what the server serves: an lmforge run folder (``config.yaml`` + checkpoints) or an HF folder
(``config.json`` + safetensors), its tokenizer and its chat template. ``serving_dtype`` is the one place the
serving precision is chosen."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from lmforge.errors import ConfigError
from lmforge.hardware.precision import PrecisionChoice
from lmforge.serve.chat import ChatTemplate, load_chat_template

log = logging.getLogger("lmforge.serve")


def serving_dtype(name: str = "auto", folder: Optional[str | Path] = None, **inject) -> PrecisionChoice:
    """The dtype weights and KV cache are served in (``.dtype``), and why (``.reason``). ``auto``: what
    ``training.precision: auto`` picks on this machine (``lmforge.hardware.precision.resolve_dtype``), float32
    for a compressed ``folder`` (``compression.json``); float32/bfloat16/float16 are honoured as given."""
    from lmforge.inference import inference_dtype

    return inference_dtype(folder, name, **inject)


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    name: str
    chat_template: Optional[ChatTemplate]
    source: Path
    precision: Optional[PrecisionChoice] = None  # the serving dtype and why (``serving_dtype``)


def load_model(path: str | Path, dtype_name: str = "auto", checkpoint: Optional[str] = None,
               name: Optional[str] = None) -> Loaded:
    folder = Path(path)
    choice = serving_dtype(dtype_name, folder)
    dtype = choice.dtype
    if (folder / "config.yaml").is_file():
        from lmforge.inference import load_run

        model, tok, _cfg, _ckpt = load_run(folder, checkpoint)
    elif (folder / "config.json").is_file():
        if checkpoint:
            raise ConfigError(f"--checkpoint applies to lmforge run folders; {folder} is an HF folder")
        from lmforge.data.tokenizer import load_tokenizer
        from lmforge.models.hf import load_hf

        try:
            model = load_hf(folder, dtype=dtype)
            tok = load_tokenizer(folder)
        except (ValueError, FileNotFoundError, KeyError) as e:
            raise ConfigError(f"cannot serve {folder}: {e}") from None
    else:
        raise ConfigError(f"{folder} is neither an lmforge run folder (config.yaml) nor an HF folder (config.json)")
    if model.cfg.arch == "bert":
        raise ConfigError(f"{folder} holds a BERT encoder; lmforge serve needs a decoder (llama or gpt2)")
    if model.cfg.vocab_size < tok.vocab_size:
        raise ConfigError(f"{folder}: tokenizer has {tok.vocab_size} tokens, the model only {model.cfg.vocab_size}")
    model = model.to(dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    log.info("%s", choice.dtype_log_line())
    return Loaded(model, tok, name or folder.resolve().name, load_chat_template(folder), folder, choice)
