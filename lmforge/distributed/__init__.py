"""Multi-process training: mesh, parallelisms, distributed checkpoints, DeepSpeed config import, estimates."""

from lmforge.distributed.mesh import ParallelDims, destroy_distributed, init_distributed
from lmforge.distributed.parallelize import parallelize_model, shard_optimizer
from lmforge.distributed.utils import clip_grad_norm, global_token_count, grad_sync, normalize_loss, rank0_print

__all__ = ["ParallelDims", "init_distributed", "destroy_distributed", "parallelize_model", "shard_optimizer",
           "clip_grad_norm", "global_token_count", "grad_sync", "normalize_loss", "rank0_print"]
