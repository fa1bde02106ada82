"""distributed.engine=deepspeed: config translation, the missing-package error, loss parity with lmforge's
native zero2 on 2 gloo ranks, and the one loop's guarantees through the DeepSpeed adapter (SIGTERM → checkpoint
and exit, time budget, resume, early stopping, the non-finite guard) (skipped when deepspeed is not installed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.ranks import run_ranks
from tests.helpers.runs import pack_tiny, tiny_cfg

from lmforge.config import ConfigError
from lmforge.distributed.deepspeed_engine import deepspeed_config, import_deepspeed, train_with_deepspeed  # noqa

pytestmark = pytest.mark.multiprocess

STEPS = 4


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return pack_tiny(tmp_path_factory.mktemp("data"))


def _cfg(run_dir, data_dir, **dist):
    # SGD without clipping: the loss trajectory depends on the gradient's scale (Adam + clipping would hide a
    # wrong normalisation)
    return tiny_cfg(run_dir, data_dir, training={"max_steps": STEPS, "eval_every": 0, "grad_clip": None},
                    optimizer={"name": "sgd", "lr": 0.5, "momentum": 0.9},
                    checkpoint={"every_steps": 2}, distributed={"strategy": "zero2", "engine": "deepspeed", **dist})


def test_missing_deepspeed_names_the_extra(tmp_path, data_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # makes `import deepspeed` raise ImportError
    with pytest.raises(ConfigError, match=r"pip install 'lmforge\[deepspeed\]'"):
        import_deepspeed()
    with pytest.raises(ConfigError, match=r"pip install 'lmforge\[deepspeed\]'"):
        train_with_deepspeed(_cfg(tmp_path, data_dir))


def test_deepspeed_config_translation(tmp_path, data_dir):
    ds = deepspeed_config(_cfg(tmp_path, data_dir, strategy="zero3"))
    assert ds["zero_optimization"] == {"stage": 3} and ds["gradient_clipping"] == 0.0
    cfg = _cfg(tmp_path, data_dir)
    cfg.training.grad_clip = 0.5
    assert deepspeed_config(cfg)["gradient_clipping"] == 0.5
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (2, 2)
    assert "bf16" not in ds and "fp16" not in ds
    cfg = _cfg(tmp_path, data_dir, strategy="ddp")
    cfg.training.precision, cfg.training.loss_scale_init, cfg.training.loss_scale_hysteresis = "fp16", 1024.0, 3
    ds = deepspeed_config(cfg)
    assert ds["zero_optimization"]["stage"] == 0
    assert ds["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 10, "loss_scale_window": 1000,
                          "hysteresis": 3, "min_loss_scale": 1.0}
    cfg.training.loss_scale_init = 1000.0
    with pytest.raises(ConfigError, match="power of two"):
        deepspeed_config(cfg)
    for dist, match in [({"tp": 2}, "distributed.tp=2 is not supported"), ({"cpu_offload": True}, "cpu_offload")]:
        with pytest.raises(ConfigError, match=match):
            deepspeed_config(_cfg(tmp_path, data_dir, **dist))


def _deepspeed_rank(rank, world, out, cfg_dict):
    from lmforge.config import build_config

    cfg = build_config(cfg_dict)
    summary = train_with_deepspeed(cfg)
    return {"summary": summary}


def _native_rank(rank, world, out, cfg_dict):
    """The same run through lmforge's own engine (native zero2): the one step and loop, no DeepSpeed."""
    from lmforge.config import build_config
    from lmforge.training.trainer import train

    cfg = build_config(cfg_dict)
    cfg.distributed.engine = "native"
    cfg.run_dir = str(out / "native_run")
    train(cfg)
    return {"losses": [r["loss"] for r in map(json.loads, (out / "native_run" / "metrics.jsonl").read_text()
                                                  .splitlines()) if "loss" in r]}


def test_deepspeed_engine_matches_native_zero2(tmp_path, data_dir):
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install 'lmforge[deepspeed]')")
    run_dir = tmp_path / "ds_run"
    cfg = _cfg(run_dir, data_dir)
    tree = cfg.model_dump(mode="json")
    res = run_ranks(_deepspeed_rank, 2, tmp_path / "ds", 120, tree)
    native = run_ranks(_native_rank, 2, tmp_path / "native", 120, tree)[0]["losses"]
    summary = res[0]["summary"]
    assert (summary["steps"], summary["zero_stage"], summary["world_size"]) == (STEPS, 2, 2)
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ds_losses = [r["loss"] for r in recs if "loss" in r]
    assert len(ds_losses) == STEPS and ds_losses[-1] < ds_losses[0]
    # Same fp32 math; only the reduction order differs (DeepSpeed's flat-bucket averaging vs FSDP2's
    # reduce-scatter of sum/N): observed ~1e-7 relative. A wrong normalisation (missing 1/accum, per-rank
    # mean) or DeepSpeed's implicit clip at 1.0 moves the loss by > 1e-2.
    assert ds_losses == pytest.approx(native, rel=1e-5)
    assert (run_dir / "checkpoints" / "step_0000002" / "COMPLETE").exists()
    assert (run_dir / "checkpoints" / f"step_{STEPS:07d}" / "COMPLETE").exists()
    from safetensors.torch import load_file

    weights = load_file(str(run_dir / "model.safetensors"))
    assert "tok_embeddings.weight" in weights and torch.isfinite(weights["tok_embeddings.weight"]).all()


def _ds_cli(run_dir: Path, data_dir: Path, extra: list[str]) -> list[str]:
    cfg = _cfg(run_dir, data_dir)
    cfg_path = run_dir.parent / f"{run_dir.name}.yaml"
    from lmforge.config import save_config

    save_config(cfg, cfg_path)
    return ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "lmforge", "train",
            "--config", str(cfg_path), *extra]


def test_deepspeed_engine_stops_on_sigterm_with_a_checkpoint_and_resumes(tmp_path, data_dir):
    """SIGTERM to every rank mid-run: the step finishes, all ranks agree, a checkpoint is written and the job
    exits 0; --resume auto continues to max_steps from that checkpoint."""
    import signal
    import time

    pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install 'lmforge[deepspeed]')")
    from tests.helpers.dist_runs import finish, popen

    run = tmp_path / "run"
    args = _ds_cli(run, data_dir, ["--training.max_steps=400", "--checkpoint.every_steps=0",
                                   "--logging.log_every=1"])
    log = tmp_path / "log.txt"
    proc = popen(args, log)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (run / "metrics.jsonl").exists():
        time.sleep(0.2)
    while time.monotonic() < deadline and len((run / "metrics.jsonl").read_text().splitlines()) < 3:
        time.sleep(0.2)
    ranks = [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
             .stdout.split()]
    assert len(ranks) == 2, ranks
    for pid in ranks:  # the scheduler's preemption signal reaches the training processes
        os.kill(pid, signal.SIGTERM)
    assert finish(proc, 120, log) == 0, log.read_text()[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stop_reason"] == "signal_SIGTERM" and 3 <= summary["steps"] < 400, summary
    ckpt_dir = Path(summary["final_checkpoint"])
    assert ckpt_dir.name == f"step_{summary['steps']:07d}" and (ckpt_dir / "COMPLETE").exists()
    proc = popen(_ds_cli(run, data_dir, [f"--training.max_steps={summary['steps'] + 2}", "--resume=auto"]), log)
    assert finish(proc, 120, log) == 0, log.read_text()[-3000:]
    again = json.loads((run / "summary.json").read_text())
    assert again["resumed_from"] == str(ckpt_dir) and again["steps"] == summary["steps"] + 2


def test_deepspeed_engine_honours_the_time_budget(tmp_path, data_dir):
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install 'lmforge[deepspeed]')")
    from tests.helpers.dist_runs import finish, popen

    run = tmp_path / "run"
    log = tmp_path / "log.txt"
    proc = popen(_ds_cli(run, data_dir, ["--training.max_steps=100000", "--training.max_minutes=0.05",
                                         "--optimizer.lr=0.01", "--checkpoint.every_steps=0"]), log)
    assert finish(proc, 180, log) == 0, log.read_text()[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stop_reason"] == "time_budget" and 1 <= summary["steps"] < 100000
    assert (Path(summary["final_checkpoint"]) / "COMPLETE").exists()
    assert summary["elapsed_s"] < 60


def test_deepspeed_engine_stops_early_when_the_metric_stalls(tmp_path, data_dir):
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install 'lmforge[deepspeed]')")
    from tests.helpers.dist_runs import finish, popen

    run = tmp_path / "run"
    log = tmp_path / "log.txt"
    proc = popen(_ds_cli(run, data_dir, ["--training.max_steps=40", "--training.eval_every=1",
                                         "--training.early_stop_metric=val_loss", "--training.early_stop_patience=2",
                                         "--training.early_stop_min_delta=0.5", "--optimizer.lr=1e-9",
                                         "--checkpoint.every_steps=0"]), log)
    assert finish(proc, 180, log) == 0, log.read_text()[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stop_reason"] == "early_stop" and summary["steps"] == 3, summary


def test_deepspeed_engine_skips_non_finite_steps_then_stops(tmp_path, data_dir):
    """lr 1e30: the first step blows the weights up, every later loss is non-finite. Those steps are skipped
    (the weights are not touched again) and after training.max_bad_steps the run stops, keeping the last
    good checkpoint."""
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install 'lmforge[deepspeed]')")
    from tests.helpers.dist_runs import finish, popen

    run = tmp_path / "run"
    log = tmp_path / "log.txt"
    proc = popen(_ds_cli(run, data_dir, ["--training.max_steps=40", "--training.max_bad_steps=2",
                                         "--optimizer.lr=1e30", "--optimizer.momentum=0", "--checkpoint.every_steps=1",
                                         "--logging.log_every=1"]), log)
    assert finish(proc, 180, log) == 0, log.read_text()[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["stop_reason"], summary["steps"], summary["skipped_steps"]) == ("non_finite", 3, 2), summary
    final = Path(summary["final_checkpoint"])
    assert final.name == "step_0000001"  # nothing is saved once the losses are non-finite
    from lmforge.checkpoint import full_weights

    assert all(torch.isfinite(w).all() for w in full_weights(final).values())
