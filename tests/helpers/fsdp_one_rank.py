"""FSDP2 on a real 1-rank process group, through the one step, loop and checkpoint manager (no tests here).

``parallelize_model`` applies FSDP2 only when the data-parallel degree is > 1: at world size 1 there is
nothing to shard, so ``train()`` trains the plain module and ``init_distributed`` creates no process group.
To run FSDP2's own machinery on one device (the backend's all-gather / reduce-scatter, ``MixedPrecisionPolicy``,
DTensor parameters and optimizer state, DCP of DTensors), ``fsdp_train`` builds the run as ``build_engine``
does but applies ``apply_fsdp`` on a 1-rank mesh. ``one_rank`` is the rank body ``tests.helpers.ranks``
spawns: the uninterrupted run, the same run stopped at step 3 and resumed, and the plain (unsharded) run.
"""

from __future__ import annotations

from pathlib import Path

import torch


def fsdp_train(cfg, pdims, device: torch.device, fsdp: bool = True) -> tuple[dict, dict]:
    """(summary, facts) of a pretraining run whose model is FSDP2-sharded over ``pdims``' 1-rank mesh."""
    from lmforge.distributed.parallelize import apply_fsdp
    from lmforge.models import build_model
    from lmforge.training.build import (StepBatches, make_loaders, materialize, open_data, resolve_model_cfg,
                                        resolve_precision, seed_everything)
    from lmforge.training.engine import NativeEngine
    from lmforge.training.loop import run_loop
    from lmforge.training.optim import build_optimizer
    from lmforge.training.precision import make_loss_scaler
    from lmforge.training.schedule import build_scheduler
    from lmforge.training.trainer import finish, lm_job

    cfg = cfg.model_copy(deep=True)
    tc = cfg.training
    train_shards, val_shards = open_data(cfg)
    resolve_model_cfg(cfg, train_shards)
    choice = resolve_precision(cfg, pdims, device)
    seed_everything(tc.seed)
    model = build_model(cfg.model, device="meta")
    if fsdp:
        apply_fsdp(model, pdims, cfg.distributed, tc.precision)
    materialize(model, model, tc.seed, device)
    optimizer = build_optimizer(model, cfg.optimizer)
    engine = NativeEngine(model, optimizer, build_scheduler(optimizer, cfg.scheduler, tc.max_steps), pdims, device,
                          tc.precision, scaler=make_loss_scaler(tc))
    batches = StepBatches(make_loaders(cfg, pdims, train_shards), tc.grad_accum_steps)
    job = lm_job(cfg, pdims, engine, batches, val_shards, model.flops_per_token(cfg.data.seq_len), choice)
    summary = finish(cfg, pdims, model, job, run_loop(job), export=False)
    return summary, _facts(model, optimizer)


def _facts(model, optimizer) -> dict:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    states = [v for st in optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor) and v.dim()]
    return {"fsdp_module": isinstance(model, FSDPModule),
            "dtensor_params": all(isinstance(p, DTensor) for p in model.parameters()),
            "dtensor_states": bool(states) and all(isinstance(v, DTensor) for v in states),
            "fused_or_foreach": {k: optimizer.defaults.get(k) for k in ("fused", "foreach")}}


def one_rank(rank: int, world: int, out: Path, data_dir: str, backend: str, precision: str) -> dict:
    """Rank body: init ``backend`` (gloo on CPU, nccl on CUDA), run full / stopped+resumed / plain runs."""
    import torch.distributed as dist

    from lmforge.config import DistributedConfig
    from lmforge.distributed.mesh import ParallelDims
    from tests.helpers.dist_runs import losses
    from tests.helpers.runs import tiny_cfg

    cuda = backend == "nccl"
    if cuda:
        torch.use_deterministic_algorithms(True)  # CUBLAS_WORKSPACE_CONFIG comes from the spawning test
        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group(backend, rank=rank, world_size=world, device_id=device if cuda else None)
    try:
        dcfg = DistributedConfig(strategy="zero3", dp_shard=1, backend=backend)
        pdims = ParallelDims.from_config(dcfg, 1, device=device)
        pdims.build_mesh()

        def cfg(name: str, resume=None, **training):
            return tiny_cfg(out / name, Path(data_dir), distributed=dcfg.model_dump(),
                            training={"device": device.type, "precision": precision, "max_steps": 6,
                                      "eval_every": 0, **training},
                            checkpoint={"every_steps": 0, "resume": resume},
                            logging={"log_every": 1, "tensorboard": False, "progress": False, "report": False})

        _, facts = fsdp_train(cfg("full"), pdims, device)
        part, _ = fsdp_train(cfg("part", stop_at_step=3), pdims, device)
        rest, _ = fsdp_train(cfg("part", resume="auto"), pdims, device)
        fsdp_train(cfg("plain"), pdims, device, fsdp=False)
    finally:
        dist.destroy_process_group()
    from lmforge.checkpoint import newest_valid, read_manifest

    return {"full": losses(out / "full"), "part": losses(out / "part"), "plain": losses(out / "plain"),
            "part_stop": part["stop_reason"], "resumed_from": rest["resumed_from"], **facts,
            "manifest": read_manifest(newest_valid(out / "part"))}
