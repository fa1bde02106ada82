"""What verifying packed data costs when ``TokenShards`` opens a split (``lmforge/data/integrity.py``).

Builds a packed folder of --mb MB of random uint16 ids in --shards shards (a valid manifest.json and
tokenizer.json), then times, --repeats times each, in this process:
  first open   no hash cache (as for a copied or downloaded folder): every shard is read once, sha256 and
               the id range in one pass, in up to min(shards, CPUs, 8) threads;
  later open   warm cache: one stat per shard;
  sha256 only  hashlib over the same bytes in one thread, the floor for one core.
The shards are in the page cache after the first read, so "first open" is the hash+scan speed; from a
cold disk it is min(that, disk read speed). ``--drop-caches`` (root, Linux) drops the page cache before
each first open to include the disk.

    .venv/bin/python benchmarks/data_open_cost.py --mb 100 --shards 6 --repeats 3
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np


def build(folder: Path, mb: float, shards: int, vocab: int = 8192) -> int:
    from lmforge.data.integrity import CACHE_NAME
    from lmforge.data.tokenizer import train_tokenizer

    tok = train_tokenizer(["a small tokenizer for the benchmark manifest"] * 20, vocab_size=300)
    tok.save(folder / "tokenizer.json")
    per = int(mb * 1e6 / 2 / shards)
    rng = np.random.default_rng(0)
    entries = []
    for i in range(shards):
        ids = rng.integers(0, vocab, per, dtype=np.uint16)
        name = f"train_{i:05d}.bin"
        ids.astype("<u2").tofile(folder / name)
        entries.append({"file": name, "tokens": per, "documents": 1,
                        "sha256": hashlib.sha256(ids.tobytes()).hexdigest()})
    manifest = {"format_version": 1, "dtype": "uint16", "vocab_size": vocab, "eos_id": 0, "pad_id": None,
                "tokenizer_sha256": tok.sha256(), "splits": {"train": entries, "val": []}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (folder / CACHE_NAME).unlink(missing_ok=True)
    return per * 2 * shards


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    from lmforge.data.integrity import CACHE_NAME
    from lmforge.data.loader import TokenShards

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=100)
    ap.add_argument("--shards", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--drop-caches", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        nbytes = build(folder, args.mb, args.shards)
        first, later, sha = [], [], []
        for _ in range(args.repeats):
            (folder / CACHE_NAME).unlink(missing_ok=True)
            if args.drop_caches:
                subprocess.run(["sync"], check=True)
                Path("/proc/sys/vm/drop_caches").write_text("3\n")
            first.append(timed(lambda: TokenShards(folder, "train")))
            later.append(timed(lambda: TokenShards(folder, "train")))
            sha.append(timed(lambda: [hashlib.sha256((folder / f"train_{i:05d}.bin").read_bytes()).hexdigest()
                                      for i in range(args.shards)]))
    mb = nbytes / 1e6
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; {mb:.0f} MB in {args.shards} "
          f"shards; median of {args.repeats}{' (page cache dropped)' if args.drop_caches else ''}")
    for label, xs in (("first open (hash + id range)", first), ("later open (stat only)", later),
                      ("sha256 alone, 1 thread", sha)):
        m = statistics.median(xs)
        print(f"  {label:30s} {m * 1e3:9.1f} ms  {mb / m:9.0f} MB/s")


if __name__ == "__main__":
    main()
