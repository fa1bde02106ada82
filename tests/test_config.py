"""Config schema: bad configs name their key; the resolved config is itself a valid config."""

import pytest
import yaml

from lmforge.config import ConfigError, config_to_dict, load_config, parse_overrides, save_config


def _write(tmp_path, text: str):
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p


BAD_OVERRIDES = [
    # (overrides, substrings the message must contain)
    (["--optimizer.lrr=1e-3"], ["optimizer.lrr", "did you mean 'optimizer.lr'"]),
    (["--trainin.max_steps=3"], ["trainin", "did you mean 'training'"]),
    (["--training.precision=fp8"], ["training.precision", "'fp8'", "bf16"]),
    (["--training.max_steps=0"], ["training.max_steps", "0", "greater than or equal to 1"]),
    (["--training.micro_batch_size=two"], ["training.micro_batch_size", "'two'"]),
    (["--optimizer.name=adamx"], ["optimizer.name", "adamw"]),
    (["--optimizer.lr=-1"], ["optimizer.lr", "-1", "greater than 0"]),
    (["--optimizer.betas=[0.9,1.5]"], ["optimizer.betas[1]", "1.5"]),
    (["--model.d_model=100", "--model.n_heads=3"], ["model.d_model=100", "model.n_heads=3"]),
    (["--model.n_heads=4", "--model.n_kv_heads=3"], ["model.n_kv_heads=3"]),
    (["--model.preset=tinny"], ["model.preset", "did you mean 'tiny'"]),
    (["--scheduler.min_lr_ratio=2"], ["scheduler.min_lr_ratio", "2"]),
    (["--checkpoint.keep_last=0"], ["checkpoint.keep_last"]),
    (["--model.dropout=1.0"], ["model.dropout"]),
    (["--model.vocab_sise=100"], ["model.vocab_sise", "did you mean 'model.vocab_size'"]),
    (["--training.max_steps.x=1"], ["training.max_steps"]),
    (["--model.preset=tiny", "--data.seq_len=256"], ["data.seq_len=256", "model.max_seq_len=128"]),
]


@pytest.mark.parametrize("overrides,needles", BAD_OVERRIDES, ids=[o[0][0] for o in BAD_OVERRIDES])
def test_bad_override_names_key(overrides, needles):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    msg = str(e.value)
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"


def test_bad_yaml_file_names_file_and_key(tmp_path):
    p = _write(tmp_path, "model:\n  preset: tiny\noptimizer:\n  weight_decai: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(p) in str(e.value) and "optimizer.weight_decai" in str(e.value)
    assert "optimizer.weight_decay" in str(e.value)


def test_invalid_yaml_syntax_names_line(tmp_path):
    p = _write(tmp_path, "model:\n  d_model: 64\n   n_layers: [1\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert f"{p}:3" in str(e.value)


def test_top_level_not_mapping(tmp_path):
    p = _write(tmp_path, "- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(p)


def test_missing_file():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("/nonexistent/cfg.yaml")


def test_section_given_a_value():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["--model=3"])
    assert "'model'" in str(e.value)


def test_several_errors_reported_together():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["--optimizer.lr=0", "--training.seed=abc"])
    assert "optimizer.lr" in str(e.value) and "training.seed" in str(e.value)


def test_overrides_parse_types_and_forms():
    tree = parse_overrides(["--optimizer.lr=1e-3", "--training.max_steps", "7", "--training.grad_clip=null",
                            "--model.tie-embeddings=false"])
    assert tree == {"optimizer": {"lr": 1e-3}, "training": {"max_steps": 7, "grad_clip": None},
                    "model": {"tie_embeddings": False}}
    with pytest.raises(ConfigError, match="has no value"):
        parse_overrides(["--training.max_steps"])
    with pytest.raises(ConfigError, match="expected an override"):
        parse_overrides(["training.max_steps=3"])


def test_preset_then_override_and_file_then_cli(tmp_path):
    p = _write(tmp_path, "model:\n  preset: tiny\n  n_layers: 3\noptimizer:\n  lr: 0.01\n")
    cfg = load_config(p, ["--optimizer.lr=0.02"])
    assert cfg.model.d_model == 64 and cfg.model.n_layers == 3  # preset value, file override
    assert cfg.optimizer.lr == 0.02  # CLI beats file


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["--model.preset=tiny", "--training.max_steps=5", "--run_dir=" + str(tmp_path)])
    out = tmp_path / "config.yaml"
    save_config(cfg, out)
    again = load_config(out)
    assert config_to_dict(again) == config_to_dict(cfg)
    assert yaml.safe_load(out.read_text())["model"]["d_model"] == 64


def test_docs_config_reference_is_current():
    """docs/config.md is generated from the schema; regenerate with `lmforge config --reference > docs/config.md`."""
    from pathlib import Path

    from lmforge.config import reference_markdown

    doc = Path(__file__).resolve().parents[1] / "docs" / "config.md"
    assert doc.read_text(encoding="utf-8").strip() == reference_markdown().strip(), \
        "docs/config.md is stale: run `lmforge config --reference > docs/config.md`"
