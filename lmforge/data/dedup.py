"""Exact and near-duplicate removal (MinHash signatures in numpy + ``datasketch`` LSH index).

Exact: blake2b of the text with whitespace runs collapsed and case folded. Near: word n-gram shingles
(each CJK character counts as a word) → MinHash signature → LSH query against every earlier kept
document; a hit above ``threshold`` estimated Jaccard drops the new document. The first copy wins.
Memory: 8 bytes per kept document for exact, ~num_perm*4 bytes per document for near.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from typing import Optional

import numpy as np
from datasketch import MinHash, MinHashLSH

from lmforge.data.config import DedupConfig

_WS = re.compile(r"\s+")
_WORDS = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af]|[^\W\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af]+")
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
    tok = np.fromiter((zlib.crc32(w.encode("utf-8", "surrogatepass")) for w in words), dtype=np.uint64,
                      count=len(words))
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


class Deduplicator:
    """``is_duplicate(text) -> Optional[reason]``; remembers every text it accepted."""

    def __init__(self, cfg: DedupConfig):
        self.cfg = cfg
        self.seen: set[bytes] = set()
        self.hasher = MinHasher(cfg.num_perm) if cfg.near else None
        self.lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm) if cfg.near else None
        self.n_kept = 0

    def is_duplicate(self, text: str) -> Optional[str]:
        if self.cfg.exact:
            key = exact_key(text)
            if key in self.seen:
                return "exact_duplicate"
        mh = None
        if self.lsh is not None:
            hashes = shingle_hashes(text, self.cfg.ngram)
            if len(hashes):
                mh = MinHash(num_perm=self.cfg.num_perm, hashvalues=self.hasher.signature(hashes), scheme="affine32")
                if self.lsh.query(mh):
                    return "near_duplicate"
        if self.cfg.exact:
            self.seen.add(key)
        if mh is not None:
            self.lsh.insert(self.n_kept, mh, check_duplication=False)
        self.n_kept += 1
        return None


def jaccard_estimate(a: str, b: str, num_perm: int = 256, ngram: int = 5) -> float:
    """Estimated Jaccard similarity of two texts' shingle sets (for tests and tuning the threshold)."""
    h = MinHasher(num_perm)
    sa, sb = h.signature(shingle_hashes(a, ngram)), h.signature(shingle_hashes(b, ngram))
    return float((sa == sb).mean())
