"""Tokenize + pack throughput: lmforge ``pack_documents`` vs HF ``datasets`` ``.map(batched, num_proc)``.

Same corpus (Chinese classics + tinyshakespeare paragraphs repeated to --mb MB, as JSONL in a temp dir),
same byte-level BPE tokenizer, same output (one flat uint16 token stream, EOS after each document).
Each side runs in its own subprocess; peak RSS is the process tree's summed RSS, polled with psutil.

    .venv/bin/python benchmarks/data_throughput.py --mb 100 --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("LMFORGE_DATA", REPO.parent / "shared" / "data"))


def build_corpus(tmp: Path, mb: int) -> Path:
    files = sorted((DATA / "zh" / "classics").glob("*.txt")) + [DATA / "tinyshakespeare" / "input.txt"]
    missing = [f for f in files if not f.is_file()]
    if missing:
        sys.exit(f"shared data not found: {missing[0]} (set LMFORGE_DATA)")
    paras = []
    for f in files:
        text = f.read_text(encoding="utf-8").replace("\r\n", "\n")
        paras += [p.strip() for p in text.split("\n\n") if p.strip()]
    out = tmp / "corpus.jsonl"
    size, rep = 0, 0
    with open(out, "w", encoding="utf-8") as fh:
        while size < mb * 1_000_000:
            for p in paras:
                line = json.dumps({"text": f"{p} [{rep}]"}, ensure_ascii=False) + "\n"
                fh.write(line)
                size += len(line.encode("utf-8"))
            rep += 1
    return out


LMFORGE = """
import json, sys, time
from lmforge.data.pack import pack_documents
from lmforge.data.tokenizer import load_tokenizer
corpus, tok_path, out, workers = sys.argv[1:5]
tok = load_tokenizer(tok_path)
def docs():
    with open(corpus, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)["text"]
t = time.time()
m = pack_documents(docs(), tok, out, val_fraction=0.0, num_workers=int(workers))
print(json.dumps({"tokens": m["counts"]["tokens"]["train"], "seconds": time.time() - t}))
"""

HF = """
import json, sys, time
import numpy as np
import datasets
from transformers import PreTrainedTokenizerFast
corpus, tok_path, out, workers = sys.argv[1:5]
datasets.disable_progress_bars()
tok = PreTrainedTokenizerFast(tokenizer_file=tok_path, eos_token="<|endoftext|>")
eos = tok.eos_token_id
t = time.time()
ds = datasets.load_dataset("json", data_files=corpus, split="train", cache_dir=out + "/cache")
def enc(batch):
    ids = tok(batch["text"], add_special_tokens=False)["input_ids"]
    return {"ids": [x + [eos] for x in ids]}
ds = ds.map(enc, batched=True, num_proc=int(workers), remove_columns=["text"])
n = 0
with open(out + "/train.bin", "wb") as f:
    for b in ds.iter(batch_size=10000):
        arr = np.fromiter((i for x in b["ids"] for i in x), dtype=np.uint16)
        f.write(arr.tobytes())
        n += len(arr)
print(json.dumps({"tokens": n, "seconds": time.time() - t}))
"""


def run_measured(code: str, args: list[str]) -> dict:
    """Run ``code`` in a subprocess; return its JSON result plus wall time and peak tree RSS."""
    t = time.time()
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            rss = ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(recursive=True))
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(0.05)
    out, err = proc.communicate()
    if proc.returncode:
        sys.exit(f"subprocess failed:\n{err.decode()[-3000:]}")
    res = json.loads(out.decode().strip().splitlines()[-1])
    res.update(wall=time.time() - t, peak_rss_mb=peak / 2**20)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=100, help="corpus size in MB")
    ap.add_argument("--workers", type=int, default=2, help="HF num_proc")
    ap.add_argument("--lm-workers", type=int, default=0,
                    help="lmforge tokenizer processes (0: in-process, Rust threads on all cores)")
    ap.add_argument("--vocab", type=int, default=8192)
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from lmforge.data.tokenizer import train_tokenizer

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        corpus = build_corpus(tmp, args.mb)
        mb = corpus.stat().st_size / 1e6

        def sample():
            with open(corpus, encoding="utf-8") as f:
                for i, line in enumerate(f):
                    if i >= 20000:
                        return
                    yield json.loads(line)["text"]

        tok_path = train_tokenizer(sample(), args.vocab).save(tmp / "tok")
        print(f"corpus {mb:.1f} MB JSONL, tokenizer vocab {args.vocab}, lmforge workers {args.lm_workers}, "
              f"HF num_proc {args.workers}, {os.cpu_count()} CPUs")
        results = {}
        for name, code in (("lmforge", LMFORGE), ("hf_datasets", HF)):
            out = tmp / name
            out.mkdir()
            workers = args.lm_workers if name == "lmforge" else args.workers
            results[name] = r = run_measured(code, [str(corpus), str(tok_path), str(out), str(workers)])
            print(f"{name:12s} tokens {r['tokens']:>12,}  time {r['seconds']:7.1f}s  {mb / r['seconds']:6.2f} MB/s  "
                  f"peak RSS {r['peak_rss_mb']:7.0f} MiB")
        a, b = results["lmforge"], results["hf_datasets"]
        if a["tokens"] != b["tokens"]:
            print(f"WARNING: token counts differ ({a['tokens']} vs {b['tokens']})")
        print(f"throughput ratio lmforge/hf: {b['seconds'] / a['seconds']:.2f}x; "
              f"peak RSS ratio hf/lmforge: {b['peak_rss_mb'] / a['peak_rss_mb']:.2f}x")


if __name__ == "__main__":
    main()
