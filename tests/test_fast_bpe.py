"""FastByteLevelBPE must give exactly tokenizers' ids, on real text, odd characters and special tokens."""

import os
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, normalizers, pre_tokenizers

from lmforge.data.fast_bpe import FastByteLevelBPE
from lmforge.data.tokenizer import train_tokenizer

DATA = Path(os.environ.get("LMFORGE_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
CONTEXTS = ["a{c}b", " {c}{c}1", "x {c}\n", "{c} y", "中{c}文", "{c}", "  {c}  z", "'{c}s", "9{c}9"]


def _real_texts() -> list[str]:
    """Paragraphs of English, classical Chinese and digit/contraction-heavy lines."""
    files = [DATA / "tinyshakespeare" / "input.txt", *sorted((DATA / "zh" / "classics").glob("*.txt"))[:2]]
    if not all(f.is_file() for f in files):
        pytest.skip(f"shared data not found under {DATA} (set LMFORGE_DATA)")
    paras = []
    for f in files:
        paras += [p for p in f.read_text(encoding="utf-8")[:400_000].split("\n\n") if p.strip()]
    return paras + [f"{i} and {i * 7}, I'd've 'S 'll can't   {i}\n\n  x" for i in range(200)]


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return _real_texts()


@pytest.fixture(scope="module")
def hf(texts) -> HFTokenizer:
    extra = [f"In {1990 + i % 40} we'll see {i} items, don't, they're 12.5 % ‘quoted’ \t\t x" for i in range(300)]
    return train_tokenizer(texts[::3] + extra, vocab_size=2000).hf


def _ref(hf: HFTokenizer, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in hf.encode_batch_fast(texts, add_special_tokens=False)]


def test_identical_on_real_text_cold_and_warm(hf, texts):
    fast = FastByteLevelBPE(hf)
    ref = _ref(hf, texts)
    assert fast.encode_batch(texts) == ref  # cold cache: every piece a miss first
    assert fast.cache and fast.encode_batch(texts) == ref  # warm cache
    assert fast.fallback_docs == 0


def test_identical_with_tiny_cache(hf, texts):
    fast = FastByteLevelBPE(hf, cache_size=50)
    assert fast.encode_batch(texts[:300]) == _ref(hf, texts[:300])
    assert len(fast.cache) == 50


def test_special_token_text_falls_back(hf):
    fast = FastByteLevelBPE(hf)
    docs = ["before <|endoftext|> after", "pad<|pad|>pad", "plain text", "<|endoftext"]
    out = fast.encode_batch(docs)
    assert out == _ref(hf, docs)
    assert hf.token_to_id("<|endoftext|>") in out[0]
    assert fast.fallback_docs == 2


def test_lone_surrogate_raises_like_tokenizers(hf):
    fast = FastByteLevelBPE(hf)
    with pytest.raises(Exception) as ours:
        fast.encode_batch(["ok", "bad \ud800 text"])
    with pytest.raises(Exception) as theirs:
        hf.encode_batch_fast(["bad \ud800 text"], add_special_tokens=False)
    assert type(ours.value) is type(theirs.value)


def test_every_code_point_in_context(hf):
    """The regex module and Oniguruma must split identically; all code points with LMFORGE_SLOW_TESTS=1."""
    cps = [c for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    if os.environ.get("LMFORGE_SLOW_TESTS") != "1":
        cps = cps[:0x3000] + random.Random(0).sample(cps[0x3000:], 6000)
    fast = FastByteLevelBPE(hf)
    texts = [t.format(c=chr(c)) for c in cps for t in CONTEXTS]
    bad = [t for t, a, b in zip(texts, fast.encode_batch(texts), _ref(hf, texts)) if a != b]
    assert not bad, f"{len(bad)} mismatches, e.g. {bad[:5]!r}"


def test_unsupported_tokenizers_are_refused():
    byte_level = HFTokenizer(models.BPE())
    byte_level.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    assert FastByteLevelBPE.maybe(byte_level) is not None
    prefix = HFTokenizer(models.BPE())
    prefix.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    normalized = HFTokenizer(models.BPE())
    normalized.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    normalized.normalizer = normalizers.NFKC()
    whitespace = HFTokenizer(models.BPE())
    whitespace.pre_tokenizer = pre_tokenizers.Whitespace()
    dropout = HFTokenizer(models.BPE(dropout=0.1))
    dropout.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    wordpiece = HFTokenizer(models.WordPiece(unk_token="[UNK]"))
    wordpiece.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    for t in (prefix, normalized, whitespace, dropout, wordpiece):
        assert FastByteLevelBPE.maybe(t) is None
