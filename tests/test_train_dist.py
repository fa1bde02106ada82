"""`lmforge train` under every distributed strategy (gloo ranks on 127.0.0.1) against the single-process run
with the same global batch: per-step losses and final weights (fp32, SGD, clipping active) for Llama (every
strategy, TP, PP, offload, HSDP), GPT-2 and BERT (ddp / zero2 / zero3); per-rank state memory and the
estimator; resharding resumes 2→2 (zero3→ddp), 2→4 (→ zero2, → zero3 × tp) and 2→1; multi-process checkpoints
for inference and consolidation."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers.ranks import run_ranks
from tests.helpers.dist_runs import STEPS, losses, run_cfg, weights
from tests.helpers.runs import pack_tiny

pytestmark = pytest.mark.multiprocess

SPLIT = 3
PP2 = {"strategy": "zero3", "dp_shard": 1, "pp": 2, "pp_microbatches": 2}
WORLD2 = {  # name: (distributed section, rows per micro-batch, dp, reference model)
    "ddp": ({"strategy": "ddp"}, 1, 2, "tied"),
    "zero1": ({"strategy": "zero1"}, 1, 2, "tied"),
    "zero2": ({"strategy": "zero2"}, 2, 2, "tied"),
    "zero3": ({"strategy": "zero3"}, 1, 2, "tied"),
    "zero3_offload": ({"strategy": "zero3", "cpu_offload": True}, 1, 2, "tied"),
    "tp": ({"strategy": "zero3", "dp_shard": 1, "tp": 2}, 2, 1, "tied"),
    "pp": ({**PP2, "pp_schedule": "1f1b"}, 2, 1, "untied"),
    "pp_gpipe": ({**PP2, "pp_schedule": "gpipe"}, 2, 1, "untied"),
    **{f"{arch}_{s}": ({"strategy": s}, 1 if s != "zero2" else 2, 2, arch)
       for arch in ("gpt2", "bert") for s in ("ddp", "zero2", "zero3")},
}
WORLD4 = {
    "zero3_tp": ({"strategy": "zero3", "dp_shard": 2, "tp": 2}, 1, 2, "tied"),
    "hsdp": ({"strategy": "zero3", "dp_replicate": 2, "dp_shard": 2}, 1, 4, "tied"),
    "pp_1f1b_dp": ({"strategy": "zero2", "dp_shard": 2, "pp": 2, "pp_schedule": "1f1b", "pp_microbatches": 2},
                   2, 2, "untied"),
}


def _data_for(data: dict, ref: str) -> Path:
    return data["mlm" if ref == "bert" else "clm"]


def _ranks_body(rank, world, out, data, cases, resumes):
    """Every case is a full `train(cfg)`; the process group is created once and reused (train builds its mesh).
    ``resumes``: name → (source run folder copied first, distributed section, rows, dp)."""
    from datetime import timedelta

    import torch.distributed as dist

    from lmforge.training.trainer import train

    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    res = {}
    for name, (dcfg, rows, dp, ref, *extra) in cases.items():
        res[name] = train(run_cfg(out / name, _data_for(data, ref), dcfg, rows, ref, dp=dp,
                                  **(extra[0] if extra else {})))
    for name, (src, dcfg, rows, dp) in resumes.items():
        if rank == 0:
            shutil.copytree(src, out / name)
        dist.barrier()
        res[name] = train(run_cfg(out / name, data["clm"], dcfg, rows, dp=dp, checkpoint={"resume": "auto"}))
    dist.destroy_process_group()
    return res


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_dist")
    data = {"clm": pack_tiny(root / "data"), "mlm": pack_tiny(root / "data_mlm", mask=True)}
    from lmforge.training.trainer import train

    refs = {}
    for ref in ("tied", "untied", "gpt2", "bert"):
        refs[ref] = root / f"ref_{ref}"
        train(run_cfg(refs[ref], _data_for(data, ref), tied=ref))
    return root, data, refs


@pytest.fixture(scope="module")
def world2(setup):
    root, data, _ = setup
    out = root / "w2"
    part = ({"strategy": "zero3"}, 1, 2, "tied", {"training": {"stop_at_step": SPLIT}})
    cases = dict(WORLD2, zero3_part=part)
    resumes = {"ddp_from_zero3": (out / "zero3_part", {"strategy": "ddp"}, 2, 2)}
    return out, run_ranks(_ranks_body, 2, out, 240, data, cases, resumes, env={"LMFORGE_PEAK_FLOPS": "1e11"})


@pytest.fixture(scope="module")
def world4(setup, world2):
    root, data, _ = setup
    out = root / "w4"
    resumes = {"dp4_from_zero3": (world2[0] / "zero3_part", {"strategy": "zero2"}, 1, 4),
               "tp4_from_zero3": (world2[0] / "zero3_part", {"strategy": "zero3", "dp_shard": 2, "tp": 2}, 1, 2)}
    return out, run_ranks(_ranks_body, 4, out, 300, data, WORLD4, resumes, env={"LMFORGE_PEAK_FLOPS": "1e11"})


def _assert_run_matches(ref: Path, run: Path, steps=range(1, STEPS + 1)):
    want, got = losses(ref), losses(run)
    for s in steps:
        assert got[s] == pytest.approx(want[s], rel=1e-5), (run.name, s, got[s], want[s])
    w_ref, w_run = weights(ref), weights(run)
    assert set(w_ref) == set(w_run), run.name
    for k in w_ref:
        torch.testing.assert_close(w_run[k], w_ref[k], rtol=1e-4, atol=2e-5, msg=f"{run.name}: {k}")


def _norms(run: Path) -> list[float]:
    import json

    return [json.loads(x)["grad_norm"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


@pytest.mark.parametrize("name", list(WORLD2))
def test_two_ranks_match_single_process(setup, world2, name):
    _, _, refs = setup
    out, results = world2
    _assert_run_matches(refs[WORLD2[name][3]], out / name)
    assert all(r[name]["stop_reason"] == "max_steps" and r[name]["steps"] == STEPS for r in results)
    _, rows, dp, _ = WORLD2[name]
    if rows * dp == 2:  # the same validation windows as the reference (eval batch × dp ranks × eval_batches)
        assert results[0][name]["val_loss"] == pytest.approx(losses_val(refs[WORLD2[name][3]]), rel=1e-5)
    assert results[0][name]["val_loss"] == results[1][name]["val_loss"]  # every rank agrees
    assert _norms(out / name) == pytest.approx(_norms(refs[WORLD2[name][3]]), rel=1e-4)
    assert _norms(refs["tied"])[0] > 1.0  # clipping was active, so the global norm had to be right


def losses_val(run: Path) -> float:
    import json

    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if "val_loss" in x][-1]["val_loss"]


@pytest.mark.parametrize("name", list(WORLD4))
def test_four_ranks_match_single_process(setup, world4, name):
    _assert_run_matches(setup[2][WORLD4[name][3]], world4[0] / name)


def test_zero3_state_bytes_at_most_055_of_ddp(world2):
    for r in world2[1]:
        ddp, z3 = r["ddp"]["rank_state_bytes"], r["zero3"]["rank_state_bytes"]
        assert ddp["optimizer"] > 0
        assert z3["params"] + z3["optimizer"] <= 0.55 * (ddp["params"] + ddp["optimizer"]), (z3, ddp)
    zero1 = world2[1][0]["zero1"]["rank_state_bytes"]
    assert zero1["optimizer"] <= 0.75 * world2[1][0]["ddp"]["rank_state_bytes"]["optimizer"]


@pytest.mark.parametrize("name,strategy,tp", [("ddp", "ddp", 1), ("zero1", "zero1", 1), ("zero2", "zero2", 1),
                                              ("zero3", "zero3", 1), ("tp", "zero3", 2)])
def test_estimator_state_terms_within_15_percent_of_measured(world2, name, strategy, tp):
    from lmforge.config import load_config
    from lmforge.distributed.estimate import ModelShape, estimate

    shape = ModelShape.from_config(load_config(world2[0] / name / "config.yaml").model)
    est = estimate(shape, strategy, 2, tp=tp, optimizer="sgd", momentum=0.9)
    measured = [r[name]["rank_state_bytes"] for r in world2[1]]
    for term in ("params", "optimizer"):
        got = sum(m[term] for m in measured) / len(measured)  # zero1's greedy partition is uneven per rank
        assert got == pytest.approx(est[term], rel=0.15), (term, got, est[term])


def test_resume_zero3_as_ddp_and_on_four_ranks(setup, world2, world4):
    ref = setup[2]["tied"]
    assert world2[1][0]["zero3_part"]["stop_reason"] == "stop_at_step"
    for run, results in ((world2[0] / "ddp_from_zero3", world2[1]), (world4[0] / "dp4_from_zero3", world4[1]),
                         (world4[0] / "tp4_from_zero3", world4[1])):
        assert results[0][run.name]["resumed_from"].endswith(f"step_{SPLIT:07d}")
        _assert_run_matches(ref, run, steps=range(SPLIT + 1, STEPS + 1))


def test_resume_two_ranks_on_one_then_inference_and_consolidate(setup, world2, tmp_path):
    from lmforge import checkpoint as ckpt
    from lmforge.checkpoint import consolidate
    from lmforge.config import load_config
    from lmforge.models import build_model
    from lmforge.training.trainer import train

    root, data, refs = setup
    src = world2[0] / "zero3_part"
    dcp_ckpt = ckpt.newest_valid(src)
    assert ckpt.read_manifest(dcp_ckpt)["format"] == "dcp" and ckpt.read_manifest(dcp_ckpt)["world_size"] == 2
    # weights-only loading (what `lmforge generate` uses) and consolidation agree with the run's export
    model = build_model(load_config(src / "config.yaml").model)
    ckpt.load_model_weights(model, dcp_ckpt)
    flat = consolidate(dcp_ckpt, tmp_path / "merged.safetensors")
    from safetensors.torch import load_file

    merged, exported = load_file(str(flat)), weights(src)
    assert set(merged) == set(exported) == {k for k in ckpt.model_state(model)}
    for k, v in exported.items():
        assert torch.equal(merged[k], v) and torch.equal(ckpt.model_state(model)[k], v), k
    run = tmp_path / "one"
    shutil.copytree(src, run)
    summary = train(run_cfg(run, data["clm"], checkpoint={"resume": "auto"}))
    assert summary["resumed_from"].endswith(f"step_{SPLIT:07d}") and summary["steps"] == STEPS
    _assert_run_matches(refs["tied"], run, steps=range(SPLIT + 1, STEPS + 1))
    manifest = ckpt.read_manifest(ckpt.newest_valid(run))
    assert (manifest["format"], manifest["world_size"]) == ("dcp", 1)  # the one format at every world size


def test_corrupted_sharded_checkpoint_is_rejected(world2, tmp_path):
    from lmforge import checkpoint as ckpt
    from lmforge.config import load_config
    from lmforge.models import build_model

    run = tmp_path / "run"
    shutil.copytree(world2[0] / "zero3", run)
    path = ckpt.newest_valid(run)
    victim = sorted(path.glob("__*.distcp"))[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    model = build_model(load_config(run / "config.yaml").model)
    with pytest.raises(ckpt.CheckpointError, match="sha256"):
        ckpt.load_model_weights(model, path)
