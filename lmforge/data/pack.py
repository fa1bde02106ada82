"""Tokenize a document stream and pack it into binary token shards plus ``manifest.json``.

Layout of an output folder::

    manifest.json      format_version, dtype, vocab_size, eos_id, tokenizer_sha256, splits, counts
    tokenizer.json     the tokenizer that produced the ids
    train_00000.bin    raw little-endian uint16/uint32 ids, every document followed by EOS
    val_00000.bin

Documents go to ``val`` by a seeded hash of their text (identical texts always land in the same
split; the first document always goes to val when ``val_fraction > 0`` so val is never empty).
Shards close at the first document boundary after ``shard_tokens`` tokens, are written under a
``.tmp`` name and renamed when complete. ``progress.json`` records finished shards so an
interrupted run resumes without re-tokenizing them.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import numpy as np

from lmforge.data import _tokenize_worker as tw
from lmforge.data.parallel import ordered_map
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import DataError

FORMAT_VERSION = 1
SPLITS = ("train", "val")
DEFAULT_SHARD_TOKENS = 1 << 24
_BATCH_BYTES = 1 << 20  # text per tokenization task


def dtype_for_vocab(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def split_of(text: str, seed: int, val_fraction: float) -> str:
    """Deterministic split for a document: a seeded hash of its text compared with val_fraction."""
    if val_fraction <= 0:
        return "train"
    salt = seed.to_bytes(16, "little", signed=True)
    h = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8, salt=salt)
    return "val" if int.from_bytes(h.digest(), "little") / 2.0**64 < val_fraction else "train"


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _atomic_write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


class _ShardWriter:
    """Buffers (tokens, doc lengths) for one split and writes a shard at each doc boundary past the limit."""

    def __init__(self, out_dir: Path, split: str, dtype: str, shard_tokens: int, entries: list[dict],
                 on_shard: Callable[[], None]):
        self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, np.dtype(dtype), shard_tokens
        self.entries = entries  # finished shards (shared with the progress record)
        self.on_shard = on_shard
        self.max_ids: dict[str, int] = {}  # largest id of each shard written by this run (seeds the hash cache)
        self.buf: list[np.ndarray] = []
        self.buf_tokens = 0
        self.buf_docs = 0

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        while len(lengths):
            ends = np.cumsum(lengths)
            k = int(np.searchsorted(ends, self.shard_tokens - self.buf_tokens))
            if k >= len(lengths):
                self._append(tokens, len(lengths))
                return
            cut = int(ends[k])
            self._append(tokens[:cut], k + 1)
            self.flush()
            tokens, lengths = tokens[cut:], lengths[k + 1:]

    def _append(self, tokens: np.ndarray, docs: int) -> None:
        self.buf.append(tokens.astype(self.dtype, copy=False))
        self.buf_tokens += len(tokens)
        self.buf_docs += docs

    def flush(self) -> None:
        if not self.buf_tokens:
            return
        name = f"{self.split}_{len(self.entries):05d}.bin"
        final = self.out_dir / name
        tmp = self.out_dir / (name + ".tmp")
        h = hashlib.sha256()
        with open(tmp, "wb") as f:
            for arr in self.buf:
                b = arr.astype(self.dtype.newbyteorder("<"), copy=False).tobytes()
                h.update(b)
                f.write(b)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(final)
        self.max_ids[name] = max(int(arr.max()) for arr in self.buf if len(arr))
        self.entries.append({"file": name, "tokens": self.buf_tokens, "documents": self.buf_docs,
                             "sha256": h.hexdigest()})
        self.buf, self.buf_tokens, self.buf_docs = [], 0, 0
        self.on_shard()


def _batches(docs: Iterable[tuple[str, str]], batch_bytes: int) -> Iterator[tuple[list[str], list[bool]]]:
    texts: list[str] = []
    is_val: list[bool] = []
    size = 0
    for text, split in docs:
        texts.append(text)
        is_val.append(split == "val")
        size += len(text)
        if size >= batch_bytes:
            yield texts, is_val
            texts, is_val, size = [], [], 0
    if texts:
        yield texts, is_val


def _encode_batch(batch: tuple[list[str], list[bool]]):
    return tw.encode_docs(*batch)


def _tokenized(batches: Iterator, tokenizer: Tokenizer, dtype: str, num_workers: int) -> Iterator:
    """Yield tw.encode_docs results in input order; at most 2 tasks per worker in flight (flat memory)."""
    return ordered_map(_encode_batch, batches, num_workers, tw.init_worker, (tokenizer.to_json(), tokenizer.eos_id, dtype))


def pack_documents(
    docs: Iterable[str],
    tokenizer: Tokenizer,
    out_dir: str | Path,
    *,
    val_fraction: float = 0.01,
    seed: int = 0,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    num_workers: Optional[int] = None,
    resume: bool = True,
    batch_bytes: Optional[int] = None,
    extra: Optional[dict] = None,
) -> dict:
    """Tokenize ``docs`` (streamed) into shards under ``out_dir``; returns the manifest.

    num_workers: tokenizer processes (0: in this process, None: all CPUs). resume: keep shards that an
    interrupted run with the same settings finished (per ``progress.json``). batch_bytes: text per
    tokenization task. extra: merged into the manifest.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens={shard_tokens} must be >= 1")
    if tokenizer.eos_id is None:
        raise DataError("tokenizer has no end-of-text token; packing needs one to separate documents")
    if num_workers is None:
        num_workers = min(os.cpu_count() or 1, 8)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = dtype_for_vocab(tokenizer.vocab_size)
    settings = {"format_version": FORMAT_VERSION, "dtype": dtype, "seed": seed, "val_fraction": val_fraction,
                "shard_tokens": shard_tokens, "tokenizer_sha256": tokenizer.sha256()}
    progress_path = out / "progress.json"
    progress = _load_progress(out, progress_path, settings) if resume else None
    if progress is None:
        _clear_outputs(out)
        progress = {"settings": settings, "splits": {s: [] for s in SPLITS}}
    tokenizer.save(out / "tokenizer.json")
    skip = {s: sum(e["documents"] for e in progress["splits"][s]) for s in SPLITS}
    resumed = dict(skip)

    def save_progress() -> None:
        _atomic_write_json(progress_path, progress)

    writers = {s: _ShardWriter(out, s, dtype, shard_tokens, progress["splits"][s], save_progress) for s in SPLITS}
    counts = {"documents": {s: 0 for s in SPLITS}, "empty_skipped": 0}
    t0 = time.time()
    in_bytes = 0

    def assigned() -> Iterator[tuple[str, str]]:
        nonlocal in_bytes
        first = True
        for text in docs:
            if not text:
                counts["empty_skipped"] += 1
                continue
            split = "val" if (first and val_fraction > 0) else split_of(text, seed, val_fraction)
            first = False
            counts["documents"][split] += 1
            if skip[split] > 0:  # already inside a finished shard of an interrupted run
                skip[split] -= 1
                continue
            in_bytes += len(text.encode("utf-8", "surrogatepass"))
            yield text, split

    for encoded in _tokenized(_batches(assigned(), batch_bytes or _BATCH_BYTES), tokenizer, dtype, num_workers):
        _route(writers, *encoded)
    for w in writers.values():
        w.flush()
    if any(skip.values()):
        raise DataError(f"{out}: progress.json lists more finished documents than the input has "
                         f"({skip}); the input changed since the interrupted run; delete {progress_path} to start over")
    stats = {"seconds": round(time.time() - t0, 3), "tokenized_bytes": in_bytes}
    manifest = _manifest(settings, tokenizer, progress["splits"], {**counts, "resumed_documents": resumed}, stats,
                         extra, val_fraction, out)
    _atomic_write_json(out / "manifest.json", manifest)
    progress_path.unlink(missing_ok=True)
    from lmforge.data.integrity import record

    record(out, {n: (e["sha256"], w.max_ids[n]) for w in writers.values() for e in w.entries
                 if (n := e["file"]) in w.max_ids}, dtype)
    return manifest


def _route(writers: dict, tokens: np.ndarray, lengths: np.ndarray, is_val: np.ndarray) -> None:
    """Hand each encoded document of a batch to its split's writer, in order."""
    if not is_val.any():
        writers["train"].add(tokens, lengths)
        return
    ends = np.cumsum(lengths)
    starts = ends - lengths
    for split, mask in (("train", ~is_val), ("val", is_val)):
        if mask.any():
            sel = np.concatenate([tokens[a:b] for a, b in zip(starts[mask], ends[mask])])
            writers[split].add(sel, lengths[mask])


def _manifest(settings: dict, tokenizer: Tokenizer, splits: dict, counts: dict, stats: dict, extra: Optional[dict],
              val_fraction: float, out: Path) -> dict:
    """The manifest of a finished pack; an empty train split is refused (and its outputs removed) instead."""
    if not splits["train"]:
        _clear_outputs(out)  # nothing that `data verify` or training would accept is left
        raise DataError(_empty_train_message(counts, val_fraction),
                        hint="give more documents (doc_mode paragraph or line splits a file into several), or set "
                             "output.val_fraction=0")
    return {
        **settings,
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "pad_id": tokenizer.pad_id,
        "splits": splits,
        "counts": {
            "documents": counts["documents"],
            "tokens": {s: sum(e["tokens"] for e in splits[s]) for s in SPLITS},
            "shards": {s: len(splits[s]) for s in SPLITS},
            "empty_skipped": counts["empty_skipped"],
            "resumed_documents": counts["resumed_documents"],
        },
        "stats": stats,
        **(extra or {}),
    }


def _empty_train_message(counts: dict, val_fraction: float) -> str:
    docs = counts["documents"]
    if not docs["train"] and not docs["val"]:
        return f"no documents to pack ({counts['empty_skipped']} empty): the train split would be empty"
    return (f"the train split would be empty: the only {docs['val']} document(s) went to val (the first document "
            f"always does when output.val_fraction={val_fraction} > 0)")


def _load_progress(out: Path, path: Path, settings: dict) -> Optional[dict]:
    if not path.is_file():
        return None
    try:
        progress = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if progress.get("settings") != settings:
        return None
    for split in SPLITS:
        for e in progress["splits"].get(split, []):
            f = out / e["file"]
            if not f.is_file() or f.stat().st_size != e["tokens"] * np.dtype(settings["dtype"]).itemsize:
                return None
    return progress


def _clear_outputs(out: Path) -> None:
    """Remove files a previous pack wrote (never anything else in the folder)."""
    for pattern in ("train_*.bin", "val_*.bin", "*.bin.tmp", "manifest.json", "progress.json", "*.json.tmp",
                    ".lmforge-verified.json"):
        for f in out.glob(pattern):
            f.unlink()


def read_manifest(path: str | Path) -> dict:
    """Load and sanity-check ``manifest.json`` from a packed-data folder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no manifest.json in {path}: no such folder (expected a packed data folder written "
                                f"by `lmforge data prepare`)")
    file = path / "manifest.json" if path.is_dir() else path
    if not file.is_file():
        hint = " (an interrupted prepare left progress.json; rerun it to finish)" if (file.parent / "progress.json").exists() else ""
        raise FileNotFoundError(f"no manifest.json in {file.parent}: not a packed data folder{hint}")
    try:
        m = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{file}:{e.lineno}: not valid JSON ({e.msg})") from None
    for key in ("format_version", "dtype", "vocab_size", "eos_id", "splits"):
        if key not in m:
            raise DataError(f"{file}: missing key '{key}'")
    if m["format_version"] > FORMAT_VERSION:
        raise DataError(f"{file}: format_version {m['format_version']} is newer than this lmforge ({FORMAT_VERSION})")
    if m["dtype"] not in ("uint16", "uint32"):
        raise DataError(f"{file}: dtype must be uint16 or uint32, got {m['dtype']!r}")
    for key in ("vocab_size", "eos_id", "pad_id"):
        if m.get(key) is not None and not isinstance(m[key], int):
            raise DataError(f"{file}: '{key}' must be an integer, got {m[key]!r}")
    for key in ("eos_id", "pad_id"):
        if m.get(key) is not None and not 0 <= m[key] < m["vocab_size"]:
            raise DataError(f"{file}: {key} {m[key]} is outside the vocabulary [0, vocab_size={m['vocab_size']})")
    return m
