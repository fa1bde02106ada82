"""Streaming document readers: text/markdown, JSONL (.gz/.zst), Parquet, CSV/TSV, HF save_to_disk folders.

Every reader yields ``(text, where)`` one document at a time (``where`` is ``file:line`` or
``file:row``) and reports bad input to a ``SkipLog``: counted and skipped, or raised as ``BadInput``
naming the file and line in strict mode. Lines are read with a byte limit, so a 100 MB line never
lands in memory.
"""

from __future__ import annotations

import csv
import glob
import gzip
import io
import json
import random
from collections import Counter
from pathlib import Path
from typing import IO, Iterator, Optional

from lmforge.data.config import SourceConfig
from lmforge.errors import DataError

_EXT_TYPES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".csv": "csv",
              ".tsv": "tsv"}
_HF_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")


class BadInput(DataError):
    """Bad input in strict mode; the message starts with ``file:line``."""


class SkipLog:
    """Counts skipped inputs by reason (and remembers a few examples); raises instead in strict mode."""

    def __init__(self, strict: bool = False):
        self.strict = strict
        self.counts: Counter = Counter()
        self.examples: dict[str, list[str]] = {}

    def skip(self, reason: str, where: str, detail: str = "") -> None:
        msg = f"{where}: {reason}" + (f" ({detail})" if detail else "")
        if self.strict:
            raise BadInput(msg)
        self.counts[reason] += 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < 3:
            ex.append(msg)


def _open_binary(path: Path) -> IO[bytes]:
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".zst") or name.endswith(".zstd"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def _base_suffix(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    while suffixes and suffixes[-1] in (".gz", ".zst", ".zstd"):
        suffixes.pop()
    return suffixes[-1] if suffixes else ""


def file_type(path: Path, declared: str) -> str:
    if declared != "auto":
        return declared
    if path.is_dir():
        return "hf"
    return _EXT_TYPES.get(_base_suffix(path), "text")


def expand_paths(src: SourceConfig) -> list[Path]:
    """Files of a source (sorted, deterministic). An HF folder is returned as itself."""
    p = Path(src.path).expanduser()
    if any(ch in src.path for ch in "*?["):
        files = [Path(f) for f in sorted(glob.glob(str(p), recursive=True))]
        files = [f for f in files if f.is_file() or (f / "dataset_info.json").exists()]
    elif p.is_dir():
        if src.type == "hf" or any((p / m).exists() for m in _HF_MARKERS):
            return [p]
        files = sorted(f for f in p.rglob("*") if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts))
    elif p.exists():
        files = [p]
    else:
        raise FileNotFoundError(f"source '{src.path}': no such file, folder or glob match")
    if not files:
        raise FileNotFoundError(f"source '{src.path}': matched no files")
    return files


def _lines(f: IO[bytes], where: str, log: SkipLog, limit: int) -> Iterator[tuple[int, str]]:
    """(line number, decoded line without newline); over-long or undecodable lines are skipped."""
    n = 0
    while True:
        raw = f.readline(limit + 1)
        if not raw:
            return
        n += 1
        if len(raw) > limit and not raw.endswith(b"\n"):
            while raw and not raw.endswith(b"\n"):  # drain the rest of the line in bounded chunks
                raw = f.readline(1 << 20)
            log.skip("too_long", f"{where}:{n}", f"line over {limit} bytes")
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            log.skip("invalid_utf8", f"{where}:{n}", str(e.reason))
            continue
        yield n, text.rstrip("\r\n") if text.endswith("\n") else text


def _looks_binary(path: Path) -> bool:
    with _open_binary(path) as f:
        head = f.read(8192)
    return b"\0" in head


def read_text(path: Path, mode: str, log: SkipLog, max_bytes: int) -> Iterator[tuple[str, str]]:
    where = str(path)
    if path.stat().st_size == 0:
        log.skip("empty_file", where)
        return
    if _looks_binary(path):
        log.skip("binary", where)
        return
    if mode == "file":
        with _open_binary(path) as f:
            raw = f.read(max_bytes + 1)
        if len(raw) > max_bytes:
            log.skip("too_long", where, f"file over {max_bytes} bytes")
            return
        try:
            yield raw.decode("utf-8"), where
        except UnicodeDecodeError as e:
            line = raw[: e.start].count(b"\n") + 1
            log.skip("invalid_utf8", f"{where}:{line}", str(e.reason))
        return
    with _open_binary(path) as f:
        para: list[str] = []
        start = 1
        for n, line in _lines(f, where, log, max_bytes):
            if mode == "line":
                if line.strip():
                    yield line, f"{where}:{n}"
                continue
            if line.strip():
                if not para:
                    start = n
                para.append(line)
            elif para:
                yield "\n".join(para), f"{where}:{start}"
                para = []
        if para:
            yield "\n".join(para), f"{where}:{start}"


def read_jsonl(path: Path, field: str, log: SkipLog, max_bytes: int) -> Iterator[tuple[str, str]]:
    with _open_binary(path) as f:
        for n, line in _lines(f, str(path), log, max_bytes):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                log.skip("malformed_json", where, e.msg)
                continue
            if not isinstance(obj, dict):
                log.skip("missing_field", where, f"the line is a JSON {type(obj).__name__}, not an object")
                continue
            value = obj.get(field)
            if not isinstance(value, str):
                found = "; keys: " + ", ".join(map(str, obj)) if obj else "; the object is empty"
                what = f"no string field '{field}'" if value is None else f"'{field}' is {type(value).__name__}"
                log.skip("missing_field", where, what + found)
                continue
            yield value, where


def read_csv(path: Path, field: str, delimiter: str, log: SkipLog, max_bytes: int) -> Iterator[tuple[str, str]]:
    csv.field_size_limit(max_bytes)
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    with _open_binary(path) as fb:
        f = io.TextIOWrapper(fb, encoding="utf-8", newline="")
        reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
        try:
            header = next(reader, None)
        except (UnicodeDecodeError, csv.Error) as e:
            log.skip("malformed_csv", f"{path}:1", str(e))
            return
        if header is None:
            log.skip("empty_file", str(path))
            return
        if field not in header:
            log.skip("missing_column", f"{path}:1", f"no column '{field}'; the header's columns: {', '.join(header)}")
            return
        col = header.index(field)
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except UnicodeDecodeError as e:
                log.skip("invalid_utf8", f"{path}:{reader.line_num + 1}", f"{e.reason}; rest of file skipped")
                return
            except csv.Error as e:
                log.skip("malformed_csv", f"{path}:{reader.line_num}", str(e))
                continue
            where = f"{path}:{reader.line_num}"
            if not row:  # a blank line
                continue
            if len(row) != len(header):
                log.skip("bad_row", where, f"{len(row)} fields, the header has {len(header)}")
                continue
            yield row[col], where


def read_parquet(path: Path, field: str, log: SkipLog) -> Iterator[tuple[str, str]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        log.skip("malformed_parquet", str(path), str(e))
        return
    if field not in pf.schema_arrow.names:
        log.skip("missing_column", str(path), f"no column '{field}'; columns: {', '.join(pf.schema_arrow.names)}")
        return
    row = 0
    for batch in pf.iter_batches(batch_size=1024, columns=[field]):
        for value in batch.column(0).to_pylist():
            row += 1
            if not isinstance(value, str):
                log.skip("missing_field", f"{path}:row {row}", f"'{field}' is {type(value).__name__}")
                continue
            yield value, f"{path}:row {row}"


def read_hf(path: Path, field: str, split: Optional[str], log: SkipLog) -> Iterator[tuple[str, str]]:
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        names = list(ds)
        pick = split or ("train" if "train" in ds else (names[0] if len(names) == 1 else None))
        if pick not in ds:
            raise BadInput(f"{path}: choose hf_split from {names}")
        ds = ds[pick]
    if field not in ds.column_names:
        log.skip("missing_column", str(path), f"no column '{field}'; columns: {', '.join(ds.column_names)}")
        return
    row = 0
    for batch in ds.select_columns([field]).iter(batch_size=1000):
        for value in batch[field]:
            row += 1
            if not isinstance(value, str):
                log.skip("missing_field", f"{path}:row {row}", f"'{field}' is {type(value).__name__}")
                continue
            yield value, f"{path}:row {row}"


def iter_source(src: SourceConfig, log: SkipLog, max_bytes: int) -> Iterator[tuple[str, str]]:
    """All documents of one source, file by file."""
    for path in expand_paths(src):
        kind = file_type(path, src.type)
        if kind == "hf":
            yield from read_hf(path, src.field, src.hf_split, log)
        elif path.is_file() and path.stat().st_size == 0:
            log.skip("empty_file", str(path))
        elif kind == "text":
            yield from read_text(path, src.doc_mode, log, max_bytes)
        elif kind == "jsonl":
            yield from read_jsonl(path, src.field, log, max_bytes)
        elif kind in ("csv", "tsv"):
            yield from read_csv(path, src.field, "\t" if kind == "tsv" else ",", log, max_bytes)
        elif kind == "parquet":
            yield from read_parquet(path, src.field, log)


def interleave(streams: list[Iterator], weights: list[float], seed: int) -> Iterator[tuple[int, object]]:
    """Mix streams: each next item comes from a live stream chosen with probability ∝ weight."""
    rng = random.Random(seed)
    live = list(range(len(streams)))
    while live:
        i = rng.choices(live, weights=[weights[j] for j in live])[0] if len(live) > 1 else live[0]
        try:
            item = next(streams[i])
        except StopIteration:
            live.remove(i)
            continue
        yield i, item
