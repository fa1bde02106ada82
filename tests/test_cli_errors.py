"""One error policy for every command (``lmforge.cli.main``): a user error is one ``lmforge CMD: error: ...``
line (plus ``hint:``) and exit 2, never a traceback; an internal error is a traceback and exit 1;
``LMFORGE_DEBUG=1`` shows the traceback always. Each case runs the real command line in-process."""

import errno
import json
import os
import random
import subprocess
import sys

import pytest
import torch

import lmforge.cli as cli

torch.set_num_threads(1)


def run_cli(capsys, *args) -> tuple[int, str]:
    try:
        code = cli.main([str(a) for a in args])
    except SystemExit as e:  # argparse usage errors
        code = e.code
    return code, capsys.readouterr().err


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if ": error: " in line]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Inputs shared by the cases: configs, a packed data folder, a tiny lmforge run, fine-tuning files."""
    from lmforge.config import Config, DataConfig, ModelConfig, save_config
    from lmforge.data.tokenizer import train_tokenizer
    from lmforge.models import build_model
    from lmforge.checkpoint import CheckpointManager

    d = tmp_path_factory.mktemp("cli")
    (d / "bad_syntax.yaml").write_text("model:\n  d_model: 64\n   n_layers: [1\n")
    (d / "typo.yaml").write_text("model:\n  preset: tiny\noptimizer:\n  weight_decai: 0.1\n")
    (d / "prep_typo.yaml").write_text("sources:\n  - path: a.txt\n    feild: text\noutput:\n  dir: o\n")
    (d / "a_file").write_text("x")
    rng = random.Random(0)
    words = ["the", "movie", "plot", "actor", "scene", "great", "awful", "film"]
    texts = [" ".join(rng.choices(words, k=8)) for _ in range(200)]
    (d / "corpus.txt").write_text("\n\n".join(texts))
    tok = train_tokenizer(texts, vocab_size=300)
    run = d / "run"
    run.mkdir()
    tok.save(run / "tokenizer.json")
    mc = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=1, n_heads=4, max_seq_len=64)
    save_config(Config(run_dir=str(run), model=mc, data=DataConfig(path=None)), run / "config.yaml")
    CheckpointManager(run, model=build_model(mc, seed=0)).save(1)
    rows = ["sentence\tlabel"] + [f"{t}\t{int('great' in t)}" for t in texts[:60]]
    (d / "train.tsv").write_text("\n".join(rows) + "\n")
    (d / "dev_bad_label.tsv").write_text("sentence\tlabel\nthe film\t7\n")
    (d / "train.conll").write_text("the O\nmovie B-MISC\nplot\n\nfilm O\n")
    (d / "bad_metric.yaml").write_text(f"base:\n  path: {run}\ndata:\n  train: {d / 'train.tsv'}\n"
                                       f"train:\n  metric: f2\nrun_dir: {d / 'ft_bad_metric'}\n")
    hf = d / "hf_bad"
    hf.mkdir()
    (hf / "config.json").write_text("{not json")
    (d / "nonempty").mkdir()
    (d / "nonempty" / "x").write_text("x")
    packed = d / "packed"
    assert cli.main(["data", "prepare", "--input", str(d / "corpus.txt"), "--doc-mode", "paragraph", "--out",
                     str(packed), "--vocab-size", "300"]) == 0
    bad_manifest = d / "bad_manifest"
    bad_manifest.mkdir()
    (bad_manifest / "manifest.json").write_text('{"format_version": 1,\n "dtype": }')
    return d


def _ft(d, train, *more, run_dir="ft"):
    return ["finetune", f"--base.path={d / 'run'}", f"--data.train={d / train}", f"--run_dir={d / run_dir}",
            "--train.max_steps=1", *more]


# (case id, argv builder taking the fixture folder, substring of the one error line)
CASES = [
    ("train-missing-config", lambda d: ["train", "--config", d / "none.yaml"], "config file not found"),
    ("train-bad-yaml", lambda d: ["train", "--config", d / "bad_syntax.yaml"], "bad_syntax.yaml:3:12: not valid YAML"),
    ("train-yaml-typo", lambda d: ["train", "--config", d / "typo.yaml"],
     "typo.yaml:4:3: unknown key 'optimizer.weight_decai'; did you mean 'optimizer.weight_decay'?"),
    ("train-override-typo", lambda d: ["train", "--optimizer.lrr=1"], "command line: unknown key 'optimizer.lrr'"),
    ("train-nproc-0", lambda d: ["train", "--nproc", "0"], "--nproc 0"),
    ("train-nproc-negative", lambda d: ["train", "--nproc", "-2"], "--nproc -2"),
    ("train-bad-override-form", lambda d: ["train", "training.max_steps=3"], "expected an override"),
    ("train-no-data", lambda d: ["train", f"--run_dir={d / 'r_nodata'}", "--model.preset=tiny"],
     "data.path is not set"),
    ("config-bad-value", lambda d: ["config", "--training.max_steps=0"],
     "command line: invalid value for 'training.max_steps': 0"),
    ("generate-top-p-0", lambda d: ["generate", "--run", d / "run", "--prompt", "a", "--top-p", "0"], "--top-p 0"),
    ("generate-temp-neg", lambda d: ["generate", "--run", d / "run", "--prompt", "a", "--temperature", "-1"],
     "--temperature -1"),
    ("generate-temp-nan", lambda d: ["generate", "--run", d / "run", "--prompt", "a", "--temperature", "nan"],
     "--temperature nan"),
    ("generate-max-new-0", lambda d: ["generate", "--run", d / "run", "--prompt", "a", "--max-new-tokens", "0"],
     "--max-new-tokens 0"),
    ("generate-top-k-0", lambda d: ["generate", "--run", d / "run", "--prompt", "a", "--top-k", "0"], "--top-k 0"),
    ("generate-bad-utf8", lambda d: ["generate", "--run", d / "run", "--prompt", "caf\udce9"], "not valid UTF-8"),
    ("generate-no-run", lambda d: ["generate", "--run", d / "nope", "--prompt", "a"], "is not a run folder"),
    ("estimate-world-0", lambda d: ["estimate", "--world-size", "0", "--model.vocab_size=100"], "--world-size 0"),
    ("estimate-budget-neg", lambda d: ["estimate", "--world-size", "2", "--model.vocab_size=100", "--budget-gb",
                                       "-1"], "--budget-gb -1"),
    ("estimate-no-vocab", lambda d: ["estimate", "--world-size", "2"], "model.vocab_size is not set"),
    ("estimate-indivisible", lambda d: ["estimate", "--world-size", "3", "--model.vocab_size=100",
                                        "--distributed.tp=2"], "not divisible by distributed.tp=2"),
    ("prepare-missing-input", lambda d: ["data", "prepare", "--input", d / "none.txt", "--out", d / "p_out"],
     "no such file, folder or glob match"),
    ("prepare-config-typo", lambda d: ["data", "prepare", "--config", d / "prep_typo.yaml"],
     "prep_typo.yaml:3:5: unknown key 'sources.0.feild'; did you mean 'sources.0.field'?"),
    ("prepare-out-under-file", lambda d: ["data", "prepare", "--input", d / "corpus.txt", "--out",
                                          d / "a_file" / "out", "--vocab-size", "300"], "Not a directory"),
    ("inspect-not-packed", lambda d: ["data", "inspect", d / "nope"], "no manifest.json"),
    ("inspect-bad-manifest", lambda d: ["data", "inspect", d / "bad_manifest"], "manifest.json:2: not valid JSON"),
    ("inspect-no-split", lambda d: ["data", "inspect", d / "packed", "--split", "test"], "has no split 'test'"),
    ("finetune-no-base-key", lambda d: ["finetune", "--data.train=x"], "missing required key 'base'"),
    ("finetune-bad-metric", lambda d: ["finetune", "--config", d / "bad_metric.yaml"],
     "bad_metric.yaml:6:11: invalid value for 'train.metric': 'f2'"),
    ("finetune-no-base", lambda d: ["finetune", f"--base.path={d / 'nope'}", f"--data.train={d / 'train.tsv'}",
                                    f"--run_dir={d / 'ft_no_base'}"], "base.path:"),
    ("finetune-bad-label", lambda d: _ft(d, "train.tsv", f"--data.validation={d / 'dev_bad_label.tsv'}"),
     "dev_bad_label.tsv:2: label '7' not in label_names"),
    ("finetune-conll-no-tag", lambda d: _ft(d, "train.conll", "--task=token-classification"),
     "train.conll:3: expected 'word ... tag' columns"),
    ("evaluate-no-run", lambda d: ["evaluate", "--run", d / "nope", "--data", d / "train.tsv"],
     "is not a finished fine-tuning run"),
    ("consolidate-missing", lambda d: ["checkpoint", "consolidate", d / "nope", "--out", d / "c.safetensors"],
     "nope: does not exist"),
    ("hf-check-missing", lambda d: ["hf", "check", d / "nope"], "no config.json"),
    ("hf-check-bad-json", lambda d: ["hf", "check", d / "hf_bad"], "config.json:1: not valid JSON"),
    ("hf-export-nonempty", lambda d: ["hf", "export", d / "run", d / "nonempty"], "exists and is not empty"),
]


@pytest.mark.parametrize("argv,needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_user_error_is_one_line_and_exit_2(files, capsys, monkeypatch, argv, needle):
    monkeypatch.delenv("LMFORGE_DEBUG", raising=False)
    code, err = run_cli(capsys, *argv(files))
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = error_lines(err)
    assert len(lines) == 1 and needle in lines[0], err
    assert lines[0].startswith(f"lmforge {argv(files)[0]}"), err


def test_failed_starts_leave_no_run_folder(files, capsys):
    """Config or input problems found before any work starts leave nothing behind."""
    for argv, folder in ((["train", "--config", files / "typo.yaml", f"--run_dir={files / 'r_typo'}"], "r_typo"),
                         (["finetune", "--config", files / "bad_metric.yaml"], "ft_bad_metric"),
                         (["finetune", f"--base.path={files / 'nope'}", f"--data.train={files / 'train.tsv'}",
                           f"--run_dir={files / 'ft_no_base'}"], "ft_no_base"),
                         (_ft(files, "train.conll", "--task=token-classification", run_dir="ft_conll"), "ft_conll"),
                         (["quickstart", "--run-dir", files / "qs", "--optimizer.lrr=1"], "qs")):
        assert run_cli(capsys, *argv)[0] == 2
        assert not (files / folder).exists(), folder
    assert not (files / "qs-data").exists()  # the quickstart checks its config before building any data


def test_hint_is_printed_under_the_error(capsys):
    code, err = run_cli(capsys, "train", "--nproc", "0")
    assert code == 2
    assert err.splitlines() == ["lmforge train: error: --nproc 0: the number of processes must be >= 1",
                                "hint: drop --nproc for one process, or give the processes to start on this machine"]


def test_every_config_problem_gets_its_own_error_line(capsys):
    code, err = run_cli(capsys, "config", "--optimizer.lr=0", "--training.seed=abc")
    assert code == 2
    lines = error_lines(err)
    assert len(lines) == 2 and "optimizer.lr" in lines[0] and "training.seed" in lines[1]


@pytest.mark.parametrize("exc,needle", [
    (OSError(errno.EROFS, "Read-only file system", "/ro/run"), "/ro/run: Read-only file system"),
    (PermissionError(errno.EACCES, "Permission denied", "/root/x"), "/root/x: Permission denied"),
    (OSError(errno.ENOSPC, "No space left on device", "/full/x"), "/full/x: No space left on device"),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/etc/passwd/x"), "/etc/passwd/x: Not a directory"),
])
def test_user_os_errors_are_exit_2_with_a_hint_where_known(capsys, monkeypatch, exc, needle):
    def boom(args, extra):
        raise exc

    monkeypatch.setattr(cli, "_cmd_config", boom)
    code, err = run_cli(capsys, "config")
    assert code == 2 and "Traceback" not in err
    assert error_lines(err) == [f"lmforge config: error: {needle}"]
    if exc.errno in (errno.EROFS, errno.ENOSPC, errno.ENOTDIR):
        assert err.splitlines()[-1].startswith("hint: ")


def test_internal_error_prints_traceback_and_exit_1(capsys, monkeypatch):
    monkeypatch.delenv("LMFORGE_DEBUG", raising=False)

    def boom(args, extra):
        return 1 // 0

    monkeypatch.setattr(cli, "_cmd_config", boom)
    code, err = run_cli(capsys, "config")
    assert code == 1
    assert "Traceback (most recent call last)" in err and "ZeroDivisionError" in err
    assert "lmforge config: internal error: ZeroDivisionError: integer division or modulo by zero" in err
    assert "this is a bug in lmforge" in err.splitlines()[-1] and "lmforge env --json" in err.splitlines()[-1]
    for oserror in (OSError(errno.EIO, "Input/output error", "/dev/x"), ConnectionResetError()):
        monkeypatch.setattr(cli, "_cmd_config", lambda args, extra, e=oserror: (_ for _ in ()).throw(e))
        assert run_cli(capsys, "config")[0] == 1  # not the user's to fix: a traceback


def test_lmforge_debug_shows_the_traceback_of_a_user_error(capsys, monkeypatch):
    monkeypatch.setenv("LMFORGE_DEBUG", "1")
    code, err = run_cli(capsys, "config", "--optimizer.lrr=1")
    assert code == 2
    assert "Traceback (most recent call last)" in err and "ConfigError" in err
    assert error_lines(err)[-1].startswith("lmforge config: error: command line: unknown key 'optimizer.lrr'")


@pytest.mark.parametrize("argv,needle", [
    (["-m", "lmforge", "train", "--nproc", "0"], "lmforge train: error: --nproc 0"),
    (["-m", "lmforge", "generate", "--run", "x", "--prompt", "a", "--top-p", "0"],
     "lmforge generate: error: --top-p 0"),
    (["-m", "lmforge.data.cli", "inspect", "/nonexistent/packed"], "lmforge data inspect: error: no manifest.json"),
])
def test_subprocess_exit_code_and_stderr(argv, needle):
    env = {k: v for k, v in os.environ.items() if k != "LMFORGE_DEBUG"}
    r = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and needle in r.stderr, r.stderr


def test_data_readers_raise_data_errors(tmp_path):
    """The file:line messages of the readers are DataErrors (still ValueErrors for existing callers)."""
    from lmforge.data.pack import read_manifest
    from lmforge.data.tasks_conll import read_conll
    from lmforge.errors import DataError

    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 1}))
    with pytest.raises(DataError, match="missing key 'dtype'"):
        read_manifest(tmp_path)
    (tmp_path / "a.conll").write_text("the O\nlonely\n")
    with pytest.raises(DataError, match=r"a.conll:2: expected 'word \.\.\. tag'"):
        read_conll(tmp_path / "a.conll")
