import gzip
import json

import numpy as np
import pytest

from lmforge.config import ConfigError
from lmforge.data import prepare as prep_mod
from lmforge.data.cli import main as data_main
from lmforge.data.config import build_prepare_config, load_prepare_config
from lmforge.data.prepare import prepare
from lmforge.data.sources import BadInput
from lmforge.data.tokenizer import load_tokenizer
from lmforge.data.verify import inspect_data, verify


def docs_of(out):
    """All packed documents (train + val) decoded back to text."""
    m = json.loads((out / "manifest.json").read_text())
    tok = load_tokenizer(out)
    texts = []
    for split in ("train", "val"):
        for e in m["splits"][split]:
            arr = np.fromfile(out / e["file"], dtype=m["dtype"])
            ends = np.flatnonzero(arr == m["eos_id"])
            starts = np.concatenate([[0], ends[:-1] + 1])
            texts += [tok.decode(arr[a:b].tolist()) for a, b in zip(starts, ends)]
    return m, texts


def cfg_for(tmp_path, sources, **kw):
    tree = {"sources": sources, "output": {"dir": str(tmp_path / "out"), "num_workers": 0, "val_fraction": 0.1},
            "tokenizer": {"vocab_size": 300, "min_frequency": 1}, "dedup": {"near": False}}
    for k, v in kw.items():
        tree[k] = {**tree.get(k, {}), **v} if isinstance(v, dict) else v
    return build_prepare_config(tree)


@pytest.fixture
def all_sources(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard
    from datasets import Dataset

    src = tmp_path / "src"
    (src / "notes").mkdir(parents=True)
    (src / "a.txt").write_text("plain text document one")
    (src / "notes" / "b.md").write_text("# markdown doc\n\nsecond paragraph")
    (src / "notes" / "c.md").write_text("another markdown doc")
    rows = [{"text": f"jsonl row {i}"} for i in range(3)]
    body = "".join(json.dumps(r) + "\n" for r in rows)
    (src / "d.jsonl").write_text(body)
    with gzip.open(src / "e.jsonl.gz", "wt") as f:
        f.write(body.replace("jsonl row", "gzip row"))
    (src / "f.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(body.replace("jsonl row", "zstd row").encode()))
    pq.write_table(pa.table({"content": ["parquet one", "parquet two"], "n": [1, 2]}), src / "g.parquet")
    (src / "h.csv").write_text('id,body\n1,"csv, with comma"\n2,csv plain\n')
    (src / "i.tsv").write_text("label\ttext_a\n1\t中文评论很好\n0\t不好\n")
    Dataset.from_dict({"text": ["hf row one", "hf row two"]}).save_to_disk(str(src / "hfds"))
    sources = [
        {"path": str(src / "a.txt")},
        {"path": str(src / "notes")},
        {"path": str(src / "*.jsonl*")},
        {"path": str(src / "g.parquet"), "field": "content"},
        {"path": str(src / "h.csv"), "field": "body"},
        {"path": str(src / "i.tsv"), "field": "text_a"},
        {"path": str(src / "hfds"), "name": "hf"},
    ]
    expected = {"plain text document one", "# markdown doc\n\nsecond paragraph", "another markdown doc",
                *(f"{k} row {i}" for k in ("jsonl", "gzip", "zstd") for i in range(3)), "parquet one", "parquet two",
                "csv, with comma", "csv plain", "中文评论很好", "不好", "hf row one", "hf row two"}
    return sources, expected


def test_every_source_type(tmp_path, all_sources):
    sources, expected = all_sources
    m = prepare(cfg_for(tmp_path, sources))
    m2, texts = docs_of(tmp_path / "out")
    assert sorted(texts) == sorted(expected)
    assert m["prepare"]["sources"]["hf"] == {"in": 2, "out": 2}
    assert verify(tmp_path / "out") == []
    assert not (tmp_path / "out" / "_staging").exists()


def test_paragraph_and_line_modes(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("para one\nstill one\n\n\npara two\r\n")
    for mode, want in (("paragraph", {"para one\nstill one", "para two"}), ("line", {"para one", "still one", "para two"})):
        prepare(cfg_for(tmp_path, [{"path": str(f), "doc_mode": mode}]))
        assert set(docs_of(tmp_path / "out")[1]) == want


def test_bad_inputs_counted_or_strict(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "bad"
    src.mkdir()
    (src / "good.txt").write_text("a good document")
    (src / "binary.txt").write_bytes(b"\x7fELF\x00\x01\x02binary")
    (src / "latin1.txt").write_bytes("line ok\ncaf\xe9".encode("utf-8").replace(b"\xc3\xa9", b"\xe9"))
    (src / "empty.txt").write_bytes(b"")
    with open(src / "rows.jsonl", "w") as f:
        f.write('{"text": "valid row"}\n{"text": broken\n[1, 2]\n{"other": "x"}\n')
        f.write('{"text": "' + "x" * (100 * 1024 * 1024) + '"}\n')  # a 100 MB single line
        f.write('{"text": "after the huge line"}\n')
    pq.write_table(pa.table({"body": ["x"]}), src / "nocol.parquet")
    sources = [{"path": str(src / "*.txt")}, {"path": str(src / "rows.jsonl")}, {"path": str(src / "nocol.parquet")}]
    m = prepare(cfg_for(tmp_path, sources, clean={"max_chars": 1_000_000}))
    skipped = m["prepare"]["skipped_input"]
    assert skipped == {"binary": 1, "invalid_utf8": 1, "empty_file": 1, "malformed_json": 1, "missing_field": 2,
                       "too_long": 1, "missing_column": 1}
    assert sorted(docs_of(tmp_path / "out")[1]) == ["a good document", "after the huge line", "valid row"]
    with pytest.raises(BadInput, match=r"rows\.jsonl:2: malformed_json"):
        prepare(cfg_for(tmp_path, [{"path": str(src / "rows.jsonl")}], strict=True))
    with pytest.raises(BadInput, match=r"latin1\.txt:2: invalid_utf8"):
        prepare(cfg_for(tmp_path, [{"path": str(src / "latin1.txt")}], strict=True))
    with pytest.raises(BadInput, match=r"nocol\.parquet: missing_column"):
        prepare(cfg_for(tmp_path, [{"path": str(src / "nocol.parquet")}], strict=True))


def test_mixing_weights_and_cross_source_dedup(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({"text": f"source a document number {i}"}) + "\n" for i in range(200)))
    b.write_text("".join(json.dumps({"text": f"source b document number {i}"}) + "\n" for i in range(200))
                 + json.dumps({"text": "source a document number 7"}) + "\n")
    m = prepare(cfg_for(tmp_path, [{"path": str(a), "weight": 2.0, "name": "a"},
                                   {"path": str(b), "weight": 0.5, "name": "b"}]))
    s = m["prepare"]["sources"]
    assert s["a"]["out"] == 400
    assert 60 <= s["b"]["out"] <= 140 and s["b"]["downsampled"] + s["b"]["out"] == 200
    assert s["b"]["exact_duplicate"] == 1
    texts = docs_of(tmp_path / "out")[1]
    assert texts.count("source a document number 3") == 2


def test_interrupted_prepare_resumes(tmp_path, monkeypatch):
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"text": f"document {i} " + "word " * (i % 50)}) + "\n" for i in range(600)))
    kw = dict(output={"shard_tokens": 500, "keep_staging": True})
    ref = prepare(cfg_for(tmp_path / "ref", [{"path": str(src)}], **kw))
    real = prep_mod.read_staged
    calls = {"n": 0}

    def dying(path):
        calls["n"] += 1
        for i, t in enumerate(real(path)):
            if calls["n"] == 2 and i == 400:  # second read = packing stage
                raise KeyboardInterrupt
            yield t

    monkeypatch.setattr(prep_mod, "read_staged", dying)
    monkeypatch.setattr("lmforge.data.pack._BATCH_BYTES", 256)
    cfg = cfg_for(tmp_path, [{"path": str(src)}], **kw)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg)
    assert verify(tmp_path / "out")  # not finished: no manifest yet
    monkeypatch.setattr(prep_mod, "read_staged", real)
    m = prepare(cfg)
    assert m["prepare"]["resumed_stage1"] is True
    assert m["counts"]["resumed_documents"]["train"] > 0
    assert m["splits"] == ref["splits"] and m["tokenizer_sha256"] == ref["tokenizer_sha256"]
    assert verify(tmp_path / "out") == []


def test_cli_prepare_inspect_verify(tmp_path, capsys):
    f = tmp_path / "t.txt"
    f.write_text("\n\n".join(f"paragraph {i} with some words" for i in range(50)))
    out = tmp_path / "out"
    assert data_main(["prepare", "--input", str(f), "--doc-mode", "paragraph", "--out", str(out), "--vocab-size",
                      "300", "--workers", "0", "--dedup.near=false", "--tokenizer.min_frequency=1"]) == 0
    assert "tokens train / val" in capsys.readouterr().out
    assert data_main(["verify", str(out)]) == 0
    report = inspect_data(out, samples=2, sample_tokens=8)
    assert report["top_tokens"] and len(report["samples"]) == 2
    assert data_main(["inspect", str(out)]) == 0
    shard = out / "train_00000.bin"
    raw = bytearray(shard.read_bytes())
    raw[3] ^= 1
    shard.write_bytes(bytes(raw))
    assert data_main(["verify", str(out)]) == 2  # a user's data problem, not a bug
    assert "sha256 mismatch" in capsys.readouterr().err
    (out / "train_00099.bin.tmp").write_bytes(b"")
    assert any("temporary" in p for p in verify(out))


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'dedup.threshold'"):
        build_prepare_config({"sources": [{"path": "x"}], "output": {"dir": "o"}, "dedup": {"treshold": 0.5}})
    with pytest.raises(ConfigError, match="missing required key 'output'"):
        build_prepare_config({"sources": [{"path": "x"}]})
    y = tmp_path / "p.yaml"
    y.write_text("prepare:\n  sources:\n    - path: a.txt\n  output:\n    dir: out\n")
    assert load_prepare_config(y, ["--output.seed=3"]).output.seed == 3
    with pytest.raises(FileNotFoundError, match="no such file"):
        prepare(cfg_for(tmp_path, [{"path": str(tmp_path / "missing.txt")}]))
