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


# ---------------------------------------------------------------------------------------------
# One loader, one error format for the three roots (train, data prepare, finetune)
# ---------------------------------------------------------------------------------------------

def _loaders():
    from lmforge.data.config import load_prepare_config
    from lmforge.finetune.config import load_finetune_config

    return {"train": load_config, "prepare": load_prepare_config, "finetune": load_finetune_config}


FT = "base:\n  path: x\ndata:\n  train: y\n"  # the smallest valid finetune file (4 lines)
PREP = "sources:\n  - path: a.txt\noutput:\n  dir: o\n"  # the smallest valid prepare file (4 lines)

LOCATED = [
    # (root, yaml, overrides, the exact error line; {f} is the file)
    ("train", "model:\n  preset: tiny\n  d_modle: 64\n", [],
     "{f}:3:3: unknown key 'model.d_modle'; did you mean 'model.d_model'?"),
    ("train", "optimizer:\n  lr: -1\n", [], "{f}:2:7: invalid value for 'optimizer.lr': -1 (Input should be "
     "greater than 0)"),
    ("train", "training:\n  precision: fp8\n", [], "{f}:2:14: invalid value for 'training.precision': 'fp8' "
     "(allowed: 'fp32', 'bf16' or 'fp16')"),
    ("train", "optimizer:\n  betas: [0.9, 1.5]\n", [], "{f}:2:16: optimizer.betas[1]=1.5 must be in [0, 1)"),
    ("train", "model:\n  preset: tinny\n", [], "{f}:2:11: invalid value for 'model.preset': 'tinny' (allowed: "
     "tiny, quickstart, bench-6l, llama-60m, llama-125m, llama-350m, llama-1b); did you mean 'tiny'?"),
    ("train", "distributed:\n  tp: 0\n", [], "{f}:2:7: distributed.tp=0 is invalid (use a positive degree or -1 "
     "to infer)"),
    ("train", "training:\n  max_steps: 5\n", ["--training.max_steps=0"], "command line: invalid value for "
     "'training.max_steps': 0 (Input should be greater than or equal to 1)"),
    ("train", "model:\n  preset: tiny\n", ["--data.seq_len=256"], "command line: data.seq_len=256 exceeds "
     "model.max_seq_len=128"),
    ("train", "model:\n  preset: tiny\ndata:\n  seq_len: 256\n", [], "{f}:4:12: data.seq_len=256 exceeds "
     "model.max_seq_len=128"),
    ("train", "trainin:\n  max_steps: 3\n", [], "{f}:1:1: unknown key 'trainin'; did you mean 'training'?"),
    ("prepare", "sources:\n  - path: a.txt\n    feild: text\noutput:\n  dir: o\n", [],
     "{f}:3:5: unknown key 'sources.0.feild'; did you mean 'sources.0.field'?"),
    ("prepare", "sources:\n  - path: a.txt\n  - path: b.txt\n    weight: -2\noutput:\n  dir: o\n", [],
     "{f}:4:13: invalid value for 'sources.1.weight': -2 (Input should be greater than 0)"),
    ("prepare", "prepare:\n  sources:\n    - {path: a.txt, doc_mode: page}\n  output:\n    dir: o\n", [],
     "{f}:3:31: invalid value for 'sources.0.doc_mode': 'page' (allowed: 'file', 'paragraph' or 'line')"),
    ("prepare", PREP, ["--clean.min_chars=9", "--clean.max_chars=4"],
     "command line: clean.min_chars=9 exceeds clean.max_chars=4"),
    ("prepare", "sources:\n  - path: a.txt\noutput:\n  seed: 3\n", [], "{f}:3:1: missing required key 'output.dir'"),
    ("prepare", PREP, ["--sources=[]"], "command line: sources: at least one source is required"),
    ("prepare", PREP, {"sources": [{"path": "a", "weight": 0}]}, "command line: invalid value for "
     "'sources.0.weight': 0 (Input should be greater than 0)"),
    ("finetune", FT + "method:\n  lora_rank: 4\n", [], "{f}:6:3: unknown key 'method.lora_rank'; did you mean "
     "'method.lora_r'?"),
    ("finetune", FT + "  max_len: 2\n", [], "{f}:5:12: invalid value for 'data.max_len': 2 (Input should be "
     "greater than or equal to 4)"),
    ("finetune", FT + "task: sft\ntrain:\n  metric: accuracy\n", [], "{f}:7:11: invalid value for "
     "'train.metric': 'accuracy' (allowed for task sft: ('val_loss',))"),
    ("finetune", FT + "distributed:\n  tp: 2\n", [], "{f}:6:7: distributed.tp=2 is not supported by finetune "
     "(data parallel only: ddp, zero2, zero3); set distributed.tp=1"),
    ("finetune", "base:\n  tokenizer: t\ndata:\n  train: y\n", [], "{f}:1:1: missing required key 'base.path'"),
    ("finetune", FT, ["--method.lora_rank=4"], "command line: unknown key 'method.lora_rank'; did you mean "
     "'method.lora_r'?"),
]


@pytest.mark.parametrize("root,text,overrides,line", LOCATED, ids=[f"{c[0]}-{i}" for i, c in enumerate(LOCATED)])
def test_error_names_file_line_column_or_command_line(tmp_path, root, text, overrides, line):
    p = _write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        _loaders()[root](p, overrides)
    assert line.format(f=p) in str(e.value).splitlines(), str(e.value)


@pytest.mark.parametrize("root", ["train", "prepare", "finetune"])
def test_file_problems_read_the_same_for_every_root(tmp_path, root):
    load = _loaders()[root]
    cases = [("tabs.yaml", "a:\n  b: 1\n   c: [1\n", "{f}:3:5: not valid YAML (mapping values are not allowed here)"),
             ("list.yaml", "- a\n- b\n", "{f}:1:1: top level must be a mapping of sections (section: / key: value "
              "lines), got a list"),
             ("bad.yaml", "zzz_section: 1\n", "{f}:1:1: unknown key 'zzz_section' (sections: ")]
    for name, text, want in cases:
        p = tmp_path / name
        p.write_text(text)
        with pytest.raises(ConfigError) as e:
            load(p, None)
        assert any(line.startswith(want.format(f=p)) for line in str(e.value).splitlines()), str(e.value)
    with pytest.raises(ConfigError, match=f"^config file not found: {tmp_path}/none.yaml$"):
        load(tmp_path / "none.yaml", None)
    with pytest.raises(ConfigError, match=f"^{tmp_path}: is a folder, not a config file$"):
        load(tmp_path, None)
    (tmp_path / "latin1.yaml").write_bytes(b"a: \xff\n")
    with pytest.raises(ConfigError, match="latin1.yaml: not UTF-8 text"):
        load(tmp_path / "latin1.yaml", None)


def test_cross_field_error_naming_two_found_keys_gets_the_file_only(tmp_path):
    p = _write(tmp_path, "model:\n  d_model: 100\n  n_heads: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value) == f"{p}: model.d_model=100 must be divisible by model.n_heads=3"


def test_format_without_file_keeps_the_source_label():
    from lmforge.data.config import build_prepare_config

    with pytest.raises(ConfigError) as e:
        build_prepare_config({"sources": [{"path": "x", "feild": 1}], "output": {"dir": "o"}}, source="quickstart")
    assert str(e.value) == "quickstart: unknown key 'sources.0.feild'; did you mean 'sources.0.field'?"
    with pytest.raises(ConfigError) as e:
        load_config(None, {"optimizer": {"lr": 0}})
    assert str(e.value) == "command line: invalid value for 'optimizer.lr': 0 (Input should be greater than 0)"
