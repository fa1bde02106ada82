"""``lmforge data verify`` (re-check shards against manifest.json) and ``lmforge data inspect``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lmforge.data import integrity
from lmforge.data.pack import read_manifest


def verify(path: str | Path, check_ids: bool = True) -> list[str]:
    """Every problem found (empty list: the folder is intact). Checks presence, size, sha256, id range (one
    pass per shard, never the open-time cache), the tokenizer hash, and that no stray temporary or unlisted
    shards remain."""
    path = Path(path)
    try:
        m = read_manifest(path)
    except (FileNotFoundError, ValueError) as e:
        return [str(e)]
    problems = []
    dtype = np.dtype(m["dtype"]).newbyteorder("<")
    listed = set()
    scanned: dict[str, tuple[str, int]] = {}  # facts re-read now: refresh the open-time cache with them
    for split, entries in m["splits"].items():
        for e in entries:
            f = path / e["file"]
            listed.add(e["file"])
            if not f.is_file():
                problems.append(f"{f}: missing")
                continue
            size = f.stat().st_size
            if size != e["tokens"] * dtype.itemsize:
                problems.append(f"{f}: {size} bytes, manifest says {e['tokens']} tokens ({e['tokens'] * dtype.itemsize} bytes)")
                continue
            scan = integrity.scan_shard(f, dtype, m["vocab_size"])  # sha256 and id range in one pass
            scanned[e["file"]] = (scan.sha256, scan.max_id)
            if scan.sha256 != e.get("sha256"):
                problems.append(f"{f}: sha256 mismatch (file changed or corrupt): {scan.sha256}, manifest says "
                                f"{e.get('sha256')}")
            if check_ids and scan.first_bad:
                pos, tid = scan.first_bad
                problems.append(f"{f}: token id {tid} at position {pos} >= vocab_size {m['vocab_size']}")
    tok = path / "tokenizer.json"
    if not tok.is_file():
        problems.append(f"{tok}: missing")
    elif m.get("tokenizer_sha256"):
        if integrity.tokenizer_sha256(tok, m["tokenizer_sha256"]) != m["tokenizer_sha256"]:
            problems.append(f"{tok}: sha256 differs from manifest tokenizer_sha256")
    for f in sorted(path.glob("*.bin")):
        if f.name not in listed:
            problems.append(f"{f}: shard not listed in manifest.json")
    for f in sorted(path.glob("*.tmp")):
        problems.append(f"{f}: leftover temporary file from an interrupted write")
    if scanned:
        integrity.record(path, scanned, dtype.name)
    return problems


def inspect_data(path: str | Path, split: str = "train", samples: int = 3, sample_tokens: int = 64,
                 top: int = 20, seed: int = 0) -> dict:
    """Manifest summary, most frequent tokens, document-length percentiles and decoded sample windows
    (token statistics over at most the first 4M tokens of ``split``)."""
    from lmforge.data.loader import TokenShards
    from lmforge.data.tokenizer import load_tokenizer

    path = Path(path)
    shards = TokenShards(path, split)
    tok = load_tokenizer(path)
    n = min(len(shards), 4_000_000)
    tokens = shards.read(0, n) if n else np.zeros(0, dtype=np.int64)
    counts = np.bincount(tokens, minlength=shards.vocab_size)
    order = np.argsort(-counts)[:top]
    eos_pos = np.flatnonzero(tokens == shards.eos_id)
    doc_lens = np.diff(np.concatenate([[-1], eos_pos])) if len(eos_pos) else np.zeros(0)
    rng = np.random.default_rng(seed)
    windows = []
    for _ in range(samples if len(shards) > sample_tokens else 0):
        start = int(rng.integers(0, len(shards) - sample_tokens))
        windows.append({"start": start, "text": tok.decode(shards.read(start, sample_tokens).tolist())})
    return {
        "manifest": read_manifest(path), "split": split, "tokens_scanned": int(n),
        "top_tokens": [{"id": int(i), "token": tok.decode([int(i)]), "count": int(counts[i]),
                        "fraction": float(counts[i] / max(n, 1))} for i in order if counts[i]],
        "distinct_tokens": int((counts > 0).sum()),
        "doc_length_percentiles": {str(q): float(np.percentile(doc_lens, q)) for q in (5, 50, 95, 100)} if len(doc_lens) else {},
        "samples": windows,
    }


def print_inspect(report: dict, console) -> None:
    from rich.table import Table

    m = report["manifest"]
    c = m.get("counts", {})
    t = Table(title=f"packed data: {report['split']} split", header_style="bold")
    t.add_column("item")
    t.add_column("value", justify="right")
    t.add_row("format / dtype / vocab", f"v{m['format_version']} / {m['dtype']} / {m['vocab_size']}")
    t.add_row("eos id / pad id", f"{m['eos_id']} / {m.get('pad_id')}")
    for key in ("documents", "tokens", "shards"):
        if key in c:
            t.add_row(f"{key} train / val", f"{c[key].get('train', 0):,} / {c[key].get('val', 0):,}")
    t.add_row("tokenizer sha256", str(m.get("tokenizer_sha256", ""))[:16] + "…")
    t.add_row("distinct tokens (scanned)", f"{report['distinct_tokens']:,} of {m['vocab_size']:,}")
    for q, v in report["doc_length_percentiles"].items():
        t.add_row(f"doc length p{q} (tokens)", f"{v:,.0f}")
    console.print(t)
    h = Table(title="most frequent tokens", header_style="bold")
    for col in ("id", "token", "count", "share"):
        h.add_column(col, justify="right" if col != "token" else "left")
    peak = max((r["fraction"] for r in report["top_tokens"]), default=1.0)
    for r in report["top_tokens"]:
        bar = "█" * max(1, round(20 * r["fraction"] / peak))
        h.add_row(str(r["id"]), repr(r["token"]), f"{r['count']:,}", f"{100 * r['fraction']:.2f}% {bar}")
    console.print(h)
    for s in report["samples"]:
        console.rule(f"window at token {s['start']:,}")
        console.print(s["text"], markup=False, highlight=False)
