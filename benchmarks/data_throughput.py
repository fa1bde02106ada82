"""Tokenize + pack throughput: lmforge ``pack_documents`` vs HF ``datasets`` ``.map(batched, num_proc)``.

Same corpus (Chinese classics + tinyshakespeare paragraphs repeated to --mb MB, as JSONL in a temp dir),
same byte-level BPE tokenizer, same output (one flat uint16 token stream, EOS after each document; the
token counts are compared). Each side runs in its own subprocess, interleaved (lm, hf, lm, hf, ...)
--repeats times so load from other processes hits both alike; best and median time are reported.
Peak RSS is the process tree's summed RSS (workers included), polled with psutil.

Caveat on repetition: the corpus repeats the same paragraphs (each copy tagged "[n]"), so a
document-level memo would be cheating; lmforge has none. Its fast encoder caches BPE results per
pre-token piece (words, CJK clauses), which also profits from the repetition, so the run ends with the
"unique" corpus (one copy of every paragraph, nothing repeated) to show the gain on unrepeated text.

    .venv/bin/python benchmarks/data_throughput.py --mb 100 25 --repeats 2
    LMFORGE_FAST_BPE=0 .venv/bin/python benchmarks/data_throughput.py   # lmforge without the fast encoder
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("LMFORGE_DATA", REPO.parent / "shared" / "data"))


def build_corpus(tmp: Path, mb: float, name: str) -> Path:
    """Paragraphs of all source files, repeated (tagged with the copy number) to ``mb`` MB; mb=0: one copy."""
    files = sorted((DATA / "zh" / "classics").glob("*.txt")) + [DATA / "tinyshakespeare" / "input.txt"]
    missing = [f for f in files if not f.is_file()]
    if missing:
        sys.exit(f"shared data not found: {missing[0]} (set LMFORGE_DATA)")
    paras = []
    for f in files:
        text = f.read_text(encoding="utf-8").replace("\r\n", "\n")
        paras += [p.strip() for p in text.split("\n\n") if p.strip()]
    out = tmp / f"{name}.jsonl"
    size, rep = 0, 0
    with open(out, "w", encoding="utf-8") as fh:
        while size < mb * 1_000_000 or rep == 0:
            for p in paras:
                line = json.dumps({"text": f"{p} [{rep}]" if mb else p}, ensure_ascii=False) + "\n"
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


def compare(corpus: Path, tok_path: Path, tmp: Path, args, label: str) -> None:
    mb = corpus.stat().st_size / 1e6
    runs: dict[str, list[dict]] = {"lmforge": [], "hf_datasets": []}
    for r in range(args.repeats):
        for name, code in (("lmforge", LMFORGE), ("hf_datasets", HF)):
            out = tmp / f"{name}_{label.split()[0]}_{r}"
            out.mkdir()
            workers = args.lm_workers if name == "lmforge" else args.workers
            runs[name].append(run_measured(code, [str(corpus), str(tok_path), str(out), str(workers)]))
            shutil.rmtree(out)
    print(f"-- {label}: {mb:.1f} MB JSONL, {args.repeats} interleaved runs per side")
    best, peak = {}, {}
    for name, rs in runs.items():
        secs = sorted(x["seconds"] for x in rs)
        best[name], peak[name] = secs[0], max(x["peak_rss_mb"] for x in rs)
        print(f"{name:12s} tokens {rs[0]['tokens']:>12,}  best {secs[0]:6.1f}s ({mb / secs[0]:5.2f} MB/s)  "
              f"median {statistics.median(secs):6.1f}s  peak RSS {peak[name]:6.0f} MiB")
    a, b = runs["lmforge"], runs["hf_datasets"]
    if a[0]["tokens"] != b[0]["tokens"]:
        print(f"WARNING: token counts differ ({a[0]['tokens']} vs {b[0]['tokens']})")
    med = statistics.median(x["seconds"] for x in b) / statistics.median(x["seconds"] for x in a)
    print(f"speed lmforge/hf: best {best['hf_datasets'] / best['lmforge']:.2f}x, median {med:.2f}x; "
          f"peak RSS hf/lmforge {peak['hf_datasets'] / peak['lmforge']:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, nargs="+", default=[100, 25], help="corpus sizes in MB (sweep)")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved runs per side and size")
    ap.add_argument("--no-unique", action="store_true", help="skip the unrepeated-corpus comparison")
    ap.add_argument("--workers", type=int, default=2, help="HF num_proc")
    ap.add_argument("--lm-workers", type=int, default=2, help="lmforge tokenizer processes (0: in-process)")
    ap.add_argument("--vocab", type=int, default=8192)
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from lmforge.data.tokenizer import train_tokenizer

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        unique = build_corpus(tmp, 0, "unique")

        def sample():
            with open(unique, encoding="utf-8") as f:
                for i, line in enumerate(f):
                    if i >= 20000:
                        return
                    yield json.loads(line)["text"]

        tok_path = train_tokenizer(sample(), args.vocab).save(tmp / "tok")
        print(f"tokenizer vocab {args.vocab}, lmforge workers {args.lm_workers}, HF num_proc {args.workers}, "
              f"{os.cpu_count()} CPUs")
        for mb in args.mb:
            corpus = build_corpus(tmp, mb, f"corpus_{mb:g}")
            compare(corpus, tok_path, tmp, args, f"{mb:g} MB repeated")
            corpus.unlink()
        if not args.no_unique:
            compare(unique, tok_path, tmp, args, "unique (no repetition)")


if __name__ == "__main__":
    main()
