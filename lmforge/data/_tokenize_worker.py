"""Per-process tokenization task for pack.py (kept tiny so worker processes import little)."""

from __future__ import annotations

import os
from itertools import chain

import numpy as np
from tokenizers import Tokenizer as _HFTokenizer

from lmforge.data.fast_bpe import FastByteLevelBPE

_STATE: dict = {}


def init_worker(tokenizer_json: str, eos_id: int, dtype: str) -> None:
    hf = _HFTokenizer.from_str(tokenizer_json)
    _STATE["tok"] = hf
    # LMFORGE_FAST_BPE=0 forces the plain tokenizers path (identical ids, slower).
    _STATE["fast"] = FastByteLevelBPE.maybe(hf) if os.environ.get("LMFORGE_FAST_BPE", "1") != "0" else None
    _STATE["eos"] = eos_id
    _STATE["dtype"] = np.dtype(dtype)


def encode_docs(texts: list[str], is_val: list[bool]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Encode a batch; returns (tokens with EOS after each doc, per-doc lengths incl. EOS, is_val mask)."""
    tok, fast, eos, dtype = _STATE["tok"], _STATE["fast"], _STATE["eos"], _STATE["dtype"]
    if fast is not None:
        ids = fast.encode_batch(texts)
    else:
        ids = [e.ids for e in tok.encode_batch_fast(texts, add_special_tokens=False)]
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids)) + 1
    eos_list = [eos]
    out = np.fromiter(chain.from_iterable(x + eos_list for x in ids), dtype=dtype, count=int(lengths.sum()))
    return out, lengths, np.asarray(is_val, dtype=bool)
