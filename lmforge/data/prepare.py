"""``lmforge data prepare``: sources → clean → dedup → mix → tokenizer → packed shards.

Stages, each resumable:
  1. stage text: read every source, clean, deduplicate (across sources), apply mixing weights, write
     ``_staging/docs.jsonl.zst`` (renamed into place when complete, with ``stage1.json`` stats);
  2. tokenizer: load ``tokenizer.path`` or train on the staged text (saved in ``_staging``);
  3. pack: ``pack_documents`` (finished shards of an interrupted run are kept).
A rerun after an interruption skips finished stages. A rerun after a completed run checks the
recorded inputs (config + input files' size/mtime, ``fingerprint.py``): unchanged → "up to date", no
work; changed → redone, saying why. ``force=True`` always redoes everything.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Iterator, Optional

from lmforge.data import _clean_worker as cw
from lmforge.data.config import PrepareConfig
from lmforge.data.dedup import Deduplicator
from lmforge.data.fingerprint import digest, explain_change, inputs_of, outputs_intact
from lmforge.data.pack import _atomic_write_json, _clear_outputs, pack_documents
from lmforge.data.parallel import ordered_map
from lmforge.data.sources import SkipLog, interleave, iter_source
from lmforge.data.tokenizer import Tokenizer, load_tokenizer, train_tokenizer
from lmforge.errors import DataError, UserError

STAGING = "_staging"


def _fingerprint(cfg: PrepareConfig, files: list) -> str:
    """What the staged text depends on: sources, cleaning, dedup, strictness, seed and the input files."""
    parts = cfg.model_dump(mode="json", include={"sources", "clean", "dedup", "strict"})
    parts["seed"] = cfg.output.seed
    parts["files"] = files
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def read_staged(path: Path) -> Iterator[str]:
    import zstandard

    with open(path, "rb") as fb, zstandard.ZstdDecompressor().stream_reader(fb) as zr:
        for line in io.TextIOWrapper(zr, encoding="utf-8"):
            yield json.loads(line)["text"]


_CLEAN_BATCH_CHARS = 1 << 18  # text per cleaning task


def _clean_batches(items: Iterator) -> Iterator[list]:
    batch, size, batch_chars = [], 0, _CLEAN_BATCH_CHARS
    for item in items:
        batch.append(item)
        size += len(item[1][0])
        if size >= batch_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _clean_task(batch: list) -> tuple[list, list, Counter, int]:
    return ([i for i, _ in batch], *cw.clean_batch([text for _, (text, _) in batch]))


def stage_text(cfg: PrepareConfig, staging: Path, num_workers: int = 0) -> dict:
    """Stage 1. Returns stats: per-source counts, dropped by reason, PII masks, bytes.

    Cleaning and dedup keys run in ``num_workers`` processes; the keep/drop decisions are made here in
    input order, so the output does not depend on the worker count.
    """
    import zstandard

    log = SkipLog(strict=cfg.strict)
    dedup = Deduplicator(cfg.dedup)
    rng = random.Random(cfg.output.seed)
    labels = [s.label for s in cfg.sources]
    per_source = {lab: Counter() for lab in labels}
    dropped: Counter = Counter()
    pii_counts: Counter = Counter()
    max_bytes = cfg.clean.max_chars * 4  # UTF-8 bound: longer raw input can never pass max_chars
    streams = [iter_source(s, log, max_bytes) for s in cfg.sources]
    tmp = staging / "docs.jsonl.zst.tmp"
    out_bytes = in_bytes = docs_out = 0
    batches = _clean_batches(interleave(streams, [s.weight for s in cfg.sources], cfg.output.seed))
    init = (cfg.clean.model_dump(), cfg.dedup.model_dump())
    with open(tmp, "wb") as fb, zstandard.ZstdCompressor(level=3).stream_writer(fb) as zw:
        for source_ids, results, pii, nbytes in ordered_map(_clean_task, batches, num_workers, cw.init_worker, init):
            pii_counts.update(pii)
            in_bytes += nbytes
            for i, (cleaned, reason, *keys) in zip(source_ids, results):
                c = per_source[labels[i]]
                c["in"] += 1
                if cleaned is None or (reason := dedup.check(keys)) is not None:
                    dropped[reason] += 1
                    c[reason] += 1
                    continue
                w = cfg.sources[i].weight
                copies = int(w) + (rng.random() < w - int(w))
                if not copies:
                    dropped["downsampled"] += 1
                    c["downsampled"] += 1
                    continue
                line = (json.dumps({"text": cleaned}, ensure_ascii=False) + "\n").encode("utf-8", "surrogatepass")
                for _ in range(copies):
                    zw.write(line)
                c["out"] += copies
                docs_out += copies
                out_bytes += copies * len(cleaned.encode("utf-8", "surrogatepass"))
    tmp.replace(staging / "docs.jsonl.zst")
    return {
        "sources": {lab: dict(c) for lab, c in per_source.items()},
        "skipped_input": dict(log.counts), "skipped_examples": log.examples,
        "dropped": dict(dropped), "pii_masked": dict(pii_counts),
        "documents_out": docs_out, "bytes_in": in_bytes, "bytes_out": out_bytes,
    }


def _tokenizer(cfg: PrepareConfig, staging: Path, docs_path: Path) -> Tokenizer:
    t = cfg.tokenizer
    if t.path:
        return load_tokenizer(t.path)
    saved = staging / "tokenizer.json"
    if saved.is_file():
        return load_tokenizer(saved)

    def sample() -> Iterator[str]:
        total = 0
        for text in read_staged(docs_path):
            yield text
            total += len(text)
            if total >= t.train_max_bytes:
                return

    tok = train_tokenizer(sample(), t.vocab_size, special_tokens=t.special_tokens, min_frequency=t.min_frequency)
    tok.save(saved)
    return tok


def _workers(cfg: PrepareConfig) -> int:
    n = cfg.output.num_workers
    return min(os.cpu_count() or 1, 8) if n is None else n


def _previous(out: Path, inputs: dict, force: bool) -> tuple[Optional[dict], list[str]]:
    """(manifest, []) when a completed output matches ``inputs``; else (None, reasons to redo)."""
    path = out / "manifest.json"
    if not path.is_file():
        return None, []
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
        problem = outputs_intact(out, old)
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, [f"{path} is unreadable ({e})"]
    if force:
        return None, ["--force"]
    reasons = explain_change(old.get("prepare", {}).get("inputs"), inputs)
    if not reasons and problem:
        reasons = [problem]
    return (old, []) if not reasons else (None, reasons)


def prepare(cfg: PrepareConfig, console=None, force: bool = False) -> dict:
    """Run all stages; returns the manifest (with a ``prepare`` section of stats).

    A completed output with the same inputs is returned as is (``manifest["prepare"]["up_to_date"]``);
    ``force`` redoes everything.
    """
    t0 = time.time()
    out = Path(cfg.output.dir)
    inputs = inputs_of(cfg)
    if cfg.tokenizer.path and load_tokenizer(cfg.tokenizer.path).eos_id is None:  # refused before any work
        raise DataError(f"tokenizer.path={cfg.tokenizer.path}: the tokenizer has no end-of-text token; packing "
                        f"needs one to separate documents")
    done, reasons = _previous(out, inputs, force)
    if done is not None:
        if console:
            console.print(f"[bold green]up to date[/]: {out} was built from this config and these input files "
                          f"(unchanged sizes/mtimes); nothing to do (--force to redo)")
        done.setdefault("prepare", {})["up_to_date"] = True
        return done
    staging = out / STAGING
    if reasons:
        if console:
            console.print(f"[bold yellow]redoing[/] {out}: " + "; ".join(reasons), highlight=False)
        shutil.rmtree(staging, ignore_errors=True)  # the previous output stays until new text is staged
    created = not out.exists()
    try:
        return _prepare_stages(cfg, out, inputs, reasons, console, t0)
    except UserError:  # bad input: leave nothing half-made (an interruption keeps its resumable stages)
        shutil.rmtree(out if created else staging, ignore_errors=True)
        raise


def _prepare_stages(cfg: PrepareConfig, out: Path, inputs: dict, reasons: list[str], console, t0: float) -> dict:
    staging = out / STAGING
    staging.mkdir(parents=True, exist_ok=True)
    docs_path = staging / "docs.jsonl.zst"
    stage1_path = staging / "stage1.json"
    fp = _fingerprint(cfg, inputs["files"])
    stage1 = json.loads(stage1_path.read_text()) if stage1_path.is_file() else None
    resumed_stage1 = bool(stage1 and stage1.get("fingerprint") == fp and docs_path.is_file())
    if not resumed_stage1:
        for f in staging.iterdir():
            f.unlink()
        if console:
            console.print(f"[bold]stage 1/3[/] reading, cleaning and deduplicating {len(cfg.sources)} source(s)")
        stage1 = {"fingerprint": fp, "seconds": 0.0, **stage_text(cfg, staging, _workers(cfg))}
        stage1["seconds"] = round(time.time() - t0, 3)
        _atomic_write_json(stage1_path, stage1)
    if not stage1["documents_out"]:
        raise DataError(nothing_staged_message(stage1), hint=nothing_staged_hint(stage1))
    if not resumed_stage1:
        _clear_outputs(out)  # only now: the previous output (or an interrupted pack's shards) is replaced
    warnings = skipped_share_warnings(stage1, cfg.max_skipped_fraction)
    t1 = time.time()
    if console:
        console.print("[bold]stage 2/3[/] " + (f"loading tokenizer {cfg.tokenizer.path}" if cfg.tokenizer.path
                      else f"training byte-level BPE tokenizer (vocab {cfg.tokenizer.vocab_size})"))
    tok = _tokenizer(cfg, staging, docs_path)
    t2 = time.time()
    if console:
        console.print(f"[bold]stage 3/3[/] tokenizing and packing into {out}")
    o = cfg.output
    manifest = pack_documents(read_staged(docs_path), tok, out, val_fraction=o.val_fraction, seed=o.seed,
                              shard_tokens=o.shard_tokens, num_workers=o.num_workers, resume=True)
    t3 = time.time()
    stats = {k: v for k, v in stage1.items() if k != "fingerprint"}
    stats.update({"resumed_stage1": resumed_stage1, "tokenizer_seconds": round(t2 - t1, 3),
                  "pack_seconds": round(t3 - t2, 3), "total_seconds": round(t3 - t0, 3),
                  "tokenizer_trained": not cfg.tokenizer.path, "inputs": inputs, "inputs_sha256": digest(inputs),
                  "redo_reasons": reasons, "warnings": warnings})
    manifest["prepare"] = stats
    _atomic_write_json(out / "manifest.json", manifest)
    if not o.keep_staging:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


_HINTS = {"missing_field": "set the source's field (--field) to one of the keys found",
          "missing_column": "set the source's field (--field) to one of the columns listed",
          "binary": "point the source at text files", "empty_file": "the input files are empty",
          "bad_row": "every row needs as many fields as the header (quote fields holding the delimiter)"}


def _records(stage1: dict) -> tuple[int, int]:
    """(records read from the inputs, of which skipped as bad input)."""
    skipped = sum(stage1.get("skipped_input", {}).values())
    return skipped + sum(s.get("in", 0) for s in stage1.get("sources", {}).values()), skipped


def _skips(stage1: dict) -> str:
    """'missing_field ×3 (first: a.jsonl:1: ...), bad_row ×1 (first: ...)', most frequent reason first."""
    counts, examples = stage1.get("skipped_input", {}), stage1.get("skipped_examples", {})
    return ", ".join(f"{reason} ×{n}" + (f" (first: {examples[reason][0]})" if examples.get(reason) else "")
                     for reason, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def nothing_staged_message(stage1: dict) -> str:
    """Why stage 1 kept no document: every skip and drop reason, with the first example of each skip."""
    total, skipped = _records(stage1)
    if not total:
        return "no documents to pack: the sources hold no records"
    parts = [f"skipped {skipped} as bad input: {_skips(stage1)}"] if skipped else []
    dropped = stage1.get("dropped", {})
    if dropped:
        parts.append("dropped " + ", ".join(f"{r} ×{n}" for r, n in sorted(dropped.items(), key=lambda kv: -kv[1])))
    return f"no documents to pack: none of {total} input record{'s' * (total != 1)} was kept; " + "; ".join(parts)


def nothing_staged_hint(stage1: dict) -> str:
    counts = stage1.get("skipped_input", {})
    top = max(counts, key=counts.get) if counts else None
    if top in _HINTS:
        return _HINTS[top]
    if stage1.get("dropped"):
        return "the cleaning filters (clean.*) or dedup dropped every document: loosen them"
    return "check the inputs named above; --strict stops at the first bad input, naming file:line"


def skipped_share_warnings(stage1: dict, limit: float) -> list[str]:
    """A warning when more than ``limit`` of the input records were skipped as bad input."""
    total, skipped = _records(stage1)
    if not total or skipped / total <= limit:
        return []
    return [f"{skipped} of {total} input records ({skipped / total:.0%}) were skipped as bad input, more than "
            f"max_skipped_fraction={limit}: {_skips(stage1)}"]


def summary_table(manifest: dict):
    """A rich Table summarising a prepare run."""
    from rich.table import Table

    p = manifest.get("prepare", {})
    c = manifest["counts"]
    table = Table(title="lmforge data prepare", show_header=True, header_style="bold")
    table.add_column("item")
    table.add_column("value", justify="right")
    for label, s in p.get("sources", {}).items():
        kept = s.get("out", 0)
        drops = ", ".join(f"{k} {v}" for k, v in sorted(s.items()) if k not in ("in", "out"))
        table.add_row(f"source {label}", f"{s.get('in', 0)} in → {kept} out" + (f" ({drops})" if drops else ""))
    for reason, n in sorted(p.get("skipped_input", {}).items()):
        table.add_row(f"skipped input: {reason}", str(n))
    for reason, n in sorted(p.get("dropped", {}).items()):
        table.add_row(f"dropped: {reason}", str(n))
    for kind, n in sorted(p.get("pii_masked", {}).items()):
        table.add_row(f"PII masked: {kind}", str(n))
    table.add_row("documents train / val", f"{c['documents']['train']} / {c['documents']['val']}")
    table.add_row("tokens train / val", f"{c['tokens']['train']:,} / {c['tokens']['val']:,}")
    table.add_row("shards train / val", f"{c['shards']['train']} / {c['shards']['val']}")
    table.add_row("vocab / dtype", f"{manifest['vocab_size']} / {manifest['dtype']}")
    if p:
        secs = max(p.get("total_seconds", 0.0), 1e-9)
        mb = p.get("bytes_in", 0) / 1e6
        table.add_row("time (stage1 / tokenizer / pack)",
                      f"{p.get('seconds', 0):.1f}s / {p.get('tokenizer_seconds', 0):.1f}s / {p.get('pack_seconds', 0):.1f}s")
        table.add_row("throughput", f"{mb:.1f} MB in {secs:.1f}s = {mb / secs:.2f} MB/s")
        if p.get("up_to_date"):
            table.add_row("status", "up to date: nothing redone (--force to redo)")
        elif p.get("resumed_stage1"):
            table.add_row("resumed", "stage 1 reused")
    resumed = c.get("resumed_documents", {})
    if any(resumed.values()):
        table.add_row("resumed shards (documents)", f"{resumed.get('train', 0)} / {resumed.get('val', 0)}")
    return table
