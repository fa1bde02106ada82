"""End-to-end: the real CLI in subprocesses, on small real data."""

import json
import re
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("LMFORGE_DATA", REPO.parent / "shared" / "data"))


def lmforge(*args, cwd=None, timeout=300):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "lmforge", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env=env)


def test_help_lists_every_command():
    r = lmforge("--help")
    assert r.returncode == 0
    for cmd in ("quickstart", "train", "generate", "config", "data", "finetune", "evaluate", "estimate",
                "checkpoint", "hf"):
        assert cmd in r.stdout, cmd


def test_bad_config_exits_2_naming_key(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("optimizer:\n  lr: 1e-3\ntraining:\n  max_step: 10\n")
    r = lmforge("train", "--config", cfg)
    assert r.returncode == 2
    assert "training.max_step" in r.stderr and "did you mean 'training.max_steps'" in r.stderr
    assert "Traceback" not in r.stderr


def test_train_without_data_names_key(tmp_path):
    r = lmforge("train", "--model.preset=tiny", f"--run_dir={tmp_path / 'run'}")
    assert r.returncode == 2 and "data.path" in r.stderr


def test_quickstart_small(tmp_path):
    """The quickstart pipeline on 1 MB of stdlib and the tiny model: every artefact lands in the run folder."""
    run = tmp_path / "qs"
    r = lmforge("quickstart", "--run-dir", run, "--minutes", "0.15", "--corpus-mb", "1", "--prompt", "import ",
                "--model.preset=tiny", "--data.seq_len=64", "--training.micro_batch_size=4",
                "--training.eval_batches=2", "--training.precision=fp32")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    calibrated = re.search(r"calibrated: (\d+) optimizer steps .*measured (\d+) ms per optimizer step .* in fp32: "
                           r"requested", " ".join(r.stdout.split()))
    assert calibrated, r.stdout[-3000:]  # calibration says what it measured and in which precision
    for name in ("config.yaml", "metrics.jsonl", "tokenizer.json", "sample.txt", "summary.json"):
        assert (run / name).exists(), name
    assert any((run / "tensorboard").iterdir())
    summary = json.loads((run / "quickstart_summary.json").read_text())
    assert summary["steps"] > 0 and summary["val_loss"] > 0 and summary["val_ppl"] > 1
    assert (run / "sample.txt").read_text().startswith("import ")
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["model"]["vocab_size"] == 8192
    # the resolved config is a valid config
    r2 = lmforge("config", "--config", run / "config.yaml")
    assert r2.returncode == 0, r2.stderr
    # generation from the run folder is deterministic for a seed
    g1 = lmforge("generate", "--run", run, "--prompt", "def f(", "--max-new-tokens", "12", "--seed", "3")
    g2 = lmforge("generate", "--run", run, "--prompt", "def f(", "--max-new-tokens", "12", "--seed", "3")
    assert g1.returncode == 0, g1.stderr
    assert g1.stdout == g2.stdout and g1.stdout.startswith("def f(")


@pytest.mark.skipif(not (DATA / "tinyshakespeare" / "input.txt").exists(),
                    reason=f"shared data not found at {DATA} (set LMFORGE_DATA)")
def test_prepare_train_resume_generate_on_shakespeare(tmp_path):
    packed = tmp_path / "packed"
    r = lmforge("data", "prepare", "--input", DATA / "tinyshakespeare" / "input.txt", "--doc-mode", "paragraph",
                "--out", packed, "--vocab-size", "512")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert lmforge("data", "verify", packed).returncode == 0
    common = ["--model.preset=tiny", f"--data.path={packed}", "--data.seq_len=64", "--training.micro_batch_size=8",
              "--training.eval_every=10", "--training.eval_batches=2", "--checkpoint.every_steps=10",
              "--scheduler.warmup_steps=5", "--optimizer.lr=3e-3", f"--run_dir={tmp_path / 'run'}"]
    r = lmforge("train", *common, "--training.max_steps=20")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in rows if "loss" in x]
    assert losses[-1] < losses[0] - 0.5, losses
    # continue the same run to 30 steps from its newest checkpoint
    r = lmforge("train", *common, "--training.max_steps=30", "--resume", "auto")
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 30 and summary["resumed_from"]
    g = lmforge("generate", "--run", tmp_path / "run", "--prompt", "ROMEO:", "--max-new-tokens", "20")
    assert g.returncode == 0 and g.stdout.startswith("ROMEO:")


def test_deepspeed_json_then_overrides(tmp_path):
    """--deepspeed maps onto the native config; command-line overrides still win; bad keys are listed."""
    import argparse

    from lmforge.cli import _train_config
    from lmforge.config import ConfigError

    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_batch_size": 16, "train_micro_batch_size_per_gpu": 4, "gradient_clipping": 0.5,
                              "optimizer": {"type": "AdamW", "params": {"lr": 0.001}},
                              "zero_optimization": {"stage": 3}}))
    args = argparse.Namespace(config=None, deepspeed=str(ds), nproc=2)
    cfg = _train_config(args, ["--model.preset=tiny", "--optimizer.lr=0.002"])
    assert (cfg.training.micro_batch_size, cfg.training.grad_accum_steps) == (4, 2)  # 16 = 4 x 2 x 2 ranks
    assert cfg.training.grad_clip == 0.5 and cfg.distributed.strategy == "zero3"
    assert cfg.optimizer.lr == 0.002
    ds.write_text(json.dumps({"train_batch_size": 15, "train_micro_batch_size_per_gpu": 4,
                              "gradient_accumulation_steps": 2}))
    with pytest.raises(ConfigError, match="15"):
        _train_config(args, [])
    bad = lmforge("train", "--deepspeed", ds, "--model.preset=tiny")
    assert bad.returncode == 2 and "train_batch_size" in bad.stderr
