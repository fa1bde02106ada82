"""Packed data is what its ``manifest.json`` says, checked once per version of each file.

``check_split(folder, manifest, split)`` runs whenever ``TokenShards`` opens a split, so training, ``data
inspect`` and every other reader refuse (``DataError``, naming the shard) before using any token:
  - a shard whose sha256 is not the manifest's (the file changed or is corrupt);
  - a token id >= the manifest's ``vocab_size`` (the data is corrupt, or ``vocab_size`` was edited), naming
    the id and its position in the shard;
  - a missing ``tokenizer.json``, or one that is not the tokenizer the manifest names (a run that could not
    later ``generate`` or ``hf export`` never starts).

Cost. One streaming pass per shard feeds sha256 and the running maximum id (vectorised over 8 MiB blocks,
several shards at once in threads: hashlib and numpy release the GIL), so a first open reads every byte
once at disk / sha256 speed. The facts found — (sha256, max id) — are cached keyed by the file's (size,
mtime_ns, inode) in ``.lmforge-verified.json`` inside the data folder (under the user cache dir when the
folder is read-only). Every later open only ``stat``\\ s the shards: O(number of shards), not O(bytes). A
shard rewritten in any way (a new inode from a rename, a new size or mtime) misses and is hashed again.
``pack_documents`` seeds the cache with the hashes it computed while writing, so a folder that was just
prepared opens without a re-read; a copied folder (new inodes) is hashed on its first open. ``lmforge
data verify`` ignores the cache and re-reads everything. Concurrent openers (the ranks of one job) take
a file lock, so one process hashes and the others then find the cache warm.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np

from lmforge.errors import DataError

CACHE_NAME = ".lmforge-verified.json"
_BLOCK = 1 << 23  # bytes per read: a multiple of every token dtype's size
_FIX = "re-run `lmforge data prepare` to rebuild the folder, or `lmforge data verify {folder}` to list every problem"


class Scan(NamedTuple):
    sha256: str
    max_id: int  # -1 for an empty shard
    first_bad: Optional[tuple[int, int]]  # (position, id) of the first id >= limit, when a limit was given


def scan_shard(path: Path, dtype: np.dtype, limit: Optional[int] = None) -> Scan:
    """One pass over ``path``: sha256 of the bytes, the largest token id, and the first id >= ``limit``."""
    h = hashlib.sha256()
    top, first_bad, pos = -1, None, 0
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
            ids = np.frombuffer(block, dtype=dtype, count=len(block) // dtype.itemsize)
            if len(ids):
                m = int(ids.max())
                top = max(top, m)
                if first_bad is None and limit is not None and m >= limit:
                    i = int(np.flatnonzero(ids >= limit)[0])
                    first_bad = (pos + i, int(ids[i]))
            pos += len(ids)
    return Scan(h.hexdigest(), top, first_bad)


def file_key(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _cache_file(folder: Path) -> Path:
    if os.access(folder, os.W_OK):
        return folder / CACHE_NAME
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lmforge" / "verified"
    return base / (hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:24] + ".json")


def _load(cache: Path, folder: Path) -> dict:
    for f in dict.fromkeys((cache, folder / CACHE_NAME)):  # a read-only folder may still hold an older cache
        try:
            files = json.loads(f.read_text(encoding="utf-8")).get("files", {})
            if isinstance(files, dict):
                return files
        except (OSError, ValueError, AttributeError):
            continue
    return {}


def _save(cache: Path, files: dict) -> None:
    """Atomic replace; a cache that cannot be written only costs a re-hash on the next open."""
    tmp = cache.with_name(f"{cache.name}.tmp-{os.getpid()}")
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"format": 1, "files": files}, indent=1), encoding="utf-8")
        tmp.replace(cache)
    except OSError:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def _locked(folder: Path):
    """Exclusive lock on the folder's manifest.json while the cache is read, filled and written (no-op where
    locking is unavailable). Locking an existing file needs no write access and leaves nothing behind."""
    try:
        import fcntl

        fd = os.open(folder / "manifest.json", os.O_RDONLY)
    except (ImportError, OSError):
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def record(folder: str | Path, facts: dict[str, tuple[str, int]], dtype: str) -> None:
    """Remember (sha256, max id) of freshly written shards of ``folder`` (by file name)."""
    folder = Path(folder)
    cache = _cache_file(folder)
    with _locked(folder):
        files = _load(cache, folder)
        for name, (sha, top) in facts.items():
            files[name] = {"key": file_key(folder / name), "sha256": sha, "max_id": top, "dtype": dtype}
        _save(cache, files)


def _shard_facts(folder: Path, names: list[str], dtype: np.dtype, vocab_size: int, files: dict) -> dict:
    """name → cache entry for every shard, scanning (in threads) those whose key is not cached."""
    keys = {n: file_key(folder / n) for n in names}
    todo = [n for n in names if not (isinstance(files.get(n), dict) and files[n].get("key") == keys[n]
                                     and files[n].get("dtype") == dtype.name)]
    workers = max(1, min(len(todo), os.cpu_count() or 1, 8))
    with ThreadPoolExecutor(workers) as pool:
        for n, scan in zip(todo, pool.map(lambda n: scan_shard(folder / n, dtype, vocab_size), todo)):
            files[n] = {"key": keys[n], "sha256": scan.sha256, "max_id": scan.max_id, "dtype": dtype.name}
            if scan.first_bad:
                files[n]["first_bad"] = [vocab_size, *scan.first_bad]
    return files


def _first_bad(folder: Path, name: str, entry: dict, dtype: np.dtype, vocab_size: int) -> tuple[int, int]:
    """(position, id) of the first id >= vocab_size: remembered from the scan, else found by a re-read."""
    fb = entry.get("first_bad")
    if isinstance(fb, list) and len(fb) == 3 and fb[0] == vocab_size:
        return fb[1], fb[2]
    return scan_shard(folder / name, dtype, vocab_size).first_bad or (-1, entry["max_id"])


def _problem(folder: Path, e: dict, entry: dict, dtype: np.dtype, vocab_size: int) -> Optional[str]:
    f = folder / e["file"]
    bad = None
    if entry["max_id"] >= vocab_size:
        pos, tid = _first_bad(folder, e["file"], entry, dtype, vocab_size)
        bad = f"token id {tid} at position {pos} is >= the manifest's vocab_size {vocab_size}"
    expected = e.get("sha256")
    if not expected:
        return f"{f}: manifest.json lists no sha256 for this shard, so it cannot be verified"
    if entry["sha256"] != expected:
        return (f"{f}: sha256 is {entry['sha256']} but manifest.json says {expected}: the shard changed or is "
                f"corrupt" + (f" ({bad})" if bad else ""))
    return f"{f}: {bad}" if bad else None


def tokenizer_sha256(tok: Path, want: str) -> str:
    """``want`` when ``tok`` holds that tokenizer: its bytes (pack saves exactly the JSON it hashed), else the
    parsed tokenizer's hash (a re-saved copy), so a ``tokenizers`` upgrade that serialises differently does
    not refuse old folders."""
    sha = hashlib.sha256(tok.read_bytes()).hexdigest()
    if sha == want:
        return sha
    from lmforge.data.tokenizer import load_tokenizer

    return load_tokenizer(tok).sha256()


def _check_tokenizer(folder: Path, manifest: dict, files: dict) -> None:
    tok = folder / "tokenizer.json"
    if not tok.is_file():
        raise DataError(f"{tok}: missing from the packed data folder: a model trained on it could not be used by "
                        f"`lmforge generate` or `lmforge hf export`", hint=_FIX.format(folder=folder))
    want = manifest.get("tokenizer_sha256")
    if not want:
        return
    key = file_key(tok)
    entry = files.get("tokenizer.json")
    if not (isinstance(entry, dict) and entry.get("key") == key):
        entry = files["tokenizer.json"] = {"key": key, "sha256": tokenizer_sha256(tok, want)}
    if entry["sha256"] != want:
        raise DataError(f"{tok}: not the tokenizer these shards were made with (its sha256 {entry['sha256']} is "
                        f"not manifest.json's tokenizer_sha256 {want})", hint=_FIX.format(folder=folder))


def check_split(folder: str | Path, manifest: dict, split: str) -> None:
    """Raise ``DataError`` unless every shard of ``split`` (sizes already checked) matches ``manifest``."""
    folder = Path(folder)
    dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
    vocab_size = int(manifest["vocab_size"])
    entries = manifest["splits"][split]
    cache = _cache_file(folder)
    with _locked(folder):
        files = _load(cache, folder)
        before = json.dumps(files, sort_keys=True)
        try:
            _check_tokenizer(folder, manifest, files)
            _shard_facts(folder, [e["file"] for e in entries], dtype, vocab_size, files)
        finally:
            listed = {e["file"] for es in manifest["splits"].values() for e in es} | {"tokenizer.json"}
            files = {k: v for k, v in files.items() if k in listed}
            if json.dumps(files, sort_keys=True) != before:
                _save(cache, files)
    for e in entries:
        problem = _problem(folder, e, files[e["file"]], dtype, vocab_size)
        if problem:
            raise DataError(problem, hint=_FIX.format(folder=folder))
