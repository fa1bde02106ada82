"""Load benchmark for ``lmforge serve``, in the manner of vLLM's ``bench serve``.

Builds (or takes) a model, starts ``lmforge serve`` on 127.0.0.1 and drives it with streaming
``/v1/completions`` requests: one at a time (lmforge serving sequentially), at a fixed maximum concurrency,
and with Poisson arrivals at set rates. Every request is greedy with fixed token-id prompts of
``--input-len`` tokens and ``max_tokens = --output-len``. Reports TTFT, TPOT (per request, after the first
token), ITL, end-to-end latency (mean / p50 / p99), output tokens/s, requests/s and errors. The baseline is
HF ``transformers`` ``generate`` at batch 1, sequential, on the same weights (exported with
``lmforge.models.hf.save_hf``) and the same prompts. ``--kv-compare`` reruns the concurrency mode with a
fixed KV budget as a contiguous slot pool (one block = the context) and as a paged pool. ``--dtype`` is the
server's (float32 by default, so both sides do the same arithmetic; ``auto`` is what lmforge picks here) and
``--hf-dtype`` the baseline's (default: the same; float32 under ``auto``). ``--drain-check``
sends SIGTERM under load and counts failed / lost requests; unauthenticated requests are fired throughout.
Loops are bounded in count and time; the server is only ever on 127.0.0.1.

    .venv/bin/python benchmarks/serve_load.py [--preset bench-6l] [--model DIR] [--num-prompts 32]
        [--rates 2,4,8] [--concurrency 16] [--threads 1] [--kv-compare] [--invariance-compare] [--drain-check]
        [--ab-repeats 5] [--dtype float32|auto|bfloat16] [--hf-dtype float32|bfloat16] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

KEY = "bench-key-0123456789abcdef"


def build_model(preset: str, out: Path) -> Path:
    """A random-weight run folder of ``preset`` with a tokenizer trained on the Python stdlib."""
    import sysconfig

    import torch

    from lmforge.config import build_config, save_config
    from lmforge.data.tokenizer import train_tokenizer
    from lmforge.models import build_model as build

    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:120]
    tok = train_tokenizer((f.read_text(errors="ignore") for f in files), vocab_size=4096)
    cfg = build_config({"run_dir": str(out), "model": {"preset": preset, "vocab_size": tok.vocab_size}})
    model = build(cfg.model, seed=0)
    with torch.no_grad():  # larger weights than the init: peaky logits, like a trained model's
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    tok.save(out / "tokenizer.json")
    from lmforge.checkpoint import CheckpointManager

    CheckpointManager(out, model=model).save(1)
    return out


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def summarize(name: str, results: list[dict], wall: float) -> dict:
    ok = [r for r in results if r.get("error") is None]
    out_tok = sum(r["tokens"] for r in ok)
    row = {"mode": name, "requests": len(results), "errors": len(results) - len(ok), "wall_s": round(wall, 2),
           "req_per_s": round(len(ok) / wall, 3), "out_tok_per_s": round(out_tok / wall, 1)}
    series = {"ttft": [r["ttft"] for r in ok], "e2e": [r["e2e"] for r in ok],
              "tpot": [(r["e2e"] - r["ttft"]) / (r["tokens"] - 1) for r in ok if r["tokens"] > 1],
              "itl": [x for r in ok for x in r["itl"]]}
    for k, xs in series.items():
        row[f"{k}_mean_ms"] = round(1000 * sum(xs) / len(xs), 2) if xs else None
        row[f"{k}_p50_ms"] = round(1000 * pct(xs, 50), 2)
        row[f"{k}_p99_ms"] = round(1000 * pct(xs, 99), 2)
    return row


# ---------------------------------------------------------------------------------------------- server side
def server_flags(args, *more: str) -> list[str]:
    return ["--dtype", args.dtype, "--max-batch", str(args.concurrency), *more]


class Server:
    def __init__(self, model: Path, port: int, threads: int, extra: list[str], log: Path):
        keys = log.with_suffix(".keys")
        keys.write_text(KEY + "\n")
        self.url = f"http://127.0.0.1:{port}"
        self._log = open(log, "w")
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        self.proc = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", str(model), "--port", str(port),
                                      "--api-keys", str(keys), "--threads", str(threads), "--no-access-log",
                                      "--max-queue", "512", *extra], stdout=self._log, stderr=subprocess.STDOUT, env=env)
        end = time.monotonic() + 180
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
            try:
                if urllib.request.urlopen(self.url + "/ready", timeout=2).status == 200:
                    return
            except OSError:
                time.sleep(0.2)
        raise TimeoutError("server not ready")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(120)
        self._log.close()
        return code


async def one_request(client, url: str, model: str, prompt: list[int], max_tokens: int, key=KEY) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    times, tokens, err = [], 0, None
    try:
        async with client.stream("POST", url + "/v1/completions", json=body,
                                 headers={"Authorization": f"Bearer {key}"}) as r:
            if r.status_code != 200:
                return {"error": r.status_code, "e2e": time.perf_counter() - t0}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    err = chunk["error"].get("code") or "stream_error"
                elif chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                elif chunk["choices"] and chunk["choices"][0]["text"]:
                    times.append(time.perf_counter())
    except Exception as e:  # connection refused / reset: counted as an error
        err = type(e).__name__
    end = time.perf_counter()
    if err is not None or not times:
        return {"error": err or "no_tokens", "e2e": end - t0}
    return {"error": None, "ttft": times[0] - t0, "e2e": end - t0, "tokens": tokens,
            "itl": [b - a for a, b in zip(times, times[1:])]}


async def run_load(url, model, prompts, max_tokens, concurrency=None, rate=None, deadline_s=120.0,
                   on_start=None) -> tuple[list[dict], float]:
    """Concurrency-capped or Poisson(rate) arrivals; bounded by len(prompts) and ``deadline_s``."""
    import httpx

    sem = asyncio.Semaphore(concurrency or len(prompts))
    rng = random.Random(0)
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0), limits=httpx.Limits(max_connections=1024)) as client:
        async def task(p):
            async with sem:
                return await one_request(client, url, model, p, max_tokens)

        t0 = time.perf_counter()
        tasks = []
        for i, p in enumerate(prompts):
            if time.perf_counter() - t0 > deadline_s:
                break
            tasks.append(asyncio.create_task(task(p)))
            if on_start is not None:
                on_start(i, client)
            if rate is not None:
                await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=deadline_s + 300)
        return list(results), time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------- HF baseline
def hf_generator(run: Path, threads: int, dtype: str = "float32"):
    """transformers generate on the run's weights (exported with save_hf): ``f(prompts, max_tokens) -> row``."""
    import torch
    from transformers import AutoModelForCausalLM, StoppingCriteria, StoppingCriteriaList

    from lmforge.inference import load_run
    from lmforge.models.hf import save_hf

    torch.set_num_threads(threads)
    folder = Path(tempfile.mkdtemp()) / "hf"
    save_hf(load_run(run)[0], folder)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()

    class Clock(StoppingCriteria):
        def __call__(self, input_ids, scores, **kw):
            self.times.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    def generate(prompts: list[list[int]], max_tokens: int) -> dict:
        results = []
        t_all = time.perf_counter()
        for p in prompts:
            clock = Clock()
            clock.times = []
            t0 = time.perf_counter()
            with torch.no_grad():
                out = hf.generate(torch.tensor([p]), max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                                  do_sample=False, stopping_criteria=StoppingCriteriaList([clock]), pad_token_id=0)
            end = time.perf_counter()
            results.append({"error": None, "ttft": clock.times[0] - t0, "e2e": end - t0,
                            "tokens": out.shape[1] - len(p), "itl": [b - a for a, b in zip(clock.times, clock.times[1:])]})
        return summarize("hf generate, batch 1, sequential", results, time.perf_counter() - t_all)

    return generate


def batching_ratio(args, run: Path, prompts, tmp: Path, hf) -> dict:
    """HF sequential and lmforge at --concurrency, alternated --ab-repeats times (background load on a shared
    machine then hits both alike); the median of the per-round throughput ratios."""
    srv = Server(run, args.port + 4, args.threads, server_flags(args), tmp / "ab.log")
    ratios, rounds = [], []
    try:
        asyncio.run(run_load(srv.url, run.name, prompts[:2], 4, concurrency=1))
        for _ in range(args.ab_repeats):
            base = hf(prompts[:args.hf_prompts], args.output_len)["out_tok_per_s"]
            res, wall = asyncio.run(run_load(srv.url, run.name, prompts, args.output_len, concurrency=args.concurrency))
            ours = summarize("", res, wall)["out_tok_per_s"]
            rounds.append({"hf_tok_s": base, "lmforge_tok_s": ours})
            ratios.append(ours / base)
    finally:
        srv.stop()
    return {"mode": f"interleaved: lmforge at concurrency {args.concurrency} / HF sequential", "rounds": rounds,
            "median_ratio": round(sorted(ratios)[len(ratios) // 2], 2), "min_ratio": round(min(ratios), 2),
            "max_ratio": round(max(ratios), 2)}


# ---------------------------------------------------------------------------------------------- modes
def serve_modes(args, run: Path, prompts: list[list[int]], tmp: Path) -> list[dict]:
    rows = []
    srv = Server(run, args.port, args.threads, server_flags(args), tmp / "server.log")
    try:
        url, name = srv.url, run.name
        warm, _ = asyncio.run(run_load(url, name, prompts[:2], 4, concurrency=1))
        res, wall = asyncio.run(run_load(url, name, prompts[:args.sequential_prompts], args.output_len, concurrency=1))
        rows.append(summarize("lmforge serve, 1 request at a time", res, wall))
        res, wall = asyncio.run(run_load(url, name, prompts, args.output_len, concurrency=args.concurrency))
        rows.append(summarize(f"lmforge serve, max concurrency {args.concurrency}", res, wall))
        for rate in args.rates:
            res, wall = asyncio.run(run_load(url, name, prompts, args.output_len, rate=rate))
            rows.append(summarize(f"lmforge serve, Poisson {rate} req/s", res, wall))
    finally:
        rows.append({"mode": "server exit code", "code": srv.stop()})
    return rows


def kv_compare(args, run: Path, prompts, tmp: Path, context: int) -> list[dict]:
    rows = []
    budget = args.kv_budget_seqs * context
    for label, block in (("contiguous slots (block = context)", context), ("paged, 16-token blocks", 16)):
        flags = server_flags(args, "--block-size", str(block), "--kv-cache-tokens", str(budget))
        srv = Server(run, args.port + 1, args.threads, flags, tmp / f"kv{block}.log")
        try:
            res, wall = asyncio.run(run_load(srv.url, run.name, prompts, args.output_len, concurrency=args.concurrency))
            rows.append(summarize(f"KV budget {budget} tokens, {label}", res, wall))
        finally:
            srv.stop()
    return rows


def invariance_off(args, run: Path, prompts, tmp: Path) -> list[dict]:
    """The cost of batch invariance: the same modes with unpadded decode steps (--batch-invariant off)."""
    rows = []
    srv = Server(run, args.port + 3, args.threads, server_flags(args, "--batch-invariant", "off"),
                 tmp / "inv_off.log")
    try:
        res, wall = asyncio.run(run_load(srv.url, run.name, prompts[:args.sequential_prompts], args.output_len,
                                         concurrency=1))
        rows.append(summarize("lmforge serve --batch-invariant off, 1 request at a time", res, wall))
        res, wall = asyncio.run(run_load(srv.url, run.name, prompts, args.output_len, concurrency=args.concurrency))
        rows.append(summarize(f"lmforge serve --batch-invariant off, max concurrency {args.concurrency}", res, wall))
    finally:
        srv.stop()
    return rows


def drain_check(args, run: Path, prompts, tmp: Path) -> dict:
    """SIGTERM in the middle of a concurrency run; plus unauthenticated requests throughout."""
    import httpx

    srv = Server(run, args.port + 2, args.threads, server_flags(args), tmp / "drain.log")
    unauth = {"sent": 0, "rejected": 0}

    async def probe_unauth(client):
        for key in (None, "wrong-key-000000000000"):
            h = {"Authorization": f"Bearer {key}"} if key else {}
            unauth["sent"] += 1
            try:
                r = await client.post(srv.url + "/v1/completions", json={"model": run.name, "prompt": [1], "max_tokens": 1},
                                      headers=h)
                unauth["rejected"] += r.status_code in (401, 403)
            except httpx.HTTPError:
                unauth["rejected"] += 1

    async def sigterm_when_batch_full(client):
        for _ in range(600):  # bounded: 60 s
            text = (await client.get(srv.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"})).text
            running = [float(x.rsplit(" ", 1)[1]) for x in text.splitlines()
                       if x.startswith("vllm:num_requests_running{")]
            if running and running[0] >= args.concurrency:
                break
            await asyncio.sleep(0.1)
        srv.proc.send_signal(signal.SIGTERM)  # a full batch is in flight: stop the server now

    async def main():
        pending = []

        def on_start(i, client):
            pending.append(asyncio.create_task(probe_unauth(client)))
            if i == 0:
                pending.append(asyncio.create_task(sigterm_when_batch_full(client)))
        res, wall = await run_load(srv.url, run.name, prompts[:args.concurrency * 2], args.output_len,
                                   concurrency=args.concurrency, on_start=on_start)
        await asyncio.gather(*pending)
        return res
    res = asyncio.run(main())
    code = srv.stop()
    completed = sum(r.get("error") is None for r in res)
    refused = sum(r.get("error") in (503, "ConnectError") for r in res)
    other = collections.Counter(str(r["error"]) for r in res if r.get("error") not in (None, 503, "ConnectError"))
    return {"mode": "SIGTERM drain under load", "exit_code": code, "completed": completed,
            "refused_after_sigterm": refused, "failed_or_lost": len(res) - completed - refused,
            "failures": dict(other), "unauth_sent": unauth["sent"], "unauth_rejected": unauth["rejected"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="run or HF folder to serve (default: build a random-weight --preset run)")
    ap.add_argument("--preset", default="bench-6l")
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--sequential-prompts", type=int, default=8)
    ap.add_argument("--hf-prompts", type=int, default=8)
    ap.add_argument("--input-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--rates", default="2,4,8", help="Poisson arrival rates, req/s")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the server and the HF baseline")
    ap.add_argument("--port", type=int, default=18600)
    ap.add_argument("--kv-compare", action="store_true")
    ap.add_argument("--kv-budget-seqs", type=int, default=4, help="KV budget for --kv-compare, in full contexts")
    ap.add_argument("--drain-check", action="store_true")
    ap.add_argument("--invariance-compare", action="store_true", help="also run with --batch-invariant off")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--ab-repeats", type=int, default=0, help="alternate HF and lmforge-at-concurrency N times")
    ap.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16"],
                    help="the server's --dtype (auto: what lmforge picks on this machine)")
    ap.add_argument("--hf-dtype", default=None, choices=["float32", "bfloat16"],
                    help="the HF baseline's dtype (default: --dtype; float32 when --dtype is auto)")
    ap.add_argument("--json", help="write all rows here")
    args = ap.parse_args()
    args.rates = [float(r) for r in args.rates.split(",") if r]
    tmp = Path(tempfile.mkdtemp(prefix="serve_load_"))
    run = Path(args.model) if args.model else build_model(args.preset, tmp / f"{args.preset}")
    from benchmarks.train_throughput import cpu_name
    from lmforge.config import load_config

    context = load_config(run / "config.yaml").model.max_seq_len
    rng = random.Random(1)
    prompts = [[rng.randrange(5, 4000) for _ in range(args.input_len)] for _ in range(args.num_prompts)]
    rows = serve_modes(args, run, prompts, tmp)
    args.hf_dtype = args.hf_dtype or ("float32" if args.dtype == "auto" else args.dtype)
    hf = None if args.no_hf else hf_generator(run, args.threads, args.hf_dtype)
    if hf is not None:
        rows.insert(0, hf(prompts[:args.hf_prompts], args.output_len))
    if hf is not None and args.ab_repeats:
        rows.append(batching_ratio(args, run, prompts, tmp, hf))
    if args.kv_compare:
        rows += kv_compare(args, run, prompts, tmp, context)
    if args.invariance_compare:
        rows += invariance_off(args, run, prompts, tmp)
    if args.drain_check:
        rows.append(drain_check(args, run, prompts, tmp))
    meta = {"cpu": cpu_name(), "dtype": args.dtype, "hf_dtype": args.hf_dtype,
            "threads": args.threads, "preset": args.preset, "input_len": args.input_len,
            "output_len": args.output_len, "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(meta))
    for r in rows:
        print(json.dumps(r))
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
