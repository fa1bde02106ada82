"""Exact and near-duplicate removal (MinHash signatures + LSH band keys in numpy; ``datasketch`` picks bands).

Exact: blake2b of the text with whitespace runs collapsed and case folded. Near: word n-gram shingles
(each CJK character counts as a word) → MinHash signature → LSH query against every earlier kept
document (exactly datasketch's MinHashLSH candidate rule); a hit drops the new document. First copy wins.
Memory: ~60 bytes per kept document for exact, ~60 bytes × bands (9 at threshold 0.8) for near.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from operator import methodcaller
from typing import Optional

import numpy as np
from datasketch import MinHashLSH

from lmforge.data.config import DedupConfig

_WS = re.compile(r"\s+")
_WORDS = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af]|[^\W\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af]+")
_UTF8 = methodcaller("encode", "utf-8", "surrogatepass")
_PRIME = np.uint64((1 << 61) - 1)
_MASK32 = np.uint64(0xFFFFFFFF)


def exact_key(text: str) -> bytes:
    norm = _WS.sub(" ", text).strip().casefold()
    return hashlib.blake2b(norm.encode("utf-8", "surrogatepass"), digest_size=8).digest()


def shingle_hashes(text: str, ngram: int) -> np.ndarray:
    """uint64 hash of every word n-gram (the whole text if it has fewer words)."""
    words = _WORDS.findall(text.casefold())
    if not words:
        return np.zeros(0, dtype=np.uint64)
    tok = np.fromiter(map(zlib.crc32, map(_UTF8, words)), dtype=np.uint64, count=len(words))
    n = min(ngram, len(tok))
    h = np.zeros(len(tok) - n + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(n):
            h = h * np.uint64(0x100000001B3) + tok[k:len(tok) - n + 1 + k]
        h ^= h >> np.uint64(33)
        h *= np.uint64(0xFF51AFD7ED558CCD)
        h ^= h >> np.uint64(33)
    return np.unique(h)


class MinHasher:
    def __init__(self, num_perm: int = 128, seed: int = 1):
        rng = np.random.default_rng(seed)
        self.num_perm = num_perm
        self.a = rng.integers(1, (1 << 61) - 1, size=num_perm, dtype=np.uint64)
        self.b = rng.integers(0, (1 << 61) - 1, size=num_perm, dtype=np.uint64)

    def signature(self, hashes: np.ndarray) -> np.ndarray:
        sig = np.full(self.num_perm, np.iinfo(np.uint32).max, dtype=np.uint64)
        h = (hashes & _MASK32)[:, None]  # 32-bit inputs keep a*h below 2^93 → exact mod with two folds
        with np.errstate(over="ignore"):
            for i in range(0, len(h), 4096):
                x = h[i:i + 4096] * (self.a & _MASK32) + self.b  # wraps mod 2^64: still a universal family
                x = (x & _PRIME) + (x >> np.uint64(61))
                sig = np.minimum(sig, (x & _MASK32).min(axis=0))
        return sig.astype(np.uint32)


def band_keys(sig: np.ndarray, bands: int, rows: int) -> list[int]:
    """One 64-bit key per LSH band (band index mixed in): equal keys ⇔ equal band rows (up to 2^-64)."""
    m = sig[:bands * rows].astype(np.uint64).reshape(bands, rows)
    h = (np.arange(bands, dtype=np.uint64) + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        for k in range(rows):
            h = (h ^ m[:, k]) * np.uint64(0x100000001B3)
            h ^= h >> np.uint64(29)
        h *= np.uint64(0xFF51AFD7ED558CCD)
        h ^= h >> np.uint64(33)
    return h.tolist()


class Deduplicator:
    """``is_duplicate(text) -> Optional[reason]``; remembers every text it accepted.

    Near duplicates: a document whose MinHash agrees with an earlier kept one on all rows of any LSH
    band (bands × rows chosen by datasketch for ``threshold``) is dropped. Split for parallel use:
    ``keys(text)`` is pure (run it in any process), ``check(keys)`` is the order-dependent decision
    (run it in input order); together they equal ``is_duplicate``.
    """

    def __init__(self, cfg: DedupConfig):
        self.cfg = cfg
        self.seen: set[bytes] = set()
        self.hasher = MinHasher(cfg.num_perm) if cfg.near else None
        if cfg.near:
            lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm)
            self.bands, self.rows = lsh.b, lsh.r
        self.band_seen: set[int] = set()
        self.n_kept = 0

    def keys(self, text: str) -> tuple[Optional[bytes], Optional[list[int]]]:
        """(exact key, LSH band keys); None where that kind of dedup is off or the text has no words."""
        key = exact_key(text) if self.cfg.exact else None
        bk = None
        if self.hasher is not None:
            hashes = shingle_hashes(text, self.cfg.ngram)
            if len(hashes):
                bk = band_keys(self.hasher.signature(hashes), self.bands, self.rows)
        return key, bk

    def check(self, keys: tuple[Optional[bytes], Optional[list[int]]]) -> Optional[str]:
        key, bk = keys
        if key is not None and key in self.seen:
            return "exact_duplicate"
        if bk is not None and not self.band_seen.isdisjoint(bk):
            return "near_duplicate"
        if key is not None:
            self.seen.add(key)
        if bk is not None:
            self.band_seen.update(bk)
        self.n_kept += 1
        return None

    def is_duplicate(self, text: str) -> Optional[str]:
        return self.check(self.keys(text))


def jaccard_estimate(a: str, b: str, num_perm: int = 256, ngram: int = 5) -> float:
    """Estimated Jaccard similarity of two texts' shingle sets (for tests and tuning the threshold)."""
    h = MinHasher(num_perm)
    sa, sb = h.signature(shingle_hashes(a, ngram)), h.signature(shingle_hashes(b, ngram))
    return float((sa == sb).mean())
