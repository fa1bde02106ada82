"""Bad flags and bad folders for the commands that read a run: ``generate``, ``estimate``, ``hf export|check``,
``checkpoint consolidate`` and ``train --resume``. Each case checks the exit code, the one error line (flag /
file / checkpoint / tensor), and that the run folder is unchanged and no output folder was left behind.
The checkpoint cases exercise the one fallback policy of ``lmforge.checkpoint`` (all-corrupt listing, shape
mismatch naming the tensors, the same newest-that-verifies choice for every reader)."""

import shutil

import pytest
import torch

from tests.helpers.bad_inputs import (QUIET, TINY_MODEL, assert_user_error, case, copy_of, packed_data, run_cli,
                        snapshot, tiny_run)
from lmforge.cli import main

torch.set_num_threads(1)
CKPT = "checkpoints/step_0000002"


def _corrupt(path):
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 1
    path.write_bytes(bytes(raw))


def _weights(ckpt):
    """The weights file of a checkpoint folder, whatever its format."""
    files = sorted(p for p in ckpt.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".distcp"))
    return files[0]


@pytest.fixture(scope="module")
def two_ckpts(tmp_path_factory):
    """A run with checkpoints at steps 1 and 2."""
    run = tmp_path_factory.mktemp("bad_inputs_two") / "run"
    assert main(["train", f"--data.path={packed_data(tmp_path_factory)}", f"--run_dir={run}", *TINY_MODEL, *QUIET,
                 "--training.max_steps=2", "--training.micro_batch_size=2", "--training.eval_every=0",
                 "--checkpoint.every_steps=1", "--checkpoint.keep_last=2", "--scheduler.warmup_steps=0"]) == 0
    return run


def _run_variant(tmp_path_factory, tmp_path, variant):
    """A copy of the tiny run with one thing broken (None: unchanged)."""
    run = copy_of(tiny_run(tmp_path_factory), tmp_path / "run")
    if variant == "no-checkpoints":
        shutil.rmtree(run / "checkpoints")
    elif variant == "no-tokenizer":
        (run / "config.yaml").write_text((run / "config.yaml").read_text().replace(
            str(packed_data(tmp_path_factory)), str(tmp_path / "gone")))
    elif variant == "bad-config":
        (run / "config.yaml").write_text("model:\n  d_model: [32\n")
    elif variant == "corrupt":
        _corrupt(_weights(run / CKPT))
    return run


# (case id, run variant, generate arguments, needles)
GENERATE = [
    case("repetition-penalty-0", None, ["--repetition-penalty", "0"],
         ["--repetition-penalty 0.0: must be a finite number > 0"]),
    case("repetition-penalty-nan", None, ["--repetition-penalty", "nan"], ["--repetition-penalty nan"]),
    case("top-p-above-1", None, ["--top-p", "1.5"], ["--top-p 1.5: must be in (0, 1]"]),
    case("top-k-negative", None, ["--top-k", "-3"], ["--top-k -3: must be >= 1"]),
    case("max-new-tokens-negative", None, ["--max-new-tokens", "-1"], ["--max-new-tokens -1: must be >= 1"]),
    case("temperature-inf", None, ["--temperature", "inf"], ["--temperature inf: must be a finite number >= 0"]),
    case("empty-prompt", None, ["--prompt", ""], ["a prompt encodes to zero tokens"]),
    case("prompt-too-long", None, ["--prompt", "the movie " * 40], ["the model's model.max_seq_len is 32"]),
    case("unexpected-argument", None, ["stray"], ["unexpected arguments stray"]),
    case("no-checkpoints", "no-checkpoints", [], ["no checkpoint in", "checkpoints"]),
    case("no-tokenizer", "no-tokenizer", [], ["no tokenizer.json in run folder", "gone"]),
    case("bad-run-config", "bad-config", [], ["config.yaml:3:1: not valid YAML"]),
    case("only-checkpoint-corrupt", "corrupt", [], ["step_0000002", "sha256"]),
    case("checkpoint-path-missing", None, ["--checkpoint", "{run}/checkpoints/step_0000099"],
         ["step_0000099", "does not exist"]),
]


@pytest.mark.parametrize("variant,extra,needles", GENERATE)
def test_generate_refuses_and_changes_nothing(tmp_path_factory, tmp_path, capsys, variant, extra, needles):
    run = _run_variant(tmp_path_factory, tmp_path, variant)
    before = snapshot(run)
    prompt = [] if "--prompt" in extra else ["--prompt", "the movie"]
    code, err, _ = run_cli(capsys, "generate", "--run", run, *prompt, *[a.format(run=run) for a in extra])
    assert_user_error(code, err, "generate", *needles)
    assert snapshot(run) == before


ESTIMATE = [
    case("world-size-negative", ["--world-size", "-1", "--model.vocab_size=100"], ["--world-size -1"]),
    case("budget-nan", ["--world-size", "2", "--model.vocab_size=100", "--budget-gb", "nan"], ["--budget-gb nan"]),
    case("data-path-missing", ["--world-size", "2", "--data.path={tmp}/nope"],
         ["no manifest.json in", "nope: no such folder"]),
    case("preset-typo", ["--world-size", "2", "--model.preset=tinny"], ["'model.preset': 'tinny'", "did you mean"]),
]


@pytest.mark.parametrize("argv,needles", ESTIMATE)
def test_estimate_refuses_the_flag_or_key(tmp_path, capsys, argv, needles):
    code, err, _ = run_cli(capsys, "estimate", *[a.format(tmp=tmp_path) for a in argv])
    assert_user_error(code, err, "estimate", *needles)


def _hf_folder(tmp_path, config_json):
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text(config_json)
    return d


def _a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    return tmp_path / "f"


HF = [
    case("check-no-model-type", lambda t, f: ["check", _hf_folder(t, "{}")], ["model_type None is not supported"]),
    case("check-missing-key", lambda t, f: ["check", _hf_folder(t, '{"model_type": "llama", "vocab_size": 9}')],
         ["config.json", "hidden_size"]),
    case("export-no-checkpoints", lambda t, f: ["export", _run_variant(f, t, "no-checkpoints"), t / "out"],
         ["no checkpoint in"]),
    case("export-not-a-run", lambda t, f: ["export", t, t / "out"], ["is not a run folder (no config.yaml)"]),
    case("export-out-is-a-file", lambda t, f: ["export", tiny_run(f), _a_file(t)], ["f: Not a directory"]),
    case("export-only-checkpoint-corrupt", lambda t, f: ["export", _run_variant(f, t, "corrupt"), t / "out"],
         ["step_0000002", "sha256"]),
]


@pytest.mark.parametrize("argv,needles", HF)
def test_hf_refuses_and_leaves_no_output_folder(tmp_path_factory, tmp_path, capsys, argv, needles):
    args = argv(tmp_path, tmp_path_factory)
    code, err, _ = run_cli(capsys, "hf", *args)
    assert_user_error(code, err, f"hf {args[0]}", *needles)
    assert not (tmp_path / "out").exists()


def test_consolidate_refuses_a_corrupt_checkpoint(tmp_path_factory, tmp_path, capsys):
    run = _run_variant(tmp_path_factory, tmp_path, "corrupt")
    code, err, _ = run_cli(capsys, "checkpoint", "consolidate", run / CKPT, "--out", tmp_path / "c.safetensors")
    assert_user_error(code, err, "checkpoint consolidate", "step_0000002", "sha256")
    assert not (tmp_path / "c.safetensors").exists()


# ------------------------------------------------------------------ one fallback policy (lmforge.checkpoint)

def test_resume_with_every_checkpoint_corrupt_stops_and_keeps_them(two_ckpts, tmp_path_factory, tmp_path, capsys):
    run = copy_of(two_ckpts, tmp_path / "run")
    for step in ("step_0000001", "step_0000002"):
        _corrupt(_weights(run / "checkpoints" / step))
    before = snapshot(run / "checkpoints")
    code, err, _ = run_cli(capsys, "train", f"--data.path={packed_data(tmp_path_factory)}", f"--run_dir={run}",
                           *TINY_MODEL, *QUIET, "--training.max_steps=4", "--training.micro_batch_size=2",
                           "--training.eval_every=0", "--scheduler.warmup_steps=0", "--resume", "auto")
    assert_user_error(code, err, "train", "step_0000001", "step_0000002")
    assert snapshot(run / "checkpoints") == before  # nothing deleted, nothing overwritten


def test_resume_from_another_shape_names_the_tensors(tmp_path_factory, tmp_path, capsys):
    run = copy_of(tiny_run(tmp_path_factory), tmp_path / "run")
    before = snapshot(run / "checkpoints")
    code, err, _ = run_cli(capsys, "train", f"--data.path={packed_data(tmp_path_factory)}", f"--run_dir={run}",
                           *TINY_MODEL, "--model.d_model=64", *QUIET, "--training.max_steps=4",
                           "--training.micro_batch_size=2", "--training.eval_every=0", "--resume", "auto")
    assert_user_error(code, err, "train", "tok_embeddings.weight", "32", "64")
    assert snapshot(run / "checkpoints") == before


@pytest.mark.parametrize("command", ["generate", "hf export"])
def test_every_reader_lists_each_checkpoint_when_none_verifies(two_ckpts, tmp_path, capsys, command):
    run = copy_of(two_ckpts, tmp_path / "run")
    for step in ("step_0000001", "step_0000002"):
        _corrupt(_weights(run / "checkpoints" / step))
    args = ["--run", run, "--prompt", "the"] if command == "generate" else [run, tmp_path / "out"]
    code, err, _ = run_cli(capsys, *command.split(), *args)
    assert_user_error(code, err, command, "step_0000001", "step_0000002")
    assert not (tmp_path / "out").exists()


def test_hf_export_falls_back_past_a_corrupt_newest_checkpoint_like_train(two_ckpts, tmp_path, capsys):
    run = copy_of(two_ckpts, tmp_path / "run")
    _corrupt(_weights(run / "checkpoints" / "step_0000002"))
    code, err, _ = run_cli(capsys, "hf", "export", run, tmp_path / "out")
    assert code == 0, err
    assert "step_0000002" in err and (tmp_path / "out" / "config.json").is_file()
