"""Per-process cleaning task for prepare.py stage 1: clean + dedup keys (pure, order-independent)."""

from __future__ import annotations

from collections import Counter
from typing import Optional

import numpy as np

from lmforge.data.clean import Cleaner
from lmforge.data.config import CleanConfig, DedupConfig
from lmforge.data.dedup import Deduplicator

_STATE: dict = {}

Result = tuple[Optional[str], Optional[str], Optional[bytes], Optional[np.ndarray]]


def init_worker(clean: dict, dedup: dict) -> None:
    _STATE["cleaner"] = Cleaner(CleanConfig(**clean))
    _STATE["dedup"] = Deduplicator(DedupConfig(**dedup))


def clean_batch(texts: list[str]) -> tuple[list[Result], Counter, int]:
    """Per text (cleaned or None, drop reason or None, exact key, MinHash signature); PII masks counted;
    input UTF-8 bytes."""
    cleaner, dedup = _STATE["cleaner"], _STATE["dedup"]
    cleaner.pii_counts = Counter()
    out: list[Result] = []
    for text in texts:
        cleaned, reason = cleaner(text)
        if cleaned is None:
            out.append((None, reason, None, None))
        else:
            out.append((cleaned, None, *dedup.keys(cleaned)))
    return out, cleaner.pii_counts, sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)
