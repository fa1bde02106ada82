"""DeepSpeed JSON → lmforge config mapping."""

import json

import pytest

from lmforge.config import ConfigError
from lmforge.distributed.deepspeed_config import deepspeed_to_tree, load_deepspeed_config, resolve_batch

FULL = {
    "train_batch_size": 64, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 4,
    "bf16": {"enabled": True}, "fp16": {"enabled": False, "loss_scale": 0},
    "optimizer": {"type": "AdamW", "params": {"lr": 6e-4, "betas": [0.9, 0.95], "eps": 1e-8,
                                              "weight_decay": 0.1, "torch_adam": True}},
    "scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": 2000, "warmup_num_steps": 50,
                                                       "cos_min_ratio": 0.1, "warmup_type": "linear"}},
    "gradient_clipping": 1.0,
    "zero_optimization": {"stage": 3, "overlap_comm": True, "offload_optimizer": {"device": "cpu"},
                          "offload_param": {"device": "cpu", "pin_memory": True}},
    "activation_checkpointing": {"partition_activations": False},
    "steps_per_print": 25, "tensorboard": {"enabled": True, "output_path": "tb"},
    "wandb": {"enabled": False}, "wall_clock_breakdown": False,
}


def test_full_file_maps_every_block(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(FULL))
    cfg, notes = load_deepspeed_config(path, dp_size=4, base={"model": {"preset": "tiny"}})
    t, o, s, d = cfg.training, cfg.optimizer, cfg.scheduler, cfg.distributed
    assert (t.micro_batch_size, t.grad_accum_steps, t.precision, t.grad_clip) == (4, 4, "bf16", 1.0)
    assert (t.max_steps, t.activation_checkpointing) == (2000, True)
    assert (o.name, o.lr, o.betas, o.weight_decay) == ("adamw", 6e-4, (0.9, 0.95), 0.1)
    assert (s.name, s.warmup_steps) == ("WarmupCosineLR", 50)
    assert s.params == {"warmup_min_ratio": 0.0, "warmup_num_steps": 50, "cos_min_ratio": 0.1,
                        "warmup_type": "linear", "total_num_steps": 2000}
    assert (d.strategy, d.cpu_offload) == ("zero3", True)
    assert (cfg.logging.log_every, cfg.logging.tensorboard) == (25, True)
    assert cfg.model.d_model == 64  # base kept
    assert any("overlap_comm" in n for n in notes) and any("torch_adam" in n for n in notes)


@pytest.mark.parametrize("train,micro,gas,dp,expect", [
    (64, 4, None, 4, (64, 4, 4)), (64, None, 2, 4, (64, 8, 2)), (None, 4, 2, 4, (32, 4, 2)),
    (32, None, None, 4, (32, 8, 1)), (None, 3, None, 2, (6, 3, 1)), (24, 3, 2, 4, (24, 3, 2)),
])
def test_batch_rule_derives_the_missing_value(train, micro, gas, dp, expect):
    assert resolve_batch(train, micro, gas, dp) == expect


def test_inconsistent_batch_triple_shows_arithmetic():
    with pytest.raises(ConfigError, match=r"train_batch_size=64 != .*4 × .*2 × data-parallel size=4 \(= 32\)"):
        resolve_batch(64, 4, 2, 4)
    with pytest.raises(ConfigError, match="inconsistent"):
        resolve_batch(10, 4, None, 4)  # 10 // 4 // 4 = 0 accumulation steps
    with pytest.raises(ConfigError, match="needs train_batch_size or train_micro"):
        resolve_batch(None, None, 4, 2)


def test_unknown_keys_reported_together():
    bad = {"train_batch_size": 8, "zero_optimisation": {}, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3,
           "betaz": [0.9, 0.9]}}, "zero_optimization": {"stage": 2, "stage4_magic": 1},
           "fp16": {"enabled": True, "consecutive_hysteresis": True, "loss_scael": 0},  # also a semantic error
           "bf16": {"enabeld": False}, "scheduler": {"type": "OneCycle", "params": {"cycle_max_lr": 1, "cyle_min": 0}}}
    with pytest.raises(ConfigError) as e:
        deepspeed_to_tree(bad, 1)
    msg = str(e.value)
    assert msg.count("\n") == 0 and msg.startswith("unknown deepspeed config keys")
    for k in ("zero_optimisation", "optimizer.params.betaz", "zero_optimization.stage4_magic", "fp16.loss_scael",
              "bf16.enabeld", "scheduler.params.cyle_min"):
        assert k in msg


def test_invalid_json_names_file_and_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{\n  "train_batch_size": 8,\n  "bf16": {enabled: true}\n}')
    with pytest.raises(ConfigError, match=r"bad.json:3:\d+: not valid JSON"):
        load_deepspeed_config(path, 1)


def test_estimate_cli_recommends_a_fitting_setup(capsys):
    from lmforge.distributed.estimate import GiB, ModelShape, estimate, estimate_main, recommend

    args = ["--world-size", "8", "--model.preset=llama-1b", "--model.vocab_size=32000", "--data.seq_len=2048",
            "--training.precision=bf16", "--training.micro_batch_size=4"]
    assert estimate_main(args + ["--budget-gb", "16"]) == 0
    out = capsys.readouterr().out
    assert "zero3+offload" in out and "recommended for 16.0 GiB" in out
    assert estimate_main(args + ["--budget-gb", "0.01"]) == 1
    from lmforge.config import build_config

    shape = ModelShape.from_config(build_config({"model": {"preset": "llama-1b", "vocab_size": 32000}}).model)
    rec = recommend(shape, 8, 16, seq_len=2048, micro_batch=4, precision="bf16")
    assert rec["estimate"]["total"] <= 16 * GiB
    ddp = estimate(shape, "ddp", 8, micro_batch=4, seq_len=2048)
    z3 = estimate(shape, "zero3", 8, micro_batch=4, seq_len=2048)
    assert z3["params"] == pytest.approx(ddp["params"] / 8) and z3["optimizer"] == pytest.approx(ddp["optimizer"] / 8)
    ac = estimate(shape, "zero3", 8, micro_batch=4, seq_len=2048, activation_checkpointing=True)
    assert ac["activations"] < 0.5 * z3["activations"]
