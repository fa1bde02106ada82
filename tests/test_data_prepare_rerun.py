"""Rerunning ``data prepare`` after a completed run: up to date → no work; changed → redo, saying why."""

import io
import json
import os

import pytest
from rich.console import Console

from lmforge.data import prepare as prep_mod
from lmforge.data.cli import main as data_main
from lmforge.data.config import build_prepare_config
from lmforge.data.prepare import prepare
from lmforge.data.verify import verify


def cfg_for(tmp_path, src, **kw):
    tree = {"sources": [{"path": str(src)}], "output": {"dir": str(tmp_path / "out"), "num_workers": 0},
            "tokenizer": {"vocab_size": 300, "min_frequency": 1}, "dedup": {"near": False}}
    for k, v in kw.items():
        tree[k] = {**tree.get(k, {}), **v}
    return build_prepare_config(tree)


def run(cfg, force=False):
    buf = io.StringIO()
    m = prepare(cfg, console=Console(file=buf, width=400), force=force)
    return m, buf.getvalue()


@pytest.fixture
def src(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text("".join(json.dumps({"text": f"document {i} " + "word " * (i % 30)}) + "\n" for i in range(300)))
    return f


def shard_mtimes(out):
    return {p.name: p.stat().st_mtime_ns for p in out.glob("*.bin")}


def test_unchanged_rerun_is_up_to_date(tmp_path, src, monkeypatch):
    m1, _ = run(cfg_for(tmp_path, src))
    before = shard_mtimes(tmp_path / "out")
    monkeypatch.setattr(prep_mod, "pack_documents", lambda *a, **k: pytest.fail("repacked an up-to-date output"))
    monkeypatch.setattr(prep_mod, "stage_text", lambda *a, **k: pytest.fail("restaged an up-to-date output"))
    # output.num_workers / keep_staging only change how, not what: still up to date
    m2, log = run(cfg_for(tmp_path, src, output={"num_workers": 2, "keep_staging": True}))
    assert "up to date" in log and m2["prepare"]["up_to_date"] is True
    assert m2["splits"] == m1["splits"] and shard_mtimes(tmp_path / "out") == before
    assert "up_to_date" not in json.loads((tmp_path / "out" / "manifest.json").read_text())["prepare"]


def test_changed_config_redoes_and_names_the_key(tmp_path, src):
    m1, _ = run(cfg_for(tmp_path, src))
    m2, log = run(cfg_for(tmp_path, src, clean={"min_chars": 12}, output={"val_fraction": 0.2}))
    assert "redoing" in log and "clean.min_chars: 1 → 12" in log and "output.val_fraction: 0.01 → 0.2" in log
    assert m2["prepare"]["redo_reasons"] and "up_to_date" not in m2["prepare"]
    assert m2["counts"]["documents"] != m1["counts"]["documents"]
    assert m2["prepare"]["dropped"]["too_short"] > 0
    assert verify(tmp_path / "out") == []
    _, log = run(cfg_for(tmp_path, src, clean={"min_chars": 12}, output={"val_fraction": 0.2}))
    assert "up to date" in log


def test_changed_source_file_redoes(tmp_path, src):
    run(cfg_for(tmp_path, src))
    with open(src, "a") as f:
        f.write(json.dumps({"text": "a brand new document"}) + "\n")
    m, log = run(cfg_for(tmp_path, src))
    assert "1 input file(s) modified" in log and str(src) in log
    assert m["counts"]["documents"]["train"] + m["counts"]["documents"]["val"] == 301
    extra = src.parent / "more.jsonl"
    extra.write_text(json.dumps({"text": "second file"}) + "\n")
    m, log = run(cfg_for(tmp_path, src.parent / "*.jsonl"))
    assert "config changed: sources.0.path" in log and "1 input file(s) added" in log


def test_same_size_edit_with_new_mtime_redoes(tmp_path, src):
    run(cfg_for(tmp_path, src))
    body = src.read_text().replace("document 5 ", "document X ")
    src.write_text(body)
    st = src.stat()
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    _, log = run(cfg_for(tmp_path, src))
    assert "modified" in log


def test_missing_shard_and_force_redo(tmp_path, src):
    m1, _ = run(cfg_for(tmp_path, src))
    (tmp_path / "out" / m1["splits"]["train"][0]["file"]).unlink()
    m2, log = run(cfg_for(tmp_path, src))
    assert "is missing" in log and m2["splits"] == m1["splits"]
    m3, log = run(cfg_for(tmp_path, src), force=True)
    assert "--force" in log and m3["splits"] == m1["splits"]
    assert verify(tmp_path / "out") == []


def test_cli_force_flag(tmp_path, src, capsys):
    args = ["prepare", "--input", str(src), "--out", str(tmp_path / "out"), "--vocab-size", "300",
            "--workers", "0", "--dedup.near=false", "--tokenizer.min_frequency=1"]
    assert data_main(args) == 0
    assert data_main(args) == 0
    assert "up to date" in capsys.readouterr().out
    assert data_main([*args, "--force"]) == 0
    assert "redoing" in capsys.readouterr().out
