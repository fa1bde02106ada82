"""``lint(cfg, device)``: warnings for valid but pointless configs, ConfigError for contradictions (both keys
named)."""

import pytest

from lmforge import config_checks
from lmforge.config import build_config
from lmforge.config_checks import lint
from lmforge.errors import ConfigError

SENSIBLE = {"training": {"max_steps": 1000, "eval_every": 200}, "scheduler": {"warmup_steps": 100},
            "checkpoint": {"every_steps": 500}}


def cfg_with(**sections):
    tree = {k: dict(v) for k, v in SENSIBLE.items()}
    for section, keys in sections.items():
        tree.setdefault(section, {}).update(keys)
    return build_config(tree)


def test_a_sensible_config_has_nothing_to_say():
    assert lint(cfg_with(), "cpu") == []
    assert lint(cfg_with(training={"precision": "fp16"}), "cuda") == []  # fp16 is fine on a GPU
    assert lint(cfg_with(training={"param_dtype": "bfloat16", "precision": "bf16"}), "cpu") == []


@pytest.mark.parametrize("sections,needle", [
    ({"scheduler": {"warmup_steps": 2000}}, "scheduler.warmup_steps=2000 > training.max_steps=1000"),
    ({"training": {"eval_every": 5000}}, "training.eval_every=5000 > training.max_steps=1000"),
    ({"checkpoint": {"every_steps": 1001}}, "checkpoint.every_steps=1001 > training.max_steps=1000"),
    ({"checkpoint": {"keep_best": 2}, "training": {"eval_every": 0}}, "checkpoint.keep_best=2 but no periodic"),
    ({"checkpoint": {"keep_best": 1}, "training": {"eval_every": 4000}}, "checkpoint.keep_best=1 but no periodic"),
], ids=["warmup", "eval_every", "every_steps", "keep_best-eval-off", "keep_best-eval-too-rare"])
def test_pointless_settings_warn_naming_the_keys(sections, needle):
    warnings = lint(cfg_with(**sections), "cpu")
    assert any(w.startswith(needle) for w in warnings), warnings


@pytest.mark.parametrize("has_bf16,advice", [(True, "use training.precision=bf16"),
                                              (False, "use training.precision=fp32"),
                                              (None, "where the CPU has AVX-512 BF16")])
def test_fp16_on_cpu_says_why_and_what_to_use(monkeypatch, has_bf16, advice):
    monkeypatch.setattr(config_checks, "cpu_has_bf16", lambda: has_bf16)
    (w,) = lint(cfg_with(training={"precision": "fp16"}), "cpu")
    assert w.startswith("training.precision=fp16 on the CPU: fp16 matmuls are emulated") and advice in w


def test_device_comes_from_training_device_when_not_given():
    assert lint(cfg_with(training={"precision": "fp16", "device": "cpu"}))
    assert not lint(cfg_with(training={"precision": "fp16", "device": "cuda"}))


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_bf16_params_with_other_precision_is_a_contradiction(precision):
    with pytest.raises(ConfigError, match=f"training.param_dtype=bfloat16 contradicts training.precision={precision}"):
        lint(cfg_with(training={"param_dtype": "bfloat16", "precision": precision}), "cpu")


def test_early_stop_without_evaluation_is_a_contradiction():
    with pytest.raises(ConfigError, match="training.early_stop_metric=val_loss needs periodic evaluation, but "
                                          "training.eval_every=0"):
        lint(cfg_with(training={"early_stop_metric": "val_loss", "eval_every": 0}), "cpu")
    assert lint(cfg_with(training={"early_stop_metric": "val_loss"}), "cpu") == []
