"""The weights of any checkpoint, for every reader (generate, hf export, consolidate, fine-tune bases).

One policy everywhere: a run folder means its newest checkpoint that verifies (``folder.newest_valid``: a
corrupted newer one is skipped with a warning; when none verifies the error lists each and why); a checkpoint
folder means exactly that one (verified); a ``.safetensors`` file is read as it is. Every format gives full
tensors under canonical names with a tied head stored once: this package's DCP folders (any world size or
strategy), the pre-refactor single-process and DCP folders, DeepSpeed folders (through DeepSpeed's
``zero_to_fp32``) and the manifest-less folders of ``lmforge.distributed.checkpoint``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Optional

import torch
from torch import nn

from lmforge.checkpoint.folder import Comm, is_checkpoint, newest_valid, read_manifest, verify
from lmforge.checkpoint.legacy import read_single
from lmforge.checkpoint.state import aliases, canonical, check_model, dcp_read, fill, read_pt
from lmforge.errors import CheckpointError, SetupError

_TIES = (("output.weight", "tok_embeddings.weight"), ("mlm_head.decoder.weight", "tok_embeddings.weight"))


def resolve_source(run_or_ckpt: str | Path, checkpoint: Optional[str | Path] = None) -> Path:
    """The verified checkpoint folder (or ``.safetensors`` file) a reader should use: ``checkpoint`` when
    given, else ``run_or_ckpt`` itself when it is a checkpoint or a file, else its run's newest valid one."""
    path = Path(checkpoint if checkpoint else run_or_ckpt)
    what = "--checkpoint " if checkpoint else ""
    if not path.exists():
        raise CheckpointError(f"{what}{path}: does not exist")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise CheckpointError(f"{what}{path}: not a checkpoint folder or a .safetensors file")
        return path
    if checkpoint or is_checkpoint(path):
        verify(path)
        return path
    found = newest_valid(path)
    if found is None:
        raise CheckpointError(f"{path}: no checkpoint in {path / 'checkpoints'} (is it a run folder, and did the "
                              "run save one?)")
    return found


def full_weights(source: str | Path) -> dict[str, torch.Tensor]:
    """Every model tensor of ``source`` (see ``resolve_source``) as a full tensor; no collective, so rank 0
    may call it inside a job."""
    from safetensors.torch import load_file

    src = resolve_source(source)
    if src.is_file():
        return load_file(str(src))
    manifest = read_manifest(src)
    fmt = manifest.get("format")
    try:
        if fmt is None:
            tensors = load_file(str(src / "model.safetensors"))
        elif fmt == "deepspeed":
            tensors = _deepspeed_weights(src)
        else:
            tensors = dcp_read(src, "model")
    except (CheckpointError, SetupError):
        raise
    except Exception as e:  # noqa: BLE001 - a verified folder that cannot be decoded is unusable
        raise CheckpointError(f"{src}: cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:300]})") from None
    if fmt is not None and (fmt != "dcp" or manifest.get("format_version", 0) < 2):  # ties stored twice
        for alias, target in _TIES:
            if alias in tensors and target in tensors and torch.equal(tensors[alias], tensors[target]):
                del tensors[alias]
    return tensors


def _deepspeed_weights(folder: Path) -> dict[str, torch.Tensor]:
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError:
        raise SetupError(f"{folder} is a DeepSpeed checkpoint; reading it needs DeepSpeed",
                         hint="pip install 'lmforge[deepspeed]'") from None
    tags = [p.parent for p in sorted(folder.rglob("*model_states.pt"))]
    if not tags:
        raise CheckpointError(f"{folder}: a DeepSpeed checkpoint without any *model_states.pt file")
    sd = get_fp32_state_dict_from_zero_checkpoint(str(tags[0].parent), tag=tags[0].name)
    return {canonical(k): v.detach().contiguous().clone() for k, v in sd.items()}


def read_state(source: str | Path) -> dict:
    """Everything a native checkpoint holds, as full tensors: ``{"model", "optim"`` (flattened by name, None
    without an optimizer), ``"shared"``, ``"rank0"`` (rank 0's per-rank states), ``"manifest"}``."""
    src = resolve_source(source)
    manifest = read_manifest(src) if src.is_dir() else {}
    fmt = manifest.get("format")
    if fmt is None and src.is_dir():
        weights, optim, shared, mine = read_single(src)
    elif fmt == "dcp" and manifest.get("format_version", 0) > 0:
        optim = dcp_read(src, "optim") or None
        weights, shared, mine = full_weights(src), read_pt(src / "trainer.pt"), read_pt(src / "rank_00000.pt")
    else:
        raise CheckpointError(f"{src}: only the weights of this checkpoint can be read (full_weights)")
    return {"model": weights, "optim": optim, "shared": shared, "rank0": mine, "manifest": manifest}


def load_model_weights(model: nn.Module, source: str | Path) -> dict:
    """Weights of ``source`` (any format, see ``resolve_source``) into a plain single-process ``model``;
    a missing, unexpected or differently shaped tensor is named. Returns the manifest ({} for a file)."""
    src = resolve_source(source)
    tensors = full_weights(src)
    live = check_model(model, {k: tuple(v.shape) for k, v in tensors.items()}, str(src), Comm(False))
    for k, v in live.items():
        fill(v, tensors[k])
    return read_manifest(src) if src.is_dir() else {}


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A plain model's tensors under canonical names, tied ones once, on the CPU."""
    sd = {canonical(k): v for k, v in model.state_dict().items()}
    tied = aliases(sd)
    return {k: v.detach().contiguous().cpu() for k, v in sd.items() if k not in tied}


def export_safetensors(weights: nn.Module | Mapping[str, torch.Tensor], out_file: str | Path,
                       metadata: Optional[dict] = None) -> Path:
    """Write a model's (or a name → tensor mapping's) weights as one ``.safetensors`` file, atomically."""
    from safetensors.torch import save_file

    tensors = model_state(weights) if isinstance(weights, nn.Module) else \
        {k: v.detach().contiguous().cpu() for k, v in weights.items()}
    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items() if v is not None})
    os.replace(tmp, out)
    return out


def consolidate(checkpoint: str | Path, out_file: str | Path) -> Path:
    """The weights of ``checkpoint`` (any format, any world size; a run folder: its newest valid one) as one
    ``.safetensors`` file with canonical names."""
    src = resolve_source(checkpoint)
    step = read_manifest(src).get("step") if src.is_dir() else None
    return export_safetensors(full_weights(src), out_file, {"step": step, "source": str(src)})
