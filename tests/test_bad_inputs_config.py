"""Configs through the real command line: schema errors and contradictions (exit 2, one error line naming the
key), valid-but-pointless settings (exit 0 with a warning line naming the key, ``config_checks.lint``), and
configs ``train`` refuses once it sees the data — none of them leaves a run folder."""

import pytest
import torch

from tests.helpers.bad_inputs import QUIET, TINY_MODEL, assert_user_error, case, packed_data, run_cli

torch.set_num_threads(1)

ERRORS = [
    case("bf16-params-fp32", ["--training.param_dtype=bfloat16", "--training.precision=fp32"],
         ["training.param_dtype=bfloat16 contradicts training.precision=fp32"]),
    case("bf16-params-fp16", ["--training.param_dtype=bfloat16", "--training.precision=fp16"],
         ["training.param_dtype=bfloat16 contradicts training.precision=fp16"]),
    case("early-stop-without-eval", ["--training.early_stop_metric=val_loss", "--training.eval_every=0"],
         ["training.early_stop_metric=val_loss needs periodic evaluation", "training.eval_every=0"]),
    case("heads-do-not-divide", ["--model.d_model=30"], ["model.d_model=30 must be divisible by model.n_heads=4"]),
    case("seq-len-over-max", ["--data.seq_len=1024"], ["data.seq_len=1024 exceeds model.max_seq_len=512"]),
    case("tp-zero", ["--distributed.tp=0"], ["distributed.tp=0 is invalid"]),
    case("max-steps-not-int", ["--training.max_steps=abc"], ["invalid value for 'training.max_steps': 'abc'"]),
    case("mlm-on-a-decoder", ["--training.objective=mlm"], ["training.objective=mlm needs an encoder"]),
    case("clm-on-an-encoder", ["--model.arch=bert", "--training.objective=clm"], ["model.arch=bert is an encoder"]),
    case("beta-of-1", ["--optimizer.betas=[0.9,1.0]"], ["optimizer.betas[1]=1.0 must be in [0, 1)"]),
    case("section-is-a-scalar", ["--config", "{d}/m.yaml"], ["m.yaml:1:8: invalid value for 'model': 3"]),
    case("top-level-list", ["--config", "{d}/l.yaml"], ["l.yaml:1:1: top level must be a mapping of sections"]),
]


@pytest.mark.parametrize("argv,needles", ERRORS)
def test_config_refuses_naming_the_key(tmp_path, capsys, argv, needles):
    (tmp_path / "m.yaml").write_text("model: 3\n")
    (tmp_path / "l.yaml").write_text("- a\n- b\n")
    code, err, out = run_cli(capsys, "config", *[a.format(d=tmp_path) for a in argv])
    assert_user_error(code, err, "config", *needles)
    assert out == ""  # no resolved config printed for a config that cannot run


WARNINGS = [
    case("warmup-past-the-end", ["--training.max_steps=50", "--training.eval_every=10", "--checkpoint.every_steps=10"],
         "scheduler.warmup_steps=100 > training.max_steps=50: the learning rate never reaches optimizer.lr"),
    case("eval-after-the-end", ["--training.max_steps=150", "--checkpoint.every_steps=10"],
         "training.eval_every=200 > training.max_steps=150: no periodic evaluation runs"),
    case("checkpoint-after-the-end", ["--training.max_steps=300"],
         "checkpoint.every_steps=500 > training.max_steps=300: only the final checkpoint is written"),
    case("keep-best-without-eval", ["--checkpoint.keep_best=2", "--training.eval_every=0"],
         "checkpoint.keep_best=2 but no periodic evaluation runs (training.eval_every=0)"),
    case("fp16-on-cpu", ["--training.precision=fp16", "--training.device=cpu"],
         "training.precision=fp16 on the CPU: fp16 matmuls are emulated there"),
]


@pytest.mark.parametrize("argv,warning", WARNINGS)
def test_pointless_settings_are_valid_with_one_warning(capsys, argv, warning):
    code, err, out = run_cli(capsys, "config", *argv)
    assert code == 0, err
    lines = [line for line in err.splitlines() if line.startswith("lmforge config: warning: ")]
    assert len(lines) == 1 and warning in lines[0], err
    assert out.startswith("run_dir: ")  # the resolved config is still printed


TRAIN = [
    case("vocab-smaller-than-data", ["--model.vocab_size=100"],
         ["model.vocab_size=100 is smaller than the data's tokenizer vocabulary"]),
    case("windows-longer-than-data", ["--model.max_seq_len=8192"], ["has", "tokens: too few for 1 rank(s)",
                                                                     "data.seq_len=8192"]),
    case("data-folder-missing", ["--data.path={d}/nope"], ["data.path=", "nope: no manifest.json there"]),
    case("bf16-params-fp32", ["--training.param_dtype=bfloat16", "--training.precision=fp32"],
         ["training.param_dtype=bfloat16 contradicts training.precision=fp32"]),
    case("early-stop-without-eval", ["--training.early_stop_metric=val_loss", "--training.eval_every=0"],
         ["training.early_stop_metric=val_loss needs periodic evaluation"]),
]


@pytest.mark.parametrize("argv,needles", TRAIN)
def test_train_refuses_before_any_run_folder_exists(tmp_path_factory, tmp_path, capsys, argv, needles):
    data = [f"--data.path={packed_data(tmp_path_factory)}"]
    code, err, _ = run_cli(capsys, "train", *data, f"--run_dir={tmp_path / 'run'}", *TINY_MODEL, *QUIET,
                           "--training.max_steps=1", *[a.format(d=tmp_path) for a in argv])
    assert_user_error(code, err, "train", *needles)
    assert not (tmp_path / "run").exists()
