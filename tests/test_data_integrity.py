"""Packed data is checked against its manifest when a split is opened, and each shard is hashed once per
version (``lmforge/data/integrity.py``): later opens only stat the files."""

import json
import os
import shutil

import numpy as np
import pytest

from lmforge.data import integrity
from lmforge.data.loader import TokenShards
from lmforge.data.pack import pack_documents
from lmforge.data.tokenizer import train_tokenizer
from lmforge.data.verify import verify
from lmforge.errors import DataError


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    docs = [f"document {i} has words {i * 7} and more words" for i in range(300)]
    out = tmp_path_factory.mktemp("integrity") / "packed"
    pack_documents(docs, train_tokenizer(docs, vocab_size=300), out, val_fraction=0.05, shard_tokens=600,
                   num_workers=0)
    return out


@pytest.fixture
def copy(packed, tmp_path):
    c = tmp_path / "copy"
    shutil.copytree(packed, c)
    return c


@pytest.fixture
def scans(monkeypatch):
    """Names of the shards read (hashed) by integrity.scan_shard."""
    seen = []
    real = integrity.scan_shard

    def counting(path, dtype, limit=None):
        seen.append(path.name)
        return real(path, dtype, limit)

    monkeypatch.setattr(integrity, "scan_shard", counting)
    return seen


def shard_names(folder, split="train"):
    return [e["file"] for e in json.loads((folder / "manifest.json").read_text())["splits"][split]]


def test_a_freshly_packed_folder_opens_without_rereading_its_shards(packed, scans):
    assert len(shard_names(packed)) > 2
    TokenShards(packed, "train")
    TokenShards(packed, "val")
    assert scans == []  # pack_documents recorded the hashes it computed while writing


def test_a_copied_folder_is_hashed_once_then_only_stat(copy, scans):
    TokenShards(copy, "train")
    assert sorted(scans) == sorted(shard_names(copy))  # new inodes: every shard read once
    scans.clear()
    TokenShards(copy, "train")
    assert scans == []
    cached = json.loads((copy / integrity.CACHE_NAME).read_text())["files"]
    assert set(cached) >= set(shard_names(copy)) | {"tokenizer.json"}


def test_a_shard_rewritten_after_caching_is_hashed_again_and_refused(copy, scans):
    TokenShards(copy, "train")
    f = copy / shard_names(copy)[1]
    raw = bytearray(f.read_bytes())
    raw[4], raw[5] = raw[6], raw[7]  # ids stay in range: only the hash can tell
    raw[6], raw[7] = 0, 0
    f.write_bytes(bytes(raw))
    scans.clear()
    with pytest.raises(DataError) as e:
        TokenShards(copy, "train")
    assert scans == [f.name]
    expected = next(x["sha256"] for x in json.loads((copy / "manifest.json").read_text())["splits"]["train"]
                    if x["file"] == f.name)
    assert str(e.value).startswith(f"{f}: sha256 is ") and expected in str(e.value)
    assert "lmforge data prepare" in e.value.hint and "lmforge data verify" in e.value.hint


def test_vocab_size_edited_below_the_data_is_caught_from_the_cache(copy):
    TokenShards(copy, "train")  # warm cache
    m = json.loads((copy / "manifest.json").read_text())
    first = np.fromfile(copy / m["splits"]["train"][0]["file"], dtype="<u2")
    limit = int(first[:50].max())  # the first id >= limit is somewhere in the first 50 positions
    pos = int(np.flatnonzero(first >= limit)[0])
    m["vocab_size"] = limit
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match=f"token id {first[pos]} at position {pos} is >= the manifest's "
                                        f"vocab_size {limit}"):
        TokenShards(copy, "train")


def test_an_out_of_range_id_names_shard_id_and_position(copy):
    name = shard_names(copy)[2]
    a = np.fromfile(copy / name, dtype="<u2")
    a[17] = 4000
    a.tofile(copy / name)
    with pytest.raises(DataError, match=rf"{name}: sha256 is .*token id 4000 at position 17 is >= the manifest's "
                                        r"vocab_size \d+"):
        TokenShards(copy, "train")
    vocab = json.loads((copy / "manifest.json").read_text())["vocab_size"]
    assert any(p.endswith(f"{name}: token id 4000 at position 17 >= vocab_size {vocab}") for p in verify(copy))


def test_missing_or_foreign_tokenizer_is_refused_at_open(copy):
    tok = copy / "tokenizer.json"
    train_tokenizer(["other text entirely"] * 20, vocab_size=280).save(tok)
    with pytest.raises(DataError, match="not the tokenizer these shards were made with"):
        TokenShards(copy, "train")
    tok.unlink()
    with pytest.raises(DataError, match=r"tokenizer.json: missing from the packed data folder"):
        TokenShards(copy, "val")


def test_a_re_saved_copy_of_the_same_tokenizer_is_accepted(copy):
    tok = copy / "tokenizer.json"
    tok.write_text(json.dumps(json.loads(tok.read_text()), indent=2))  # other bytes, same tokenizer
    assert len(TokenShards(copy, "train")) > 0


def test_read_only_folder_keeps_its_cache_under_the_user_cache_dir(copy, tmp_path, monkeypatch, scans):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    real_access = os.access
    monkeypatch.setattr(integrity.os, "access", lambda p, mode: False if p == copy else real_access(p, mode))
    (copy / integrity.CACHE_NAME).unlink()
    TokenShards(copy, "train")
    assert not (copy / integrity.CACHE_NAME).exists()
    assert len(list((tmp_path / "xdg" / "lmforge" / "verified").glob("*.json"))) == 1
    scans.clear()
    TokenShards(copy, "train")
    assert scans == []


def test_verify_rehashes_whatever_the_cache_says(packed, scans):
    assert verify(packed) == []
    assert sorted(scans) == sorted(shard_names(packed) + shard_names(packed, "val"))


def _open_counting(folder, log):  # in a forked child: every shard it hashes is appended to ``log``
    import time

    real = integrity.scan_shard

    def slow(path, dtype, limit=None):
        with open(log, "a") as f:
            f.write(path.name + "\n")
        time.sleep(0.1)  # both openers are surely inside the check at once
        return real(path, dtype, limit)

    integrity.scan_shard = slow
    TokenShards(folder, "train")


def test_concurrent_openers_hash_each_shard_once(copy, tmp_path):
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    log = tmp_path / "scans.txt"
    procs = [ctx.Process(target=_open_counting, args=(copy, log)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert sorted(log.read_text().split()) == sorted(shard_names(copy))  # one process hashed, the other read the cache
