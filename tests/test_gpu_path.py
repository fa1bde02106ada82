"""The GPU path's CPU-checkable parts: the fused CE's chunk choice, the memory estimator against the peak of
live tensors of real steps (what ``max_memory_allocated`` counts on CUDA), FSDP2 on a 1-rank group through the
one step and checkpoint manager (gloo here; tests/test_cuda.py runs it on NCCL), and the GPU benchmark's and
suite's dry runs."""

from __future__ import annotations

import pytest
import torch

from lmforge.distributed.estimate import ModelShape, estimate
from lmforge.models.losses import chunk_rows, linear_cross_entropy
from lmforge.training.synthetic import SyntheticRun, synthetic_config
from tests.helpers.memory import tracked_peak

SHAPE = dict(d_model=256, n_layers=4, n_heads=8, n_kv_heads=2, ffn_hidden=704)
SEQ = 64


def test_chunk_rows_cpu_fixed_cuda_by_logits_bytes():
    assert chunk_rows(32000, "cpu") == 512
    assert chunk_rows(32000, "cuda") == 2048  # 2048 × 32000 × 4 B = 250 MiB of float32 logits
    assert chunk_rows(128256, "cuda") == 512
    assert chunk_rows(300, "cuda") % 128 == 0 and chunk_rows(300, "cuda") * 300 * 4 <= 256 * 2**20


def test_fused_ce_default_chunk_equals_explicit_chunk_on_cpu():
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(1100, 32, generator=g), torch.randn(64, 32, generator=g)
    y = torch.randint(0, 64, (1100,), generator=g)
    assert torch.equal(linear_cross_entropy(h, w, y), linear_cross_entropy(h, w, y, chunk_size=512))


@pytest.mark.parametrize("ac,micro,vocab", [("none", 1, 2048), ("none", 8, 2048), ("full", 8, 2048),
                                            ("selective", 8, 2048), ("full", 2, 2048), ("none", 4, 8192)])
def test_estimator_within_8_percent_of_live_tensor_peak(monkeypatch, ac, micro, vocab):
    """Real bf16 steps (build_engine + TrainStep, attention through SDPA as on CUDA): the estimator's peak is
    within 8% of the most bytes alive at once (a CPU stand-in for ``torch.cuda.max_memory_allocated``)."""
    import lmforge.models.common as common

    monkeypatch.setattr(common, "probs_attention_ok", lambda *a: False)  # the CPU-only kernel; CUDA takes SDPA
    torch.manual_seed(0)
    cfg = synthetic_config("tiny", vocab=vocab, seq_len=SEQ, micro_batch=micro, precision="bf16", ac=ac, **SHAPE)
    run = SyntheticRun(cfg, torch.device("cpu"))
    measured = tracked_peak(run, steps=1)  # one tracked step: bf16 may be emulated (slow) on this CPU
    est = estimate(ModelShape.from_config(cfg.model), "ddp", 1, micro_batch=micro, seq_len=SEQ, precision="bf16",
                   activation_checkpointing=ac != "none", ac_selective=ac == "selective", ce_chunk=512)
    assert est["total"] == pytest.approx(measured, rel=0.08), (est, measured)


@pytest.mark.multiprocess
def test_fsdp2_on_a_one_rank_gloo_group_resumes_exactly(tmp_path):
    """The CPU twin of the NCCL test in tests/test_cuda.py: FSDP2 really shards (DTensor params and optimizer
    state on the 1-rank mesh), stop at 3 → resume → 6 equals the uninterrupted losses bitwise, and the sharded
    run trains the plain single-process model (fp32: up to clipping-norm rounding)."""
    from tests.helpers.fsdp_one_rank import one_rank
    from tests.helpers.ranks import run_ranks
    from tests.helpers.runs import pack_tiny

    data = pack_tiny(tmp_path / "data")
    env = {"LMFORGE_PEAK_FLOPS": "1e11", "OMP_NUM_THREADS": "1", "LMFORGE_CACHE": str(tmp_path / "cache")}
    (r,) = run_ranks(one_rank, 1, tmp_path / "ranks", 240, str(data), "gloo", "fp32", env=env)
    assert r["fsdp_module"] and r["dtensor_params"] and r["dtensor_states"], r
    assert r["part_stop"] == "stop_at_step" and r["resumed_from"].endswith("step_0000003")
    assert r["manifest"]["format"] == "dcp"
    assert r["part"] == r["full"] and sorted(r["full"]) == list(range(1, 7))
    assert [r["plain"][s] for s in range(1, 7)] == pytest.approx([r["full"][s] for s in range(1, 7)], rel=1e-5)


def _bench(name: str, monkeypatch):
    """A benchmarks/ script as a module (its siblings import by bare name, so the folder goes on sys.path for
    this test only)."""
    import importlib

    from tests.helpers.paths import REPO

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    return importlib.import_module(name)


def test_gpu_mfu_backs_off_the_micro_batch_on_out_of_memory(monkeypatch):
    mfu = _bench("gpu_mfu", monkeypatch)
    tried = []

    def runner(v):
        tried.append(v.micro)
        if v.micro > 20:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return {"name": v.name, "micro": v.micro, "tokens_per_s": 1.0}

    v = mfu.Variant("lmforge eager", "lmforge", False, "none", 32, 1.0)
    row = mfu.attempt(v, runner, torch.device("cpu"))
    assert tried == [32, 27, 22, 18] and row["micro"] == 18 and "OOM at micro 32" in row["note"]
    broken = mfu.attempt(mfu.Variant("x", "hf", False, "none", 4, 1.0), lambda v: 1 / 0, torch.device("cpu"))
    assert broken["note"].startswith("FAILED ZeroDivisionError")


@pytest.mark.multiprocess
def test_gpu_suite_dry_run_runs_every_stage_and_summarises(tmp_path):
    """``bash benchmarks/gpu_suite.sh --dry-run`` on this CPU: env facts, the cuda tests (skipped here), the
    MFU benchmark (all six variants) and the estimator stage at the tiny shape, one summary table."""
    import json
    import os
    import subprocess

    from tests.helpers.paths import REPO

    env = dict(os.environ, OUT=str(tmp_path), OMP_NUM_THREADS="1", LMFORGE_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), "--dry-run"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    mfu = json.loads((tmp_path / "gpu_mfu.json").read_text())
    assert mfu["dry_run"] and mfu["complete"] and len(mfu["results"]) == 6, mfu
    assert all(r["tokens_per_s"] > 0 and r["mfu_pct"] > 0 for r in mfu["results"])
    assert {(r["lib"], r["compile"], r["ac"]) for r in mfu["results"]} == {
        ("lmforge", False, "none"), ("lmforge", True, "none"), ("lmforge", False, "selective"),
        ("lmforge", True, "selective"), ("hf", False, "none"), ("hf", True, "none")}
    memory = json.loads((tmp_path / "gpu_memory.json").read_text())
    assert len(memory["rows"]) == 4 and memory["complete"]
    summary = (tmp_path / "summary.txt").read_text()
    assert "DRY RUN" in summary and "pytest -m cuda" in summary and "skipped here" in summary
    assert json.loads((tmp_path / "env.json").read_text())["torch"]["version"] == torch.__version__
