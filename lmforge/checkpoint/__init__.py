"""Checkpoints: one folder protocol, one manager for training, one reader of weights for everyone else.

- ``CheckpointManager(run_dir, model=..., optimizer=..., shared=..., per_rank=..., pdims=...)``: ``save(step)``
  / ``load(spec)`` at every world size and strategy, and for the DeepSpeed engine (``manager.py``).
- ``newest_valid`` / ``resolve_source`` / ``load_model_weights`` / ``full_weights`` / ``consolidate`` /
  ``export_safetensors``: the weights of any checkpoint format for generate, export, consolidation and
  fine-tuning bases (``weights.py``).
- ``folder.py``: naming, the atomic write (temp name → fsync → sha256 manifest → COMPLETE → rename → prune),
  verification. ``state.py``: canonical model/optimizer state (ZeRO-1 included), ``RNGState``.
"""

from lmforge.checkpoint.folder import MARKER, complete_folders, newest_valid, prune, read_manifest, step_folder, verify
from lmforge.checkpoint.manager import CheckpointManager
from lmforge.checkpoint.state import DictState, RNGState
from lmforge.checkpoint.weights import (consolidate, export_safetensors, full_weights, load_model_weights,
                                        model_state, read_state, resolve_source)
from lmforge.errors import CheckpointError

__all__ = ["MARKER", "CheckpointError", "CheckpointManager", "DictState", "RNGState", "complete_folders",
           "consolidate", "export_safetensors", "full_weights", "load_model_weights", "model_state", "newest_valid",
           "prune", "read_manifest", "read_state", "resolve_source", "step_folder", "verify"]
