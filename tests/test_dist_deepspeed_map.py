"""DeepSpeed scheduler / fp16 / misc blocks → lmforge config, checked against DeepSpeed itself when installed."""

import json
import math

import pytest
import torch

from lmforge.config import ConfigError
from lmforge.distributed.deepspeed_config import STATIC_SCALE_WINDOW, deepspeed_to_tree, load_deepspeed_config
from lmforge.training.schedule import lr_factor_fn

LR, N = 0.05, 60
SCHEDULES = {
    "WarmupLR": {"warmup_min_lr": 0.001, "warmup_max_lr": 0.02, "warmup_num_steps": 12},
    "WarmupDecayLR": {"warmup_max_lr": 0.02, "warmup_num_steps": 10, "warmup_type": "linear", "total_num_steps": N},
    "WarmupCosineLR": {"warmup_min_ratio": 0.1, "warmup_num_steps": 8, "cos_min_ratio": 0.05, "total_num_steps": N},
    "OneCycle": {"cycle_min_lr": 0.002, "cycle_max_lr": 0.03, "cycle_first_step_size": 10,
                 "cycle_second_step_size": 15, "decay_lr_rate": 0.5, "decay_step_size": 5, "cycle_momentum": False},
    "LRRangeTest": {"lr_range_test_min_lr": 0.001, "lr_range_test_step_size": 4, "lr_range_test_step_rate": 2.0,
                    "lr_range_test_staircase": True},
}


def _load(tmp_path, ds: dict, dp: int = 1, base=None):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": 4 * dp, **ds}, indent=2))
    return load_deepspeed_config(path, dp, base=base)


def _ds_lrs(typ: str, params: dict) -> list[float]:
    """DeepSpeed's own scheduler, with its iteration counter at s for lmforge step s."""
    lr_schedules = pytest.importorskip("deepspeed.runtime.lr_schedules", reason="deepspeed is not installed")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    sched = getattr(lr_schedules, typ)(opt, **params)
    out = []
    for s in range(N):
        sched.step(s)
        out.append(opt.param_groups[0]["lr"])
    return out


@pytest.mark.parametrize("typ", list(SCHEDULES))
def test_scheduler_blocks_reproduce_deepspeed(tmp_path, typ):
    cfg, _ = _load(tmp_path, {"optimizer": {"type": "SGD", "params": {"lr": LR}},
                              "scheduler": {"type": typ, "params": SCHEDULES[typ]}})
    assert cfg.scheduler.name == typ
    factor = lr_factor_fn(cfg.scheduler, cfg.optimizer.lr, cfg.training.max_steps)
    ours = [LR * factor(s) for s in range(N)]
    theirs = _ds_lrs(typ, {k: v for k, v in SCHEDULES[typ].items() if k != "total_num_steps" or typ != "WarmupLR"})
    assert ours == pytest.approx(theirs, rel=1e-9, abs=1e-12)


def test_scheduler_defaults_are_deepspeeds_not_lmforges(tmp_path):
    cfg, notes = _load(tmp_path, {"scheduler": {"type": "WarmupLR", "params": {"last_batch_iteration": -1}}},
                       base={"scheduler": {"name": "wsd", "params": {"decay_fraction": 0.3}}})
    assert cfg.scheduler.params == {"warmup_min_lr": 0.0, "warmup_num_steps": 1000, "warmup_type": "log"}
    assert cfg.scheduler.warmup_steps == 1000  # DeepSpeed's default, not lmforge's 100
    cfg, _ = _load(tmp_path, {"scheduler": {"type": "LRRangeTest"}})
    assert cfg.scheduler.params["lr_range_test_min_lr"] == 1e-3 and cfg.scheduler.params["lr_range_test_step_size"] \
        == 2000
    cfg, notes = _load(tmp_path, {"scheduler": {"type": "WarmupDecayLR", "params": {"warmup_num_steps": 5}}},
                       base={"training": {"max_steps": 77}})
    assert cfg.training.max_steps == 77 and any("spans training.max_steps" in n for n in notes)
    cfg, _ = _load(tmp_path, {"optimizer": {"type": "SGD", "params": {"lr": 0.1}}, "scheduler": {
        "type": "OneCycle", "params": {"cycle_min_lr": 0.01, "cycle_max_lr": 0.1, "cycle_min_mom": 0.8}}})
    assert cfg.scheduler.params["cycle_first_step_size"] == 2000  # SGD: DeepSpeed cannot cycle betas, no error


@pytest.mark.parametrize("sched,match", [
    ({"type": "OneCycle", "params": {"cycle_min_lr": 0.01, "cycle_max_lr": 0.1}}, "cycle_momentum=false"),
    ({"type": "OneCycle", "params": {"cycle_max_lr": 0.1, "cycle_momentum": False}}, "cycle_min_lr is required"),
    ({"type": "OneCycle", "params": {"cycle_min_lr": 0.01, "cycle_max_lr": 0.1, "cycle_momentum": False,
                                     "cycle_first_stair_count": 4}}, "cycle_first_stair_count > 0"),
    ({"type": "WarmupLR", "params": {"last_batch_iteration": 99}}, "last_batch_iteration=99"),
    ({"type": "WarmupLR", "params": {"warmup_type": "exp"}}, "warmup_type='exp'"),
    ({"type": "WarmupLR", "params": {"warmup_num_steps": 0}}, "warmup_num_steps' must be an integer ≥ 1"),
    ({"type": "Cyclic"}, "scheduler.type='Cyclic' is unknown"),
    ({"type": "WarmupCosineLR", "params": {"warmup_num_steps": 50, "total_num_steps": 20}},
     "total_num_steps must exceed warmup_num_steps"),
])
def test_invalid_scheduler_blocks_name_the_key(tmp_path, sched, match):
    with pytest.raises(ConfigError, match=match) as e:
        _load(tmp_path, {"optimizer": {"type": "AdamW"}, "scheduler": sched})
    assert "ds.json" in str(e.value)


def test_fp16_dynamic_loss_scale_maps_every_knob(tmp_path):
    cfg, notes = _load(tmp_path, {"fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 12,
                                           "loss_scale_window": 200, "hysteresis": 3, "min_loss_scale": 4,
                                           "auto_cast": False, "consecutive_hysteresis": False}})
    t = cfg.training
    assert (t.precision, t.loss_scale_init, t.loss_scale_window) == ("fp16", 4096.0, 200)
    assert (t.loss_scale_hysteresis, t.loss_scale_min) == (3, 4.0)
    assert any("fp32 parameters" in n for n in notes)
    cfg, _ = _load(tmp_path, {"fp16": {"enabled": True}})  # DeepSpeed's defaults
    t = cfg.training
    assert (t.loss_scale_init, t.loss_scale_window, t.loss_scale_hysteresis, t.loss_scale_min) == (2.0 ** 16, 1000, 2,
                                                                                                   1.0)


def test_fp16_static_loss_scale_never_changes(tmp_path):
    from lmforge.training.precision import make_loss_scaler

    cfg, notes = _load(tmp_path, {"fp16": {"enabled": True, "loss_scale": 128}})
    t = cfg.training
    assert (t.loss_scale_init, t.loss_scale_min, t.loss_scale_window) == (128.0, 128.0, STATIC_SCALE_WINDOW)
    scaler = make_loss_scaler(t)
    for overflow in [False] * 50 + [True, True, True] + [False] * 50:
        assert scaler.update(overflow) is None
        assert scaler.scale == 128.0
    assert any("static scale" in n for n in notes)


def test_disabled_fp16_block_means_fp32_and_knobs_are_not_applied(tmp_path):
    cfg, _ = _load(tmp_path, {"fp16": {"enabled": False, "initial_scale_power": 3}})
    assert cfg.training.precision == "fp32" and cfg.training.loss_scale_init == 2.0 ** 16


@pytest.mark.parametrize("fp16,match", [
    ({"enabled": True, "consecutive_hysteresis": True}, "consecutive_hysteresis"),
    ({"enabled": True, "loss_scale": -1}, "loss_scale' must be a number ≥ 0"),
    ({"enabled": True, "hysteresis": 0}, "fp16.hysteresis' must be an integer ≥ 1"),
    ({"enabled": True, "loss_scale_window": 2.5}, "loss_scale_window' must be an integer"),
    ({"enabled": True, "min_loss_scale": 0}, "min_loss_scale' must be > 0"),
    ({"enabled": True, "initial_scale_power": "16"}, "initial_scale_power' must be an integer"),
    ({"enabled": True, "fp16_master_weights_and_grads": True}, "fp16_master_weights_and_grads"),
])
def test_invalid_fp16_blocks(tmp_path, fp16, match):
    with pytest.raises(ConfigError, match=match):
        _load(tmp_path, {"fp16": fp16})
    with pytest.raises(ConfigError, match="both true"):
        deepspeed_to_tree({"train_batch_size": 2, "fp16": {"enabled": True}, "bf16": {"enabled": True}}, 1)


def test_other_blocks(tmp_path):
    cfg, notes = _load(tmp_path, {"communication_data_type": "bf16", "bf16": {"enabled": True,
                                  "immediate_grad_update": True}, "wandb": {"enabled": True, "project": "p"},
                                  "zero_optimization": {"stage": 1}, "gradient_clipping": 0}, dp=2)
    assert (cfg.distributed.reduce_dtype, cfg.distributed.strategy, cfg.training.precision) == ("bfloat16", "zero1",
                                                                                               "bf16")
    assert (cfg.logging.wandb, cfg.logging.wandb_project, cfg.training.grad_clip) == (True, "p", None)
    assert any("immediate_grad_update" in n for n in notes)
    for ds, match in [({"communication_data_type": "fp16"}, "communication_data_type='fp16'"),
                      ({"optimizer": {"type": "Lamb"}}, "optimizer.type='Lamb'"),
                      ({"optimizer": {"type": "Adam", "params": {"amsgrad": True}}}, "amsgrad"),
                      ({"zero_optimization": {"stage": 1, "offload_optimizer": {"device": "cpu"}}}, "stage 2 or 3"),
                      ({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}}, "nvme")]:
        with pytest.raises(ConfigError, match=match):
            deepspeed_to_tree({"train_batch_size": 2, **ds}, 1)
    tree, _ = deepspeed_to_tree({"train_batch_size": 2, "optimizer": {"type": "Adam", "params": {
        "adam_w_mode": False}}}, 1)
    assert tree["optimizer"]["name"] == "adam" and math.isclose(2, tree["training"]["micro_batch_size"])
    assert tree["training"]["grad_clip"] == 1.0  # absent gradient_clipping: DeepSpeed clips at 1.0
