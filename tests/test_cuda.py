"""The GPU path on a real CUDA device (every test is ``cuda``-marked: skipped without CUDA, run by
``pytest -m cuda`` and by ``benchmarks/gpu_suite.sh``).

- precision: bf16 and loss-scaled fp16 training through ``train()`` match fp32 within stated tolerances;
- attention: training takes a fused SDPA kernel (flash / memory-efficient / cuDNN), never the math path;
- optimizer: ``build_optimizer`` picks fused AdamW on CUDA and the fused kernel runs;
- compile: per-block ``torch.compile`` trains to eager's losses;
- FSDP2 zero3 on a real 1-rank NCCL group (``tests/helpers/fsdp_one_rank.py`` says why it is applied by hand
  at dp 1): save → resume → continue equals the uninterrupted run bitwise, deterministic algorithms on;
- generation: KV-cache decoding equals full recomputation;
- memory: the estimator within ±15% of ``torch.cuda.max_memory_allocated`` for four configs;
- host syncs: a step makes exactly one (the agreed flags read); any other raises under sync-debug "error".
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers.runs import pack_tiny, tiny_cfg

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda", 0)
FUSED_SDPA = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
              "_scaled_dot_product_cudnn_attention")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return pack_tiny(tmp_path_factory.mktemp("data"))


@pytest.fixture(autouse=True)
def _peak(monkeypatch):
    monkeypatch.setenv("LMFORGE_PEAK_FLOPS", "1e14")  # MFU lines need a peak; no probe inside tests


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _train(tmp_path: Path, data_dir: Path, name: str, **training) -> tuple[dict, list[dict]]:
    from lmforge.training.trainer import train

    cfg = tiny_cfg(tmp_path / name, data_dir, training={"device": CUDA.type, "max_steps": 6, "eval_every": 0,
                                                         **training}, checkpoint={"every_steps": 0})
    summary = train(cfg)
    return summary, [r for r in _records(tmp_path / name) if "loss" in r]


def test_bf16_and_fp16_steps_match_fp32(tmp_path, data_dir):
    """6 steps of the tiny Llama: bf16 autocast within 0.5% of fp32 per step, fp16 with dynamic loss scaling
    (no skipped step) within 0.2%; both really ran in low precision (not bitwise fp32)."""
    _, fp32 = _train(tmp_path, data_dir, "fp32", precision="fp32")
    _, bf16 = _train(tmp_path, data_dir, "bf16", precision="bf16")
    fp16_summary, fp16 = _train(tmp_path, data_dir, "fp16", precision="fp16", loss_scale_init=1024.0)
    ref = [r["loss"] for r in fp32]
    assert [r["loss"] for r in bf16] == pytest.approx(ref, rel=5e-3)
    assert [r["loss"] for r in fp16] == pytest.approx(ref, rel=2e-3)
    assert [r["loss"] for r in bf16] != ref and [r["loss"] for r in fp16] != ref
    assert fp16_summary["skipped_steps"] == 0 and all(r["loss_scale"] > 0 for r in fp16)
    assert all(r["mem_gb"] > 0 for r in bf16)


def _profiled_step(run) -> set[str]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run.one_step()
    return {e.key for e in prof.key_averages()}


def _run(precision: str = "bf16", **kw):
    from lmforge.training.synthetic import SyntheticRun, synthetic_config

    cfg = synthetic_config("tiny", vocab=512, seq_len=128, micro_batch=4, precision=precision,
                           d_model=256, n_heads=4, n_kv_heads=2, **kw)  # head dim 64
    return SyntheticRun(cfg, CUDA)


@pytest.mark.parametrize("precision,allowed", [("bf16", None), ("fp32", ("_scaled_dot_product_efficient_attention",))])
def test_training_takes_a_fused_sdpa_kernel(precision, allowed):
    """The forward and backward of every training step run a fused attention kernel (which one is printed);
    restricted to flash (bf16) or memory-efficient (fp32) alone the same step still runs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    run = _run(precision)
    ops = _profiled_step(run)
    fwd = [k for k in FUSED_SDPA if f"aten::{k}" in ops]
    bwd = [k for k in FUSED_SDPA if f"aten::{k}_backward" in ops]
    print(f"{precision}: forward {fwd}, backward {bwd}")
    assert fwd and bwd and set(fwd) == set(bwd), sorted(o for o in ops if "attention" in o)
    if allowed:
        assert fwd == list(allowed)
    only = SDPBackend.FLASH_ATTENTION if precision == "bf16" else SDPBackend.EFFICIENT_ATTENTION
    with sdpa_kernel([only]):
        out = run.one_step()
    assert out.finite and torch.isfinite(out.loss_sum).item()


def test_build_optimizer_picks_fused_adamw_on_cuda():
    run = _run()
    opt = run.engine.optimizer
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"] is True
    assert all(g["fused"] for g in opt.param_groups)
    assert "aten::_fused_adamw_" in _profiled_step(run)


def test_compiled_blocks_train_to_eager_losses(tmp_path, data_dir):
    """fp32 (no TF32), so compiled and eager must agree to 1e-4; bf16 compiled vs eager at the benchmark
    shape is gpu_mfu.py's loss check. The run stops at step 6 of 7 so no evaluation recompiles in eval mode."""
    runs = [_train(tmp_path, data_dir, name, precision="fp32", compile=c, max_steps=7, stop_at_step=6)[1]
            for name, c in (("eager", False), ("compiled", True))]
    assert [r["loss"] for r in runs[1]] == pytest.approx([r["loss"] for r in runs[0]], rel=1e-4)
    assert len(runs[1]) == 6


def test_fsdp2_zero3_nccl_one_rank_resume_matches_uninterrupted(tmp_path, data_dir):
    """A real 1-rank NCCL group; FSDP2 (bf16 MixedPrecisionPolicy) shards params and optimizer state; stop at
    step 3 → DCP checkpoint → resume → step 6 equals the uninterrupted losses exactly
    (``use_deterministic_algorithms(True)``, CUBLAS_WORKSPACE_CONFIG=:4096:8); the sharded run tracks the
    plain autocast run within bf16 tolerance."""
    from tests.helpers.fsdp_one_rank import one_rank
    from tests.helpers.ranks import run_ranks

    env = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8", "LMFORGE_PEAK_FLOPS": "1e14",
           "LMFORGE_CACHE": str(tmp_path / "cache")}
    (r,) = run_ranks(one_rank, 1, tmp_path / "ranks", 150, str(data_dir), "nccl", "bf16", env=env)
    assert r["fsdp_module"] and r["dtensor_params"] and r["dtensor_states"], r
    assert r["part_stop"] == "stop_at_step" and r["resumed_from"].endswith("step_0000003")
    assert r["part"] == r["full"] and sorted(r["full"]) == list(range(1, 7)), (r["part"], r["full"])
    steps = range(1, 7)
    assert [r["plain"][s] for s in steps] == pytest.approx([r["full"][s] for s in steps], rel=2e-2)


def test_kv_cache_generation_equals_full_recompute_on_cuda():
    from lmforge.config import ModelConfig
    from lmforge.models import build_model
    from lmforge.models.generate import generate

    cfg = ModelConfig(vocab_size=61, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=128,
                      max_seq_len=96, init_std=0.2)
    model = build_model(cfg, device=CUDA, seed=7).eval()

    def naive(prompt, n):
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(n):
                ids.append(int(model(torch.tensor([ids], device=CUDA))[0, -1].argmax()))
        return ids[len(prompt):]

    prompts = [[3, 14, 15, 9, 26, 5], [9], [10, 11, 12]]
    batched = generate(model, prompts, 20, temperature=0)
    assert batched == [naive(p, 20) for p in prompts]
    assert len(set(batched[0])) > 1


MEMORY_CONFIGS = [(4, "none"), (16, "none"), (16, "full"), (16, "selective")]


@pytest.mark.parametrize("micro,ac", MEMORY_CONFIGS)
def test_memory_estimator_within_15_percent_of_max_memory_allocated(micro, ac):
    """A 110M-parameter Llama (d 768, 12 layers, vocab 32000) at seq 1024 in bf16, eager."""
    from lmforge.distributed.estimate import ModelShape, estimate
    from lmforge.training.synthetic import SyntheticRun, release, synthetic_config

    release(CUDA)
    cfg = synthetic_config("llama-125m", vocab=32000, seq_len=1024, micro_batch=micro, precision="bf16", ac=ac)
    run = SyntheticRun(cfg, CUDA)
    measured = run.measure(warmup=1, steps=2).peak_bytes
    run.close()
    est = estimate(ModelShape.from_config(cfg.model), "ddp", 1, micro_batch=micro, seq_len=1024,
                   precision="bf16", activation_checkpointing=ac != "none", ac_selective=ac == "selective")
    print(f"micro {micro} ac {ac}: measured {measured / 2**30:.3f} GiB, estimate {est['total'] / 2**30:.3f} GiB "
          f"({est['total'] / measured:.3f}x)")
    assert est["total"] == pytest.approx(measured, rel=0.15)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_step_syncs_the_host_exactly_once(monkeypatch, precision):
    """Under ``torch.cuda.set_sync_debug_mode("error")`` any synchronising call raises; only the agreed
    flags read of ``TrainStep._agree`` runs with the mode off, and it runs once per step."""
    from lmforge.training import step as step_mod

    run = _run(precision)
    for _ in range(2):  # warm-up: lazy optimizer state, allocator, cuBLAS handles
        run.one_step()
    real, calls = step_mod.TrainStep._agree, []

    def agreed(self, *a, **kw):
        calls.append(1)
        torch.cuda.set_sync_debug_mode(0)
        try:
            return real(self, *a, **kw)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    monkeypatch.setattr(step_mod.TrainStep, "_agree", agreed)
    torch.cuda.set_sync_debug_mode("error")
    try:
        outs = [run.one_step() for _ in range(3)]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert len(calls) == 3 and all(o.finite for o in outs)
