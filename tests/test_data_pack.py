import hashlib
import json
import random

import numpy as np
import pytest

from lmforge.data.pack import dtype_for_vocab, pack_documents, read_manifest, split_of
from lmforge.data.tokenizer import train_tokenizer


def make_docs(n=300, seed=0):
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "三国", "演义", "def", "return", "x", "=", "\n", "🤖"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(1, 60))) for _ in range(n)]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(make_docs(200, seed=1), vocab_size=320)


def read_split(out, manifest, split):
    dtype = np.dtype(manifest["dtype"])
    parts = [np.fromfile(out / e["file"], dtype=dtype) for e in manifest["splits"][split]]
    return np.concatenate(parts) if parts else np.zeros(0, dtype)


def decode_docs(tok, tokens, eos):
    ends = np.flatnonzero(tokens == eos)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tok.decode(tokens[a:b].tolist()) for a, b in zip(starts, ends)]


def test_pack_manifest_and_contents(tok, tmp_path):
    docs = make_docs()
    m = pack_documents(docs, tok, tmp_path, val_fraction=0.1, seed=3, shard_tokens=500, num_workers=0)
    assert m == read_manifest(tmp_path)
    assert m["dtype"] == "uint16" and m["vocab_size"] == tok.vocab_size and m["eos_id"] == tok.eos_id
    assert m["tokenizer_sha256"] == tok.sha256()
    assert (tmp_path / "tokenizer.json").is_file() and not (tmp_path / "progress.json").exists()
    assert not list(tmp_path.glob("*.tmp"))
    got = {}
    for split in ("train", "val"):
        entries = m["splits"][split]
        for e in entries:
            raw = (tmp_path / e["file"]).read_bytes()
            assert hashlib.sha256(raw).hexdigest() == e["sha256"]
            assert len(raw) == 2 * e["tokens"]
        for e in entries[:-1]:  # every shard but the last reaches the size limit and ends at a doc boundary
            assert e["tokens"] >= 500
        tokens = read_split(tmp_path, m, split)
        assert len(tokens) == m["counts"]["tokens"][split] == sum(e["tokens"] for e in entries)
        assert int((tokens == tok.eos_id).sum()) == m["counts"]["documents"][split] == sum(e["documents"] for e in entries)
        assert tokens[-1] == tok.eos_id
        got[split] = decode_docs(tok, tokens, tok.eos_id)
    assert m["counts"]["documents"]["val"] >= 1 and m["counts"]["shards"]["train"] > 1
    # every document appears exactly once, in its own split, in input order
    expected = {"train": [], "val": []}
    for i, d in enumerate(docs):
        expected["val" if i == 0 else split_of(d, 3, 0.1)].append(d)
    assert got == expected


def test_split_deterministic_and_seeded():
    docs = make_docs(2000)
    a = [split_of(d, 0, 0.2) for d in docs]
    assert a == [split_of(d, 0, 0.2) for d in docs]
    assert a != [split_of(d, 1, 0.2) for d in docs]
    frac = a.count("val") / len(a)
    assert 0.1 < frac < 0.3
    assert all(split_of(d, 0, 0.0) == "train" for d in docs[:50])


def test_workers_produce_identical_output(tok, tmp_path):
    docs = make_docs(400)
    m0 = pack_documents(docs, tok, tmp_path / "a", shard_tokens=700, num_workers=0)
    m2 = pack_documents(docs, tok, tmp_path / "b", shard_tokens=700, num_workers=2)
    assert m0["splits"] == m2["splits"]


def test_dtype_choice(tmp_path):
    assert dtype_for_vocab(65536) == "uint16" and dtype_for_vocab(65537) == "uint32"
    big = train_tokenizer(["hello world"] * 5, vocab_size=300)
    big.hf.add_tokens([f"<w{i}>" for i in range(66_000)])
    assert big.vocab_size > 65536
    m = pack_documents(["hi <w65999> there", "<w70>"], big, tmp_path, val_fraction=0.0, num_workers=0)
    assert m["dtype"] == "uint32"
    tokens = read_split(tmp_path, m, "train")
    assert tokens.max() == big.token_to_id("<w65999>") > 65535
    assert decode_docs(big, tokens, big.eos_id)[0] == "hi <w65999> there"


def test_resume_after_interruption(tok, tmp_path):
    docs = make_docs(500)
    ref = pack_documents(docs, tok, tmp_path / "ref", val_fraction=0.05, shard_tokens=400, num_workers=0, batch_bytes=500)

    def dying():
        for i, d in enumerate(docs):
            if i == 350:
                raise KeyboardInterrupt
            yield d

    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        pack_documents(dying(), tok, out, val_fraction=0.05, shard_tokens=400, num_workers=0, batch_bytes=500)
    assert not (out / "manifest.json").exists()
    progress = json.loads((out / "progress.json").read_text())
    done = sum(e["documents"] for e in progress["splits"]["train"])
    assert done > 0
    mtimes = {e["file"]: (out / e["file"]).stat().st_mtime_ns for e in progress["splits"]["train"]}
    m = pack_documents(docs, tok, out, val_fraction=0.05, shard_tokens=400, num_workers=0)
    assert m["splits"] == ref["splits"]
    assert m["counts"]["resumed_documents"]["train"] == done
    assert all((out / f).stat().st_mtime_ns == t for f, t in mtimes.items())  # finished shards untouched
    # a different setting starts over instead of mixing incompatible shards
    m3 = pack_documents(docs, tok, out, val_fraction=0.05, shard_tokens=900, num_workers=0)
    assert m3["counts"]["resumed_documents"]["train"] == 0
    assert not (out / f"train_{len(m3['splits']['train']):05d}.bin").exists()


def test_empty_docs_and_bad_args(tok, tmp_path):
    m = pack_documents(["", "a b", ""], tok, tmp_path, val_fraction=0.0, num_workers=0)
    assert m["counts"]["empty_skipped"] == 2 and m["counts"]["documents"]["train"] == 1
    with pytest.raises(ValueError, match="val_fraction"):
        pack_documents(["x"], tok, tmp_path, val_fraction=1.0)
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        read_manifest(tmp_path / "nothing")
