"""Fast exact encoder for GPT-2-style byte-level BPE tokenizers (the kind ``train_tokenizer`` builds).

``tokenizers`` spends most of its time per pre-token building ``NormalizedString`` alignments and
``Encoding`` objects. This encoder splits text with the same GPT-2 regex (``regex`` module, C speed),
looks every piece up in a bounded piece → ids cache, and asks the tokenizer's own BPE model
(``model.tokenize``) only for pieces it has not seen. Output is identical to
``Tokenizer.encode(text, add_special_tokens=False).ids``; documents holding an added/special token's
text go through ``tokenizers`` unchanged. Nothing is cached per document: the cache holds pieces
(words, CJK clauses), so it pays off through Zipf's law on real corpora (a repeated benchmark corpus
inflates its hit rate; measure on unrepeated text).
"""

from __future__ import annotations

import json
from itertools import chain
from typing import Optional

import regex
from tokenizers import Tokenizer as _HFTokenizer

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Oniguruma (tokenizers) and the regex module agree on \s, \p{L}, \p{N} for every code point
# (tests/test_fast_bpe.py checks all of them in several contexts with LMFORGE_SLOW_TESTS=1, a sample
# otherwise). Lone surrogates cannot be encoded; they go to tokenizers, which raises its own error.
_UNSAFE_CHARS = r"\p{Cs}"
DEFAULT_CACHE_SIZE = 1 << 19  # pieces (~250 B each); first come first kept: frequent pieces come early


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte → printable character table (the alphabet ByteLevel uses), for ``str.translate``."""
    keep = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    table, extra = [], 0
    for b in range(256):
        if b in keep:
            table.append(chr(b))
        else:
            table.append(chr(256 + extra))
            extra += 1
    return dict(enumerate(table))


class FastByteLevelBPE:
    """Drop-in fast path for ``hf.encode_batch_fast(texts, add_special_tokens=False)`` ids."""

    def __init__(self, hf: _HFTokenizer, cache_size: int = DEFAULT_CACHE_SIZE):
        self.hf = hf
        self.model = hf.model
        self.pattern = regex.compile(GPT2_PATTERN)
        added = [t.content for t in hf.get_added_tokens_decoder().values() if t.content]
        alts = [regex.escape(a) for a in sorted(added, key=len, reverse=True)]
        self.fallback = regex.compile("|".join([*alts, _UNSAFE_CHARS]))
        self.byte_char = _bytes_to_unicode()
        self.ints = tuple(range(hf.get_vocab_size(with_added_tokens=True)))  # shared int objects
        self.cache: dict[str, tuple[int, ...]] = {}
        self.cache_size = cache_size
        self.fallback_docs = 0

    @staticmethod
    def supports(tokenizer_json: str) -> bool:
        """True when the tokenizer is no-normalizer + ByteLevel(regex, no prefix space) + deterministic BPE."""
        d = json.loads(tokenizer_json)
        pre, model = d.get("pre_tokenizer") or {}, d.get("model") or {}
        if pre.get("type") == "Sequence" and len(pre.get("pretokenizers", [])) == 1:
            pre = pre["pretokenizers"][0]
        return (d.get("normalizer") is None and pre.get("type") == "ByteLevel"
                and pre.get("use_regex", True) and not pre.get("add_prefix_space", False)
                and model.get("type") == "BPE" and model.get("dropout") in (None, 0.0)
                and not model.get("continuing_subword_prefix") and not model.get("end_of_word_suffix"))

    @classmethod
    def maybe(cls, hf: _HFTokenizer, cache_size: int = DEFAULT_CACHE_SIZE) -> Optional["FastByteLevelBPE"]:
        return cls(hf, cache_size) if cls.supports(hf.to_str()) else None

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids per text, identical to tokenizers' ``encode_batch_fast(..., add_special_tokens=False)``."""
        out: list[Optional[list[int]]] = [None] * len(texts)
        slow: list[int] = []
        search, findall, get, miss = self.fallback.search, self.pattern.findall, self.cache.get, self._miss
        for i, text in enumerate(texts):
            if search(text):
                slow.append(i)
                continue
            pieces = findall(text)
            parts = list(map(get, pieces))
            if None in parts:
                parts = [p if p is not None else miss(w) for p, w in zip(parts, pieces)]
            out[i] = list(chain.from_iterable(parts))
        if slow:
            self.fallback_docs += len(slow)
            encs = self.hf.encode_batch_fast([texts[i] for i in slow], add_special_tokens=False)
            for i, e in zip(slow, encs):
                out[i] = e.ids
        return out  # type: ignore[return-value]

    def _miss(self, piece: str) -> tuple[int, ...]:
        """BPE one pre-token with the tokenizer's own model; cache it while the cache has room."""
        ids = self.cache.get(piece)
        if ids is None:
            mapped = piece.encode("utf-8").decode("latin-1").translate(self.byte_char)
            ids = tuple([self.ints[t.id] for t in self.model.tokenize(mapped)])
            if len(self.cache) < self.cache_size:
                self.cache[piece] = ids
        return ids
