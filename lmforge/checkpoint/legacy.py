"""Reader of the pre-refactor single-process checkpoint (manifest format_version 1 without a "format" key).

Such a folder holds ``model.safetensors`` (canonical names, a tied head stored once) and ``state.pt``:
``{"optimizer": torch state dict (integer parameter ids, each group's "param_names"), "scheduler",
"trainer", "early_stop", "scaler", "master", "rng", "loader"}``. ``read_single`` returns it in the package's
terms: model tensors, the optimizer flattened by parameter name (``state.py``), the shared states and this
(only) rank's states, so it loads into plain or sharded objects like any other checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from lmforge.checkpoint.state import canonical, read_pt
from lmforge.errors import CheckpointError

PER_RANK = ("rng", "loader")


def read_single(folder: Path, map_location="cpu") -> tuple[dict, Optional[dict], dict, dict]:
    """→ (model tensors, flattened optimizer or None, shared states, per-rank states)."""
    from safetensors.torch import load_file

    try:
        weights = load_file(str(folder / "model.safetensors"))
    except Exception as e:  # noqa: BLE001 - any decode failure makes the checkpoint unusable
        raise CheckpointError(f"{folder / 'model.safetensors'}: cannot be read ({type(e).__name__}: {e})") from None
    state = read_pt(folder / "state.pt", map_location)
    osd = state.pop("optimizer", None)
    per_rank = {k: state.pop(k) for k in PER_RANK if k in state}
    return weights, (flat_optimizer(osd, folder) if osd is not None else None), state, per_rank


def flat_optimizer(osd: dict, where: Path) -> dict:
    """A torch optimizer state dict (integer ids) flattened by parameter name, via its groups' param_names."""
    flat = {}
    for g in osd["param_groups"]:
        names = g.get("param_names")
        if names is None or len(names) != len(g["params"]):
            raise CheckpointError(f"{where}/state.pt: the optimizer state has no parameter names; it cannot be "
                                  "matched to the model's parameters")
        for i, name in zip(g["params"], map(canonical, names)):
            flat.update({f"state.{name}.{k}": v for k, v in osd["state"].get(i, {}).items()})
            flat.update({f"param_groups.{name}.{k}": v for k, v in g.items() if k not in ("params", "param_names")})
    return flat
