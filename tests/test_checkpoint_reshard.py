"""lmforge.checkpoint across world sizes: resharding (zero3 → zero3 / ddp / zero1 / tp / pp at 2 ranks, 2 → 1,
2 → 4), the legacy fixtures on sharded ranks and the DeepSpeed hook on 2 ranks. Every case runs in one spawn
per world size (gloo ranks, hard timeout) and is checked here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers.ranks import run_ranks
from tests.fixtures.make_legacy_runs import tensor_sha256
from tests.helpers.checkpoints import (EXPECTED, FIX, SEQ, TIMEOUT, VOCAB, _assert_same, _cfg, _full_model,
                                     _named_optim, _plain, _step)

from lmforge.checkpoint import (CheckpointManager, DictState, RNGState, complete_folders, consolidate, full_weights,
                                load_model_weights, read_manifest, read_state)
from lmforge.config import load_config
from lmforge.models import build_model
from lmforge.training.optim import build_optimizer


# ------------------------------------------------------------------------------------------- multi-process


OPT = "adam"  # ZeroRedundancyOptimizer cannot rebuild AdamW (its groups' decoupled_weight_decay key)


def _dist_parts(cfg, rank: int, world: int, seed: int):
    from lmforge.distributed.mesh import ParallelDims
    from lmforge.distributed.parallelize import parallelize_model, shard_optimizer

    pdims = ParallelDims.from_config(cfg.distributed, world, rank)
    pdims.build_mesh()
    model = parallelize_model(build_model(cfg.model, seed=seed), pdims, cfg)
    return pdims, model, shard_optimizer(build_optimizer(model, cfg.optimizer), pdims, cfg)


def _dist_manager(run, pdims, model, opt, counters: dict, loader: dict):
    return CheckpointManager(run, model=model, optimizer=opt, pdims=pdims,
                             shared={"trainer": DictState(counters), "early_stop": None, "scaler": None,
                                     "master": None},
                             per_rank={"rng": RNGState(), "loader": DictState(loader)})


def _snapshot(model, opt, **extra) -> dict:
    return {"model": _full_model(model), "optim": _named_optim(model, opt), **extra}


def _slug(case: str) -> str:
    return case.replace("<-", "_from_")


def _fixture_cfg(run: str, **dist):
    cfg = load_config(FIX / run / "config.yaml")
    return cfg.model_copy(update={"distributed": _cfg(**dist).distributed})


LOADS = {  # case: (source run, distributed section, tied, model config source)
    "zero3<-zero3": ("zero3", dict(strategy="zero3"), True, None),
    "ddp<-zero3": ("zero3", dict(strategy="ddp"), True, None),
    "zero1<-zero3": ("zero3", dict(strategy="zero1"), True, None),
    "tp<-zero3": ("zero3", dict(strategy="zero3", dp_shard=1, tp=2), True, None),
    "pp<-zero3_untied": ("zero3_untied", dict(strategy="zero3", dp_shard=1, pp=2), False, None),
    "zero3<-zero1": ("zero1", dict(strategy="zero3"), True, None),
    "zero3<-legacy_dcp": (FIX / "zero3" / "checkpoints" / "step_0000002", dict(strategy="zero3"), True, "zero3"),
    "zero2<-legacy_single": (FIX / "single" / "checkpoints" / "step_0000002", dict(strategy="zero2"), True, "single"),
}


def _ranks_save_and_reshard(rank, world, out, loads):
    """Save zero3 / zero3-untied / zero1 checkpoints after one step, then load each case into fresh objects."""
    from datetime import timedelta

    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    res = {}
    for name, strategy, tie in (("zero3", "zero3", True), ("zero3_untied", "zero3", False), ("zero1", "zero1", True)):
        if world != 2:
            break
        pdims, model, opt = _dist_parts(_cfg(tie, opt=OPT, strategy=strategy), rank, world, seed=0)
        _step(model, opt, seed=10 + rank, rows=1)
        _dist_manager(out / name, pdims, model, opt, {"step": 1}, {"rank": rank}).save(1)
        res[f"saved/{name}"] = _snapshot(model, opt)
    for name, (source, dist_kw, tie, fixture) in loads.items():
        cfg = _fixture_cfg(fixture, **dist_kw) if fixture else _cfg(tie, opt=OPT, **dist_kw)
        pdims, model, opt = _dist_parts(cfg, rank, world, seed=7)
        counters, loader = {}, {}
        src = source if isinstance(source, Path) else out.parent / "w2" / source / "checkpoints" / "step_0000001"
        _dist_manager(out, pdims, model, opt, counters, loader).load(src)
        res[name] = _snapshot(model, opt, counters=counters, loader=loader)
        _dist_manager(out / "resaved" / _slug(name), pdims, model, opt, counters, loader).save(1)
    if world == 2:
        res["deepspeed"] = _deepspeed_round_trip(rank, world, out)
        res["resume"] = _resume_legacy_zero3(rank, out)
    dist.destroy_process_group()
    return res


class DeepSpeedAdapter:
    """The hook as the DeepSpeed engine adapter implements it: DeepSpeed's own files inside the folder."""

    def __init__(self, engine):
        self.engine = engine

    def save_checkpoint(self, folder: Path) -> None:
        self.engine.save_checkpoint(str(folder), tag="deepspeed")

    def load_checkpoint(self, folder: Path) -> None:
        self.engine.load_checkpoint(str(folder), tag="deepspeed")


def _deepspeed_round_trip(rank: int, world: int, out: Path) -> dict:
    """A real ZeRO-2 DeepSpeed engine: one step, a checkpoint through the manager and one in the old engine's
    layout (``engine.save_checkpoint(checkpoints/, tag=step_N)`` + COMPLETE), then a reload after zeroing."""
    import importlib

    import deepspeed
    import torch.distributed as dist

    from lmforge.distributed.mesh import ParallelDims

    # DeepSpeed JIT-builds a shared-memory all-reduce op for CPU worlds in a cache every venv on the machine
    # shares (so it is rebuilt, ~90 s, whenever another venv built it last); gloo's all-reduce serves here
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None

    cfg = _cfg(opt=OPT, strategy="zero2")
    model = build_model(cfg.model, seed=0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, cfg.optimizer), config={
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 2},
        "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9, "gradient_clipping": 0.0})
    engine.backward(engine(torch.randint(0, VOCAB, (1, SEQ))).float().square().mean())
    engine.step()
    saved = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    mgr = CheckpointManager(out / "ds", model=engine.module, engine=DeepSpeedAdapter(engine),
                            pdims=ParallelDims.from_config(cfg.distributed, world, rank))
    mgr.save(1)
    engine.save_checkpoint(str(out / "ds_old" / "checkpoints"), tag="step_0000001")
    dist.barrier()
    if rank == 0:
        (out / "ds_old" / "checkpoints" / "step_0000001" / "COMPLETE").write_text('{"step": 1}')
    with torch.no_grad():
        for p in engine.module.parameters():
            p.zero_()
    mgr.load("auto")
    reloaded = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    return {"saved": saved, "reloaded": reloaded}


def _resume_legacy_zero3(rank: int, out: Path) -> str | None:
    """Resume the fixture's 2-rank zero3 run from step 2 with ``train`` (None, or the error)."""
    import torch.distributed as dist

    from lmforge.training.trainer import train

    if rank == 0:
        shutil.copytree(FIX, out / "fx")
    dist.barrier()
    run = out / "fx" / "zero3"
    cfg = load_config(run / "config.yaml", [f"--run_dir={run}", f"--data.path={out / 'fx' / 'data'}",
                                            f"--checkpoint.resume={run / 'checkpoints' / 'step_0000002'}"])
    try:
        train(cfg)
    except Exception as e:  # noqa: BLE001 - reported by the test, not by the spawn
        return f"{type(e).__name__}: {e}"
    return None


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "w2"
    return out, run_ranks(_ranks_save_and_reshard, 2, out, TIMEOUT, LOADS, env={"LMFORGE_PEAK_FLOPS": "1e11"})


def _merged(results, case, part):
    got: dict = {}
    for r in results:  # pipeline stages and ZeRO-1 partitions each hold a part
        got.update(r[case][part])
    return got


def _assert_case(results, case, saved):
    want_model = {k: v for k, v in saved["model"].items() if k in _merged(results, case, "model")}
    assert len(want_model) >= 1
    _assert_same(_merged(results, case, "model"), want_model, f"{case}: weights")
    want_optim = {k: v for k, v in saved["optim"].items() if k.rsplit(".", 1)[0] in want_model}
    _assert_same(_merged(results, case, "optim"), want_optim, f"{case}: optimizer")


@pytest.mark.multiprocess
@pytest.mark.parametrize("case", [c for c in LOADS if "legacy" not in c])
def test_two_rank_checkpoints_reshard_across_strategies(world2, case):
    _, results = world2
    source = LOADS[case][0]
    saved = {"model": results[0][f"saved/{source}"]["model"], "optim": _merged(results, f"saved/{source}", "optim")}
    _assert_case(results, case, saved)
    assert [r[case]["loader"] for r in results] == [{"rank": 0}, {"rank": 1}]  # same world size: own rank file
    assert all(r[case]["counters"] == {"step": 1} for r in results)
    if case.startswith("pp"):
        assert len(results[0][case]["model"]) < len(saved["model"])  # each stage loaded only its part
    resaved = read_state(world2[0] / "resaved" / _slug(case))  # and saves from this layout again
    _assert_same(resaved["model"], {k: v for k, v in saved["model"].items() if k != "output.weight" or
                                    not torch.equal(v, saved["model"]["tok_embeddings.weight"])}, f"{case}: resaved")
    _assert_same({k[len("state."):]: v for k, v in resaved["optim"].items() if k.startswith("state.")},
                 saved["optim"], f"{case}: resaved optimizer")
    assert (resaved["manifest"]["world_size"], resaved["manifest"]["strategy"]) == (2, LOADS[case][1]["strategy"])


@pytest.mark.multiprocess
def test_legacy_fixtures_load_into_two_sharded_ranks(world2, tmp_path):
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    _, results = world2
    path = FIX / "zero3" / "checkpoints" / "step_0000002"
    dcp_to_torch_save(path, tmp_path / "all.pt")
    ref = torch.load(tmp_path / "all.pt", weights_only=False)
    optim = {k[len("state."):]: v for k, v in ref["optim"].items() if k.startswith("state.")}
    _assert_case(results, "zero3<-legacy_dcp", {"model": ref["model"], "optim": optim})
    assert [r["zero3<-legacy_dcp"]["loader"]["world_size"] for r in results] == [2, 2]
    single = FIX / "single" / "checkpoints" / "step_0000002"
    raw = torch.load(single / "state.pt", weights_only=False)
    names = [n for g in raw["optimizer"]["param_groups"] for n in g["param_names"]]
    ids = [i for g in raw["optimizer"]["param_groups"] for i in g["params"]]
    optim = {f"{n}.{k}": v for n, i in zip(names, ids) for k, v in raw["optimizer"]["state"][i].items()}
    weights = load_file(str(single / "model.safetensors"))
    _assert_case(results, "zero2<-legacy_single", {"model": {**weights, "output.weight": weights[
        "tok_embeddings.weight"]}, "optim": optim})
    assert all(r["zero2<-legacy_single"]["loader"]["world_size"] == 1 for r in results)


@pytest.mark.multiprocess
def test_two_ranks_to_one_process_and_the_readers(world2, tmp_path):
    from safetensors.torch import load_file

    out, results = world2
    saved = {"model": results[0]["saved/zero3"]["model"], "optim": _merged(results, "saved/zero3", "optim")}
    model, opt, _ = _plain(seed=3, opt=OPT)
    counters, loader = {}, {}
    CheckpointManager(out / "zero3", model=model, optimizer=opt,
                      shared={"trainer": DictState(counters), "early_stop": None, "scaler": None, "master": None},
                      per_rank={"rng": RNGState(), "loader": DictState(loader)}).load("auto")
    _assert_same(model.state_dict(), saved["model"], "2 → 1 weights")
    _assert_same(_named_optim(model, opt), saved["optim"], "2 → 1 optimizer")
    assert loader == {"rank": 0} and counters == {"step": 1}  # other world size: rank 0's file
    tied_once = {k: v for k, v in saved["model"].items() if k != "output.weight"}
    _assert_same(full_weights(out / "zero3"), tied_once, "full_weights")
    _assert_same(load_file(str(consolidate(out / "zero3", tmp_path / "m.safetensors"))), tied_once, "consolidate")
    fresh, _, _ = _plain(seed=4)
    assert load_model_weights(fresh, out / "zero3")["world_size"] == 2
    _assert_same(fresh.state_dict(), saved["model"], "load_model_weights")
    state = read_state(out / "zero3")
    assert state["rank0"]["loader"] == {"rank": 0} and state["shared"]["trainer"] == {"step": 1}
    _assert_same({k[len("state."):]: v for k, v in state["optim"].items() if k.startswith("state.")},
                 saved["optim"], "read_state")


@pytest.mark.multiprocess
def test_two_ranks_to_four(world2):
    out, results2 = world2
    loads = {"zero3x4<-zero3": ("zero3", dict(strategy="zero3"), True, None),
             "zero3_tp<-zero3": ("zero3", dict(strategy="zero3", dp_shard=2, tp=2), True, None)}
    results = run_ranks(_ranks_save_and_reshard, 4, out.parent / "w4", TIMEOUT, loads)
    saved = {"model": results2[0]["saved/zero3"]["model"], "optim": _merged(results2, "saved/zero3", "optim")}
    for case in loads:
        _assert_case(results, case, saved)
        assert all(r[case]["loader"] == {"rank": 0} for r in results)  # new world size: rank 0's state


@pytest.mark.multiprocess
def test_deepspeed_checkpoints_through_the_hook_and_zero_to_fp32(world2, tmp_path):
    from safetensors.torch import load_file

    out, results = world2
    saved = results[0]["deepspeed"]["saved"]
    for r in results:
        _assert_same(r["deepspeed"]["reloaded"], saved, "reloaded through engine.load_checkpoint")
    tied_once = {k: v for k, v in saved.items() if k != "output.weight"}
    new, old = out / "ds", out / "ds_old" / "checkpoints" / "step_0000001"
    assert read_manifest(complete_folders(new)[-1])["format"] == "deepspeed"
    for src in (new, old):
        _assert_same(full_weights(src), tied_once, f"full_weights {src}")
        _assert_same(load_file(str(consolidate(src, tmp_path / "ds.safetensors"))), tied_once, f"consolidate {src}")
    model, _, _ = _plain(seed=2)
    load_model_weights(model, new)
    _assert_same(model.state_dict(), saved, "load_model_weights")


@pytest.mark.multiprocess
def test_legacy_zero3_run_resumes_on_two_ranks(world2):
    from safetensors.torch import load_file

    out, results = world2
    assert results[0]["resume"] is None and results[1]["resume"] is None, results[0]["resume"]
    run = out / "fx" / "zero3"
    want = load_file(str(FIX / "zero3" / "model.safetensors"))  # the step-4 weights of the original run
    assert {k: tensor_sha256(v) for k, v in want.items()} == \
        {k: v for k, v in EXPECTED["zero3"]["step4_sha256"].items() if k != "output.weight"}
    got = full_weights(run / "checkpoints" / "step_0000004")
    assert got.keys() == want.keys()
    for k, v in want.items():  # the distributed loss moves from plain to fused cross-entropy: not bitwise
        torch.testing.assert_close(got[k], v, rtol=1e-6, atol=1e-6, msg=k)
    losses = {str(r["step"]): r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
              if "loss" in r}
    assert losses == pytest.approx(EXPECTED["zero3"]["losses"], rel=1e-6, abs=1e-6)
