"""Load what the server serves: an lmforge run folder (``config.yaml`` + checkpoints) or an HF folder
(``config.json`` + safetensors), its tokenizer and its chat template. ``serving_dtype`` is the one place the
serving precision is chosen."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from lmforge.errors import ConfigError
from lmforge.serve.chat import ChatTemplate, load_chat_template

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def serving_dtype(name: str = "float32") -> torch.dtype:
    """The dtype weights and KV cache are served in. float32 unless asked otherwise (a measured automatic
    choice belongs here once lmforge has one)."""
    if name not in DTYPES:
        raise ConfigError(f"--dtype {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    name: str
    chat_template: Optional[ChatTemplate]
    source: Path


def load_model(path: str | Path, dtype_name: str = "float32", checkpoint: Optional[str] = None,
               name: Optional[str] = None) -> Loaded:
    folder = Path(path)
    dtype = serving_dtype(dtype_name)
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
    return Loaded(model, tok, name or folder.resolve().name, load_chat_template(folder), folder)
