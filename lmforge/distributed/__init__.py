"""Multi-process training: mesh, parallelisms, distributed checkpoints, DeepSpeed config import, estimates.

Names are imported lazily so ``lmforge --help`` (which registers ``estimate``/``checkpoint``) stays instant.
"""

import importlib

_EXPORTS = {
    "ParallelDims": "mesh", "init_distributed": "mesh", "destroy_distributed": "mesh",
    "parallelize_model": "parallelize", "shard_optimizer": "parallelize",
    "clip_grad_norm": "utils", "grad_sync": "utils",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"lmforge.distributed.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'lmforge.distributed' has no attribute {name!r}")
