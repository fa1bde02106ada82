"""Import from / export to Hugging Face model folders (config.json + safetensors), one adapter per family.

    model = load_hf("path/to/hf_folder")          # Llama, GPT-2 or BERT (model_type in config.json)
    save_hf(model, "out/")                        # loadable by transformers AutoModel*.from_pretrained
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from lmforge.config import ModelConfig
from lmforge.models.hf import bert, gpt2, llama
from lmforge.models.hf.io import read_config, read_state_dict, write_folder

SUPPORTED = ("llama", "gpt2", "bert")


def hf_config_to_lmforge(folder: str | Path) -> ModelConfig:
    c = read_config(folder)
    src = str(Path(folder) / "config.json")
    kind = c.get("model_type")
    if kind not in SUPPORTED:
        raise ValueError(f"{src}: model_type {kind!r} is not supported (supported: {', '.join(SUPPORTED)})")
    try:
        return {"llama": llama, "gpt2": gpt2, "bert": bert}[kind].config_from_hf(c, src)
    except KeyError as e:
        from lmforge.errors import CheckpointError

        raise CheckpointError(f"{src}: missing key {e.args[0]!r} (needed for model_type {kind!r})") from None


def load_hf(folder: str | Path, device: str | torch.device = "cpu", dtype: Optional[torch.dtype] = None,
            nsp_head: Optional[bool] = None, seed: int = 0) -> nn.Module:
    """Build the lmforge model for an HF folder and load its weights (float32 unless ``dtype``).

    BERT: ``nsp_head`` None keeps an NSP head only if the checkpoint has one; parts the checkpoint lacks
    (MLM head of a bare BertModel, say) are initialised from ``seed`` and named in a warning."""
    from lmforge.models import build_model
    from lmforge.models.bert import Bert

    folder = Path(folder)
    cfg = hf_config_to_lmforge(folder)
    hf_sd = read_state_dict(folder)
    src = str(folder)
    if cfg.arch == "bert":
        sd, missing = bert.from_hf(hf_sd, cfg, src)
        want_nsp = "nsp_head" not in missing if nsp_head is None else nsp_head
        with torch.device("meta"):
            model = Bert(cfg, nsp_head=want_nsp)
        model.to_empty(device="cpu")
        model.init_weights(seed)
        missing = [m for m in missing if not (m == "nsp_head" and not want_nsp)]
        if missing:
            warnings.warn(f"{src}: no weights for {', '.join(missing)}; they keep a fresh seed={seed} init",
                          stacklevel=2)
    else:
        sd = (llama if cfg.arch == "llama" else gpt2).from_hf(hf_sd, cfg, src)
        model = build_model(cfg, device="meta")
        model.to_empty(device="cpu")
        model.init_weights(0)  # non-persistent buffers (RoPE tables); every parameter is overwritten below
    with torch.no_grad():
        params = dict(model.named_parameters(remove_duplicate=False))
        for name, tensor in sd.items():
            if name not in params:
                if name == "nsp_head.weight" or name == "nsp_head.bias":
                    continue
                raise KeyError(f"{src}: adapter produced unknown parameter '{name}'")
            if params[name].shape != tensor.shape:
                raise ValueError(f"{src}: shape of '{name}' is {tuple(tensor.shape)}, model expects "
                                 f"{tuple(params[name].shape)}")
            params[name].copy_(tensor.to(torch.float32))
    return model.to(device=device, dtype=dtype or torch.float32)


def save_hf(model: nn.Module, folder: str | Path, dtype: Optional[torch.dtype] = None) -> Path:
    """Write ``model`` as an HF folder (config.json + model.safetensors) in ``dtype`` (default: its own)."""
    cfg: ModelConfig = model.cfg
    sd = {k: v.detach() for k, v in model.state_dict(keep_vars=False).items()}
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    dname = str(next(iter(sd.values())).dtype).removeprefix("torch.")
    if cfg.arch == "llama":
        return write_folder(folder, llama.config_to_hf(cfg, dname), llama.to_hf(sd, cfg))
    if cfg.arch == "gpt2":
        return write_folder(folder, gpt2.config_to_hf(cfg, dname), gpt2.to_hf(sd, cfg))
    if cfg.arch == "bert":
        nsp = getattr(model, "nsp_head", None) is not None
        return write_folder(folder, bert.config_to_hf(cfg, dname, nsp), bert.to_hf(sd, cfg, nsp))
    raise ValueError(f"save_hf: model.arch {cfg.arch!r} has no HF adapter")


__all__ = ["load_hf", "save_hf", "hf_config_to_lmforge"]
