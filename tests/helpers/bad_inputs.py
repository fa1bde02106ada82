"""Shared by tests/test_bad_inputs_*.py: run the real command line in-process, read its one error line, and
check what it left on disk. The tiny packed folder and run are built once per session through the CLI
itself (``data prepare`` and ``train``), so they are whatever the product writes."""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Optional

import pytest

import lmforge.cli as cli

WORDS = ["the", "movie", "plot", "actor", "scene", "great", "awful", "film", "story", "music"]
_BUILT: dict[str, Path] = {}


def case(case_id: str, *values, xfail: Optional[str] = None):
    """One parameterised case; ``xfail``: the reason it is expected to fail until another branch lands."""
    return pytest.param(*values, id=case_id, marks=[pytest.mark.xfail(strict=False, reason=xfail)] if xfail else [])


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """(exit code, stderr, stdout) of ``lmforge ARGS``."""
    try:
        code = cli.main([str(a) for a in args])
    except SystemExit as e:  # argparse usage errors
        code = e.code
    captured = capsys.readouterr()
    return code, captured.err, captured.out


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if ": error: " in line]


def assert_user_error(code: int, err: str, command: str, *needles: str) -> str:
    """Exit 2, no traceback, exactly one ``lmforge COMMAND: error:`` line holding every needle; returns it."""
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = error_lines(err)
    assert len(lines) == 1, err
    assert lines[0].startswith(f"lmforge {command}: error: "), err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """relative path → (size, mtime_ns) of every file under ``folder`` (empty when it does not exist)."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def texts(n: int, seed: int = 0, k: int = 8) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=k)) for _ in range(n)]


def packed_data(tmp_path_factory, capsys=None) -> Path:
    """A small packed folder made by ``lmforge data prepare`` (built once per session; copy before changing)."""
    if "packed" not in _BUILT:
        d = tmp_path_factory.mktemp("bad_inputs_data")
        (d / "corpus.txt").write_text("\n\n".join(texts(400)))
        code = cli.main(["data", "prepare", "--input", str(d / "corpus.txt"), "--doc-mode", "paragraph", "--out",
                         str(d / "packed"), "--vocab-size", "300", "--workers", "0", "--dedup.near=false",
                         "--output.shard_tokens=1000"])
        assert code == 0
        _BUILT["packed"] = d / "packed"
    return _BUILT["packed"]


TINY_MODEL = ["--model.d_model=32", "--model.n_layers=1", "--model.n_heads=4", "--model.max_seq_len=32"]
QUIET = ["--logging.tensorboard=false", "--logging.progress=false", "--logging.report=false",
         "--training.device=cpu"]


def tiny_run(tmp_path_factory) -> Path:
    """A 2-step run made by ``lmforge train`` on ``packed_data`` (built once per session; copy before changing)."""
    if "run" not in _BUILT:
        packed = packed_data(tmp_path_factory)
        run = tmp_path_factory.mktemp("bad_inputs_run") / "run"
        code = cli.main(["train", f"--data.path={packed}", f"--run_dir={run}", *TINY_MODEL, *QUIET,
                         "--training.max_steps=2", "--training.micro_batch_size=2", "--training.eval_every=0",
                         "--checkpoint.every_steps=0", "--scheduler.warmup_steps=0"])
        assert code == 0
        _BUILT["run"] = run
    return _BUILT["run"]


def copy_of(src: Path, dst: Path, drop: Optional[list[str]] = None) -> Path:
    shutil.copytree(src, dst)
    for name in drop or []:
        target = dst / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    return dst
