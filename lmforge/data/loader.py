"""Memory-mapped token shards and the batch loaders the trainer uses.

Legend: B = batch size, T = sequence length.

``RandomWindowLoader`` views a split as one token stream cut into N = len // T - 1 non-overlapping
windows of T+1 tokens (inputs + next-token labels) starting at ``offset_e + i*T``, where epoch ``e``
has its own random offset and permutation of the N windows (seeded by (seed, e)). Global sample ``j``
is window ``perm_e[j % N]`` of epoch ``e = j // N``; rank ``r`` of ``W`` at its call ``s`` takes
samples ``j = (s*B + b)*W + r``. So a batch is a pure function of (seed, rank, world_size, step),
ranks never share a window within an epoch, and resuming only needs the sample counter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from lmforge.data.integrity import check_split
from lmforge.data.pack import read_manifest
from lmforge.errors import DataError


class MissingSplit(DataError, KeyError):
    """A split manifest.json does not list (also a KeyError: callers treat a missing ``val`` as optional)."""

    __str__ = Exception.__str__


class TokenShards:
    """All shards of one split, memory-mapped and addressed as one contiguous token stream. Opening a split
    refuses (``DataError``) shards that do not match manifest.json (see ``integrity.check_split``)."""

    def __init__(self, path: str | Path, split: str = "train"):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        splits = self.manifest["splits"]
        if split not in splits:
            raise MissingSplit(f"{self.path}/manifest.json has no split '{split}' (has: {', '.join(splits)})")
        self.split = split
        self.dtype = np.dtype(self.manifest["dtype"]).newbyteorder("<")
        self.vocab_size: int = int(self.manifest["vocab_size"])
        self.eos_id: int = int(self.manifest["eos_id"])
        self.pad_id: Optional[int] = self.manifest.get("pad_id")
        self._maps: list[np.ndarray] = []
        fix = f"re-run `lmforge data prepare`, or `lmforge data verify {self.path}` to list every problem"
        for e in splits[split]:
            f = self.path / e["file"]
            if not f.is_file():
                raise DataError(f"{f}: shard listed in manifest.json is missing", hint=fix)
            size = f.stat().st_size
            if size != e["tokens"] * self.dtype.itemsize:
                raise DataError(f"{f}: {size} bytes but manifest.json says {e['tokens']} tokens of {self.dtype.name} "
                                f"({e['tokens'] * self.dtype.itemsize} bytes): the shard is truncated or was "
                                f"replaced", hint=fix)
        check_split(self.path, self.manifest, split)  # sha256, id range, tokenizer.json; hashed once per file
        for e in splits[split]:
            if e["tokens"]:
                self._maps.append(np.memmap(self.path / e["file"], dtype=self.dtype, mode="r"))
        lens = np.array([len(m) for m in self._maps], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(lens)])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start+length) as int64, crossing shard boundaries as needed."""
        if start < 0 or start + length > len(self):
            raise IndexError(f"read [{start}, {start + length}) outside split '{self.split}' of {len(self)} tokens")
        parts = []
        i = int(np.searchsorted(self._starts, start, side="right")) - 1
        while length > 0:
            off = start - int(self._starts[i])
            take = min(length, len(self._maps[i]) - off)
            parts.append(self._maps[i][off:off + take])
            start, length, i = start + take, length - take, i + 1
        return np.concatenate(parts).astype(np.int64) if len(parts) > 1 else parts[0].astype(np.int64)


def _doc_ids(window_T1: np.ndarray, eos_id: int) -> np.ndarray:
    """Document index per input position: EOS belongs to the document it ends."""
    inputs_T = window_T1[:-1]
    is_eos = (inputs_T == eos_id).astype(np.int64)
    return np.cumsum(is_eos) - is_eos


def _make_batch(windows_BT1: np.ndarray, eos_id: int, doc_mask: bool) -> dict:
    arr = torch.from_numpy(windows_BT1)
    batch = {"input_ids": arr[:, :-1].contiguous(), "labels": arr[:, 1:].contiguous()}
    if doc_mask:
        batch["doc_ids"] = torch.from_numpy(np.stack([_doc_ids(w, eos_id) for w in windows_BT1]))
    return batch


class RandomWindowLoader:
    """Random, rank-disjoint training windows; exact resume through ``state_dict``."""

    def __init__(self, shards: TokenShards, seq_len: int, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, doc_mask: bool = False):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len={seq_len} and batch_size={batch_size} must be >= 1")
        self.shards, self.seq_len, self.batch_size = shards, seq_len, batch_size
        self.seed, self.rank, self.world_size, self.doc_mask = seed, rank, world_size, doc_mask
        self.num_windows = len(shards) // seq_len - 1
        if self.num_windows < world_size:
            raise DataError(f"split '{shards.split}' of {shards.path} has {len(shards)} tokens: too few for "
                             f"{world_size} rank(s) of windows of data.seq_len={seq_len}+1 tokens")
        self.samples = 0  # global samples consumed by all ranks together
        self._epoch_cache: tuple[int, int, np.ndarray] | None = None

    @property
    def step(self) -> int:
        return self.samples // (self.batch_size * self.world_size)

    def _epoch(self, e: int) -> tuple[int, np.ndarray]:
        if self._epoch_cache is None or self._epoch_cache[0] != e:
            rng = np.random.default_rng([self.seed, e])
            offset = int(rng.integers(self.seq_len))
            self._epoch_cache = (e, offset, rng.permutation(self.num_windows))
        return self._epoch_cache[1], self._epoch_cache[2]

    def window_start(self, j: int) -> int:
        """Start token of global sample ``j``."""
        e, i = divmod(j, self.num_windows)
        offset, perm = self._epoch(e)
        return offset + int(perm[i]) * self.seq_len

    def next_batch(self) -> dict:
        B, W, T = self.batch_size, self.world_size, self.seq_len
        js = [self.samples + b * W + self.rank for b in range(B)]
        windows_BT1 = np.stack([self.shards.read(self.window_start(j), T + 1) for j in js])
        self.samples += B * W
        return _make_batch(windows_BT1, self.shards.eos_id, self.doc_mask)

    def __iter__(self) -> Iterator[dict]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {"samples": self.samples, "seed": self.seed, "seq_len": self.seq_len,
                "num_tokens": len(self.shards), "batch_size": self.batch_size, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        """Continue after ``state``. A different world_size or batch_size is allowed (samples continue)."""
        for key, mine in (("seed", self.seed), ("seq_len", self.seq_len), ("num_tokens", len(self.shards))):
            if state.get(key) != mine:
                raise DataError(f"loader state has {key}={state.get(key)} but this loader has {key}={mine}; "
                                 f"resuming would not continue the same data stream")
        self.samples = int(state["samples"])


class SequentialEvalLoader:
    """Fixed validation windows: starts 0, T, 2T, ... (strided across ranks), at most ``max_batches``."""

    def __init__(self, shards: TokenShards, seq_len: int, batch_size: int, max_batches: Optional[int] = None,
                 rank: int = 0, world_size: int = 1, doc_mask: bool = False):
        self.shards, self.seq_len, self.batch_size = shards, seq_len, batch_size
        self.rank, self.world_size, self.doc_mask = rank, world_size, doc_mask
        n_windows = (len(shards) - 1) // seq_len
        if n_windows < 1:
            raise DataError(f"split '{shards.split}' of {shards.path} has {len(shards)} tokens: fewer than one "
                             f"window of data.seq_len={seq_len}+1 tokens")
        usable = max(n_windows // world_size, 1) * world_size  # equal batch counts on every rank
        mine = list(range(rank, min(usable, n_windows), world_size))
        n_batches = -(-len(mine) // batch_size)
        if max_batches is not None:
            n_batches = min(n_batches, max_batches)
        self._batches = [mine[i * batch_size:(i + 1) * batch_size] for i in range(n_batches)]

    def __len__(self) -> int:
        return len(self._batches)

    @property
    def batch_windows(self) -> list[list[int]]:
        """The global window indices of each batch, in order."""
        return self._batches

    def __iter__(self) -> Iterator[dict]:
        T = self.seq_len
        for idx in self._batches:
            windows_BT1 = np.stack([self.shards.read(i * T, T + 1) for i in idx])
            yield _make_batch(windows_BT1, self.shards.eos_id, self.doc_mask)
