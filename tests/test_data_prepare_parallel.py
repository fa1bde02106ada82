"""Stage 1 (clean + dedup) in worker processes: same output whatever the worker count."""

import json
import random

import pytest
from datasketch import MinHash, MinHashLSH

from lmforge.data import prepare as prep_mod
from lmforge.data.config import DedupConfig, build_prepare_config
from lmforge.data.dedup import Deduplicator, shingle_hashes
from lmforge.data.prepare import prepare, read_staged

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()


def corpus(tmp_path):
    rng = random.Random(0)
    a, b = [], []
    for i in range(400):
        doc = " ".join(rng.choice(WORDS) for _ in range(40)) + f" 文档{i}"
        a.append(doc)
        if i % 5 == 0:  # near duplicate: one word changed
            b.append(doc.replace(doc.split()[3], "CHANGED", 1))
        if i % 7 == 0:  # exact duplicate up to case/whitespace
            b.append("  " + doc.upper())
        if i % 11 == 0:
            b.append(f"mail me at user{i}@example.com or call 555-123-4567 " + doc[:60])
        b.append("x")  # too short with min_chars=5
    for name, docs in (("a", a), ("b", b)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return [{"path": str(tmp_path / "a.jsonl"), "name": "a"}, {"path": str(tmp_path / "b.jsonl"), "name": "b", "weight": 1.5}]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("par")
    sources = corpus(tmp)
    mp = pytest.MonkeyPatch()
    mp.setattr(prep_mod, "_CLEAN_BATCH_CHARS", 3000)  # many batches in flight
    out = {}
    try:
        for workers in (0, 1, 2):
            cfg = build_prepare_config({
                "sources": sources, "clean": {"min_chars": 5, "pii": {}},
                "dedup": {"near": True, "threshold": 0.7},
                "tokenizer": {"vocab_size": 300, "min_frequency": 1},
                "output": {"dir": str(tmp / f"out{workers}"), "num_workers": workers, "keep_staging": True}})
            m = prepare(cfg)
            out[workers] = (m, list(read_staged(tmp / f"out{workers}" / "_staging" / "docs.jsonl.zst")))
    finally:
        mp.undo()
    return out


def test_same_output_for_any_worker_count(runs):
    m0, docs0 = runs[0]
    p0 = m0["prepare"]
    assert p0["dropped"]["near_duplicate"] > 40 and p0["dropped"]["exact_duplicate"] > 30
    assert p0["dropped"]["too_short"] > 100 and p0["pii_masked"]["emails"] > 0
    for w in (1, 2):
        m, docs = runs[w]
        assert docs == docs0
        for key in ("sources", "dropped", "pii_masked", "documents_out", "bytes_in", "bytes_out"):
            assert m["prepare"][key] == p0[key], key
        assert [e["sha256"] for e in m["splits"]["train"]] == [e["sha256"] for e in m0["splits"]["train"]]


def test_band_keys_match_datasketch_lsh():
    """Our set-of-band-keys decision equals MinHashLSH.query on the same signatures."""
    rng = random.Random(1)
    base = [" ".join(rng.choice(WORDS) for _ in range(60)) for _ in range(150)]
    texts = base + [t.replace(t.split()[k % 60], "Q", 1) for k, t in enumerate(base[:150:2])]
    rng.shuffle(texts)
    cfg = DedupConfig(exact=False, near=True, threshold=0.8)
    ours = Deduplicator(cfg)
    lsh = MinHashLSH(threshold=0.8, num_perm=cfg.num_perm)
    agree = dups = 0
    for i, t in enumerate(texts):
        mh = MinHash(num_perm=cfg.num_perm, hashvalues=ours.hasher.signature(shingle_hashes(t, cfg.ngram)),
                     scheme="affine32")
        theirs = bool(lsh.query(mh))
        if not theirs:
            lsh.insert(i, mh)
        mine = ours.is_duplicate(t) == "near_duplicate"
        agree += mine == theirs
        dups += mine
    assert agree == len(texts) and dups > 20
