"""Reading and writing HF-style model folders: config.json plus safetensors (single or sharded) or .bin."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def read_config(folder: str | Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no config.json (expected an HF model folder)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


def read_state_dict(folder: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of model.safetensors, a sharded model.safetensors.index.json, or pytorch_model.bin."""
    folder = Path(folder)
    single, index, bin_file = folder / "model.safetensors", folder / "model.safetensors.index.json", \
        folder / "pytorch_model.bin"
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        sd: dict[str, torch.Tensor] = {}
        for shard in shards:
            sd.update(load_file(str(folder / shard)))
        return sd
    if bin_file.is_file():
        return torch.load(bin_file, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{folder}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def write_folder(folder: str | Path, config: dict, state_dict: dict[str, torch.Tensor]) -> Path:
    """Write config.json and model.safetensors (contiguous, de-aliased tensors)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def take(sd: dict[str, torch.Tensor], key: str, source: str = "checkpoint") -> torch.Tensor:
    """Pop a tensor, naming the missing key clearly."""
    if key not in sd:
        raise KeyError(f"{source}: missing tensor '{key}'")
    return sd.pop(key)


def require(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def take_head(sd: dict[str, torch.Tensor], out: dict[str, torch.Tensor], tied: bool, source: str) -> None:
    """``out["output.weight"]``: the embedding when tied (HF may still store a copy: dropped), else ``lm_head``."""
    head = sd.pop("lm_head.weight", None)
    if tied:
        out["output.weight"] = out["tok_embeddings.weight"]
    else:
        require(head is not None, f"{source}: missing tensor 'lm_head.weight' (tie_word_embeddings is false)")
        out["output.weight"] = head
