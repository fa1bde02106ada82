"""Multi-process (gloo) equivalence, memory, checkpoint-resharding and failure tests for lmforge.distributed.

Each spawn runs several cases to amortise process start-up; every case must reproduce the single-process
run (same global batch, fp32, SGD+momentum, global-norm clipping) step for step.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from dist_train import STEPS, build, full_params, make_cfg, reference, train_steps  # noqa: E402
from dist_utils import run_ranks, spawn_ranks, wait_ranks  # noqa: E402

from lmforge.distributed.mesh import ParallelDims  # noqa: E402

TIMEOUT = 240
SPLIT = 3  # checkpoint after this many steps

WORLD2_CASES = {
    "ddp": dict(strategy="ddp"),
    "zero1": dict(strategy="zero1"),
    "zero2": dict(strategy="zero2"),
    "zero3": dict(strategy="zero3"),
    "zero3_offload": dict(strategy="zero3", cpu_offload=True),
    "tp": dict(strategy="zero3", dp_shard=1, tp=2),
    "ddp_accum": dict(strategy="ddp"),
    "zero3_accum": dict(strategy="zero3"),
    "pp_gpipe": dict(strategy="zero3", dp_shard=1, pp=2, pp_schedule="gpipe", pp_microbatches=2),
}
WORLD4_CASES = {
    "zero3_tp": dict(strategy="zero3", dp_shard=2, tp=2),
    "hsdp": dict(strategy="zero3", dp_replicate=2, dp_shard=2),
    "pp_1f1b_dp": dict(strategy="zero2", dp_shard=2, pp=2, pp_schedule="1f1b", pp_microbatches=2),
}


def _case(cfg, rank, world):
    pdims = ParallelDims.from_config(cfg.distributed, world, rank)
    pdims.build_mesh()
    return pdims


def _run_cases(rank, world, out, cases, ckpt_root):
    from lmforge.distributed.checkpoint import load_checkpoint, save_checkpoint
    from lmforge.distributed.mesh import destroy_distributed, init_distributed
    from lmforge.distributed.utils import local_state_bytes

    init_distributed(make_cfg(strategy="ddp"))
    results = {}
    for name, kw in cases.items():
        cfg = make_cfg(tie=not name.startswith("pp"), accum=2 if name.endswith("_accum") else 1, **kw)
        pdims = _case(cfg, rank, world)
        model, opt = build(cfg, pdims)
        res = train_steps(model, opt, pdims, cfg, 0, STEPS)
        res["params"], res["bytes"] = full_params(model), local_state_bytes(model, opt)
        results[name] = res
    if world == 2:  # save mid-run under zero3 and under zero1; resume the zero3 one as ddp
        for strategy in ("zero3", "zero1"):
            cfg = make_cfg(strategy=strategy)
            pdims = _case(cfg, rank, world)
            model, opt = build(cfg, pdims)
            train_steps(model, opt, pdims, cfg, 0, SPLIT)
            save_checkpoint(Path(ckpt_root) / strategy, SPLIT, model, opt, pdims=pdims,
                            loader_state={"samples": SPLIT * 4, "rank": rank})
        resume = {"ddp<-zero3": ("ddp", "zero3")}
    else:
        resume = {"zero3_tp<-zero3": ("zero3_tp", "zero3"), "zero1<-zero1": ("zero1", "zero1")}
    for name, (target, source) in resume.items():
        kw = {**WORLD4_CASES, **WORLD2_CASES, "zero1": dict(strategy="zero1")}[target]
        cfg = make_cfg(**kw)
        pdims = _case(cfg, rank, world)
        model, opt = build(cfg, pdims)
        info = load_checkpoint(Path(ckpt_root) / source / f"step_{SPLIT:07d}", model, opt, pdims=pdims)
        assert info["step"] == SPLIT
        train_steps(model, opt, pdims, cfg, SPLIT, STEPS)
        results[name] = {"params": full_params(model), "info": info}
    destroy_distributed()
    return results


@pytest.fixture(scope="module")
def ref():
    torch.manual_seed(0)
    return {"tied": reference(tie=True), "untied": reference(tie=False)}


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    out = tmp_path_factory.mktemp("w2")
    return run_ranks(_run_cases, 2, out, TIMEOUT, WORLD2_CASES, str(out / "ckpt")), out / "ckpt"


@pytest.fixture(scope="module")
def world4(tmp_path_factory, world2):
    out = tmp_path_factory.mktemp("w4")
    return run_ranks(_run_cases, 4, out, TIMEOUT * 2, WORLD4_CASES, str(world2[1]))


def _merged_params(results, name):
    merged = {}
    for r in results:  # pipeline stages each hold a part; others hold everything
        merged.update(r[name]["params"])
    return merged


def _assert_matches(ref_run, results, name, losses=True):
    got = _merged_params(results, name)
    assert set(got) == set(ref_run["params"]), f"{name}: parameter names differ"
    for k, v in ref_run["params"].items():
        torch.testing.assert_close(got[k], v, rtol=1e-4, atol=2e-5, msg=f"{name}: {k} differs")
    if losses:
        for r in results:
            assert r[name]["losses"] == pytest.approx(ref_run["losses"], rel=1e-5, abs=1e-6), name
            assert r[name]["norms"] == pytest.approx(ref_run["norms"], rel=1e-4), f"{name}: grad norms"


@pytest.mark.parametrize("name", list(WORLD2_CASES))
def test_two_ranks_match_single_process(ref, world2, name):
    run = ref["untied" if name.startswith("pp") else "tied"]
    results = world2[0]
    if name.startswith("pp"):  # only the last stage sees losses; both stages share the grad norm
        last = [r[name] for r in results if any(k.startswith("output") for k in r[name]["params"])]
        assert last[0]["losses"] == pytest.approx(run["losses"], rel=1e-5)
        _assert_matches(run, results, name, losses=False)
        for r in results:
            assert r[name]["norms"] == pytest.approx(run["norms"], rel=1e-4)
    else:
        _assert_matches(run, results, name)
    assert run["norms"][0] > 1.0  # clipping was active, so the global norm had to be right


@pytest.mark.parametrize("name", list(WORLD4_CASES))
def test_four_ranks_match_single_process(ref, world4, name):
    run = ref["untied" if name.startswith("pp") else "tied"]
    _assert_matches(run, world4, name, losses=not name.startswith("pp"))


def test_zero3_state_bytes_at_most_055_of_ddp(world2):
    for r in world2[0]:
        ddp, z3 = r["ddp"]["bytes"], r["zero3"]["bytes"]
        assert ddp["optimizer"] > 0
        assert z3["params"] + z3["optimizer"] <= 0.55 * (ddp["params"] + ddp["optimizer"]), (z3, ddp)
    zero1 = world2[0][0]["zero1"]["bytes"]
    assert zero1["optimizer"] <= 0.75 * world2[0][0]["ddp"]["bytes"]["optimizer"]


def test_resume_zero3_as_ddp(ref, world2):
    _assert_matches(ref["tied"], world2[0], "ddp<-zero3", losses=False)


def test_resume_two_to_four_ranks_with_tp_and_zero1(ref, world4):
    _assert_matches(ref["tied"], world4, "zero3_tp<-zero3", losses=False)
    _assert_matches(ref["tied"], world4, "zero1<-zero1", losses=False)
    assert all(r["zero3_tp<-zero3"]["info"]["resharded"] for r in world4)
    assert world4[3]["zero1<-zero1"]["info"]["loader"]["rank"] == 0  # new world size: rank 0's loader state


def test_resume_two_ranks_to_one_and_consolidate(ref, world2, tmp_path):
    from safetensors.torch import load_file

    from lmforge.distributed.checkpoint import consolidate, find_latest, load_checkpoint

    ckpt = find_latest(world2[1] / "zero3")
    assert ckpt is not None and ckpt.name == f"step_{SPLIT:07d}"
    assert not list(world2[1].glob("zero3/.tmp_*"))
    cfg = make_cfg(dp_shard=1)
    pdims = ParallelDims.from_config(cfg.distributed, 1)
    model, opt = build(cfg, pdims)
    info = load_checkpoint(ckpt, model, opt, pdims=pdims)
    assert info["resharded"] and info["loader"] == {"samples": SPLIT * 4, "rank": 0}
    at_split = {k: v.clone() for k, v in full_params(model).items()}
    train_steps(model, opt, pdims, cfg, SPLIT, STEPS)
    for k, v in ref["tied"]["params"].items():
        torch.testing.assert_close(full_params(model)[k], v, rtol=1e-4, atol=2e-5)
    flat = load_file(str(consolidate(ckpt, tmp_path / "model.safetensors")))
    assert set(flat) == set(at_split)
    for k, v in at_split.items():
        torch.testing.assert_close(flat[k], v)


def test_incomplete_checkpoint_is_rejected(tmp_path):
    from lmforge.distributed.checkpoint import find_latest, load_checkpoint

    (tmp_path / "step_0000005").mkdir()
    assert find_latest(tmp_path) is None
    cfg = make_cfg(dp_shard=1)
    model, opt = build(cfg, ParallelDims.from_config(cfg.distributed, 1))
    with pytest.raises(FileNotFoundError, match="COMPLETE"):
        load_checkpoint(tmp_path / "step_0000005", model, opt)


def _dies(rank, world, out):
    from lmforge.distributed.mesh import init_distributed

    sys.stderr = open(out / f"stderr_{rank}.txt", "w", buffering=1)
    init_distributed(make_cfg(strategy="ddp", timeout_s=3), heartbeat_interval_s=0.3)
    torch.distributed.barrier()
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)  # "computing" while the peer is gone: only the watchdog can notice


def test_killed_rank_fails_job_within_timeout(tmp_path):
    procs = spawn_ranks(_dies, 2, tmp_path)
    codes, waited = wait_ranks(procs, 45)
    assert codes[1] == -signal.SIGKILL
    assert codes[0] not in (0, None), codes
    assert waited < 40
    assert "rank 1" in (tmp_path / "stderr_0.txt").read_text()


@pytest.mark.parametrize("name,strategy,tp", [("ddp", "ddp", 1), ("zero1", "zero1", 1), ("zero2", "zero2", 1),
                                              ("zero3", "zero3", 1), ("tp", "zero3", 2)])
def test_estimator_state_terms_within_15_percent_of_measured(world2, name, strategy, tp):
    from lmforge.distributed.estimate import ModelShape, estimate

    shape = ModelShape.from_config(make_cfg().model)
    est = estimate(shape, strategy, 2, tp=tp, optimizer="sgd", momentum=0.9)
    measured = [r[name]["bytes"] for r in world2[0]]
    for term in ("params", "optimizer"):
        got = sum(m[term] for m in measured) / len(measured)  # zero1's greedy partition is uneven per rank
        assert got == pytest.approx(est[term], rel=0.15), (term, got, est[term])
