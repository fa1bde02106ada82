"""MFU of the llama-1b preset on one GPU: lmforge with compile off / on × activation checkpointing off /
selective, and HF transformers ``LlamaForCausalLM`` of the same shape (SDPA, bf16 autocast, same batch).

    python benchmarks/gpu_mfu.py [--budget-s 220] [--warmup 2] [--steps 4] [--dry-run]

Shape: d 2048, 16 layers, 32 heads / 8 kv heads, FFN 5632, tied embeddings, vocab 32000, seq 2048, bf16
autocast over fp32 weights, AdamW (fused), grad clip 1.0, random tokens (every position a target).
Micro-batch: the largest the memory estimator (``lmforge.distributed.estimate``) fits in 88% of the device's
memory, confirmed by the variant's own warm-up steps and backed off by 15% on an out-of-memory error.
HF runs the largest batch it fits at or below lmforge's, and lmforge is measured again at that batch, so the
ratio compares the same batch. MFU = tokens/s × FLOPs per token / the device's dense bf16 peak (named, with
its source), FLOPs per token = 6·(matmul weights, head included) + 12·layers·d·seq (no causal halving, as
torchtitan and PaLM count). Variants run in priority order; one that does not fit the time budget left is
skipped and listed as such. Prints one table; writes ``gpu_mfu.json`` to $OUT (or runs/gpu/).
``--dry-run``: the whole script on the CPU at the tiny preset, seq 64, with an eager compile backend.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import gpu_common as gc_

COLS = [("name", "variant", ""), ("micro", "micro", "d"), ("tokens_per_s", "tokens/s", ",.0f"),
        ("mfu_pct", "MFU %", ".1f"), ("peak_gib", "peak GiB", ".2f"), ("est_gib", "est. GiB", ".2f"),
        ("step_s", "step s", ".3f"), ("loss", "loss", ".3f"), ("note", "note", "")]


@dataclass
class Variant:
    name: str
    lib: str  # "lmforge" or "hf"
    compile: bool
    ac: str  # "none" or "selective" (lmforge); HF runs without checkpointing
    micro: int
    cost_s: float  # expected wall time, checked against the budget left before starting


def estimate_micro(cfg_for, memory: int, ac: str, cap: int) -> tuple[int, float]:
    """Largest micro-batch ≤ ``cap`` whose estimated peak fits 88% of ``memory`` (bytes), and that estimate."""
    from lmforge.distributed.estimate import ModelShape, estimate

    cfg = cfg_for(1, ac)
    shape = ModelShape.from_config(cfg.model)
    best, best_est = 1, 0.0
    for micro in range(1, cap + 1):
        est = estimate(shape, "ddp", 1, micro_batch=micro, seq_len=cfg.data.seq_len, precision="bf16",
                       activation_checkpointing=ac != "none", ac_selective=ac == "selective")["total"]
        if est > 0.88 * memory:
            break
        best, best_est = micro, est
    return best, best_est


def run_lmforge(v: Variant, cfg_for, device, warmup: int, steps: int, peak: float) -> dict:
    from lmforge.distributed.estimate import ModelShape, estimate
    from lmforge.training.synthetic import SyntheticRun

    cfg = cfg_for(v.micro, v.ac, v.compile)
    run = SyntheticRun(cfg, device)
    try:
        m = run.measure(warmup, steps)
        flops, n_params = run.flops_per_token(), run.base.num_params()
    finally:
        run.close()
    est = estimate(ModelShape.from_config(cfg.model), "ddp", 1, micro_batch=v.micro, seq_len=cfg.data.seq_len,
                   precision="bf16", activation_checkpointing=v.ac != "none", ac_selective=v.ac == "selective")
    return {**_row(v, m.tokens_per_s, m.step_s, m.peak_bytes, m.losses, flops, peak,
                   est_bytes=None if v.compile else est["total"]), "params": n_params}


def _row(v: Variant, tps, step_s, peak_bytes, losses, flops, peak, est_bytes=None) -> dict:
    return {"name": v.name, "lib": v.lib, "compile": v.compile, "ac": v.ac, "micro": v.micro,
            "tokens_per_s": tps, "step_s": step_s, "mfu_pct": 100 * tps * flops / peak,
            "peak_gib": peak_bytes / 2**30 if peak_bytes is not None else None,
            "est_gib": est_bytes / 2**30 if est_bytes is not None else None,
            "loss": losses[-1] if losses else None, "flops_per_token": flops}


def build_hf(mcfg, device, compile: bool):
    """``LlamaForCausalLM`` of the lmforge shape ``mcfg``, SDPA attention, fp32 weights built on ``device``,
    per-layer ``.compile()`` (as lmforge compiles per block), fused AdamW."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmforge.models.hf.llama import config_to_hf  # the one lmforge → HF Llama mapping (hf export uses it)

    cfg = LlamaConfig(**{k: v for k, v in config_to_hf(mcfg, "float32").items() if k != "model_type"})
    cfg._attn_implementation = "sdpa"
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    model.config.use_cache = False
    model.train()
    if compile:
        for layer in model.model.layers:
            layer.compile(dynamic=False)
    return model, torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, fused=True)


def hf_steps(model, opt, v: Variant, mcfg, seq_len: int, device, n: int, gen) -> tuple[list, list]:
    """``n`` HF training steps (autocast bf16, clip 1.0, fused AdamW) at ``v.micro``: (times, losses)."""
    from lmforge.training.step import to_device
    from lmforge.training.synthetic import random_micro

    times, losses = [], []
    for _ in range(n):
        mb = random_micro(mcfg.vocab_size, v.micro, seq_len, 1, gen)[0]
        x, y = to_device(mb["input_ids"], device), to_device(mb["labels"], device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=y, shift_labels=y).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        losses.append(loss.detach())
    return times, losses


def run_hf(v: Variant, mcfg, seq_len: int, device, warmup: int, steps: int, flops: float, peak: float) -> dict:
    """Build once; on out-of-memory in the warm-up shrink the batch by 20% and go on with the same model."""
    from lmforge.training.synthetic import is_oom, release

    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    model, opt = build_hf(mcfg, device, v.compile)
    n_params, start, note = sum(p.numel() for p in model.parameters()), v.micro, None
    try:
        while True:
            try:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                hf_steps(model, opt, v, mcfg, seq_len, device, warmup, torch.Generator().manual_seed(1))
                times, losses = hf_steps(model, opt, v, mcfg, seq_len, device, steps, torch.Generator().manual_seed(0))
                break
            except Exception as e:  # noqa: BLE001 - only out-of-memory is retried
                if not is_oom(e) or v.micro == 1:
                    raise
            opt.zero_grad(set_to_none=True)
            release(device)
            v.micro, note = max(1, int(v.micro * 0.8)), f"OOM at micro {start}: backed off"
        peak_bytes = torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else None
    finally:
        del model, opt
        release(device)
    step_s = statistics.median(times)
    row = {**_row(v, v.micro * seq_len / step_s, step_s, peak_bytes, [float(x) for x in losses], flops, peak),
           "params": n_params}
    return {**row, "note": note} if note else row


def plan(micro_none: int, micro_sel: int, dry: bool) -> list[Variant]:
    """Priority order: the eager baseline, its HF counterpart, compile, selective checkpointing, then HF
    compiled. Costs are what a variant is expected to take on an H100/H200 (compiles dominate)."""
    eager, comp = (5.0, 10.0) if dry else (30.0, 100.0)
    return [Variant("lmforge eager", "lmforge", False, "none", micro_none, eager),
            Variant("hf eager", "hf", False, "none", micro_none, eager),
            Variant("lmforge compiled", "lmforge", True, "none", micro_none, comp),
            Variant("lmforge eager +sel-AC", "lmforge", False, "selective", micro_sel, eager),
            Variant("lmforge compiled +sel-AC", "lmforge", True, "selective", micro_sel, comp),
            Variant("hf compiled", "hf", True, "none", micro_none, comp)]


def attempt(v: Variant, runner, device, tries: int = 4) -> dict:
    """``runner(v)``; on out-of-memory shrink ``v.micro`` by 15% and retry (the row's note says so). Any
    other failure becomes the row's note, so one broken variant does not lose the others' numbers."""
    from lmforge.training.synthetic import is_oom, release

    start = v.micro
    for _ in range(tries):
        try:
            row = runner(v)
            if v.micro != start:
                row["note"] = f"OOM at micro {start}: backed off"
            return row
        except Exception as e:  # noqa: BLE001 - reported in the table and the JSON
            oom, msg = is_oom(e), f"FAILED {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        release(device)  # after the except block: the traceback's frames, and the tensors they hold, are gone
        if not oom or v.micro == 1:
            return {"name": v.name, "lib": v.lib, "micro": v.micro, "note": msg}
        v.micro = max(1, int(v.micro * 0.85))
    return {"name": v.name, "lib": v.lib, "micro": v.micro, "note": f"out of memory down to micro {v.micro}"}


def ratios(rows: list[dict]) -> list[str]:
    """lmforge / HF tokens/s at the same batch and compile setting."""
    out = []
    for hf in (r for r in rows if r.get("lib") == "hf" and r.get("tokens_per_s")):
        lm = [r for r in rows if r.get("lib") == "lmforge" and r.get("ac") == "none" and r.get("tokens_per_s")
              and r.get("compile") == hf["compile"] and r.get("micro") == hf["micro"]]
        if lm:
            out.append(f"{lm[0]['name']} / {hf['name']} at micro-batch {hf['micro']}: "
                       f"{lm[0]['tokens_per_s'] / hf['tokens_per_s']:.2f}x tokens/s (target >= 1.2x)")
    return out


def shape_check(rows: list[dict]) -> list[str]:
    """lmforge and HF must be the same model: the same parameter count (tied weights once)."""
    counts = {r["lib"]: r["params"] for r in rows if r.get("params")}
    if len(counts) < 2:
        return []
    same = counts["lmforge"] == counts["hf"]
    return [f"shape check: lmforge {counts['lmforge']:,} parameters, HF {counts['hf']:,}"
            f" ({'same' if same else 'DIFFERENT: the comparison is not like for like'})"]


def loss_check(rows: list[dict]) -> list[str]:
    """lmforge variants at the same micro-batch see the same tokens: their last losses must agree (compile and
    checkpointing change no maths); a disagreement beyond 2% is reported."""
    out = []
    for micro in sorted({r["micro"] for r in rows if r.get("lib") == "lmforge" and r.get("loss")}):
        same = [r for r in rows if r.get("lib") == "lmforge" and r.get("micro") == micro and r.get("loss")]
        lo, hi = min(r["loss"] for r in same), max(r["loss"] for r in same)
        if len(same) > 1:
            ok = hi - lo <= 0.02 * abs(lo)
            out.append(f"loss check at micro {micro}: {len(same)} lmforge variants within {hi - lo:.2g} "
                       f"({'ok' if ok else 'MISMATCH: compile or checkpointing changed the numbers'})")
    return out


def run_all(args, spec: dict, device, memory: int, budget, save) -> dict:
    """Every variant in priority order within ``budget``; ``save(partial)`` after each (a kill keeps them)."""
    from lmforge.models import build_model
    from lmforge.training.synthetic import synthetic_config

    def cfg_for(micro: int, ac: str, compile: bool = False):
        return synthetic_config(spec["preset"], vocab=spec["vocab"], seq_len=spec["seq_len"], micro_batch=micro,
                                precision="bf16", compile=compile, ac=ac, **spec["model"])

    cap = 4 if args.dry_run else 256
    micro_none, est_none = estimate_micro(cfg_for, memory, "none", cap)
    micro_sel, est_sel = estimate_micro(cfg_for, memory, "selective", cap)
    mcfg, seq = cfg_for(1, "none").model, spec["seq_len"]
    flops = build_model(mcfg, device="meta").flops_per_token(seq)
    pk = gc_.peaks(device)
    rows, skipped, queue = [], [], plan(micro_none, micro_sel, args.dry_run)
    res = {"estimator_micro": {"none": [micro_none, est_none], "selective": [micro_sel, est_sel]},
           "peaks": pk, "results": rows, "skipped": skipped}
    seen: dict[tuple, float] = {}  # (lib, compile) → wall time of the last such variant: a better cost guess
    while queue:
        v = queue.pop(0)
        cost = seen.get((v.lib, v.compile), v.cost_s)
        if not budget.allows(cost):
            skipped.append(f"{v.name}: ~{cost:.0f}s expected, {max(budget.left(), 0):.0f}s of the budget left")
            continue
        lm_same = [r for r in rows if r.get("lib") == "lmforge" and r.get("compile") == v.compile
                   and r.get("ac") == "none" and r.get("tokens_per_s")]
        hf_done = [r["micro"] for r in rows if r.get("lib") == "hf" and r.get("tokens_per_s")]
        if v.lib == "hf":  # start at what fitted before: an HF OOM retry under compile recompiles
            v.micro = min([v.micro] + [r["micro"] for r in lm_same[:1]] + hf_done[-1:])

        def runner(v):
            if v.lib == "hf":
                return run_hf(v, mcfg, seq, device, args.warmup, args.steps, flops, pk["mfu_peak"])
            return run_lmforge(v, cfg_for, device, args.warmup, args.steps, pk["mfu_peak"])

        t0 = time.monotonic()
        row = attempt(v, runner, device)
        row["wall_s"] = seen[(v.lib, v.compile)] = time.monotonic() - t0
        rows.append(row)
        save(res)
        print(f"  {row['name']}: micro {row.get('micro')}, "
              + (f"{row['tokens_per_s']:,.0f} tokens/s, MFU {row['mfu_pct']:.1f}%" if row.get("tokens_per_s")
                 else row.get("note", "")) + f" ({row['wall_s']:.0f}s)", flush=True)
        if v.lib == "hf" and row.get("tokens_per_s") and lm_same and lm_same[0]["micro"] != v.micro:
            queue.insert(0, Variant(f"{lm_same[0]['name']} @hf batch", "lmforge", v.compile, "none", v.micro,
                                    v.cost_s))
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget-s", type=float, default=220.0, help="wall-clock budget of the whole script")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per variant (median reported)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shape, eager compile backend")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.warmup, args.steps = 1, 2
    budget, spec, device, memory, info = gc_.start("gpu_mfu", args.budget_s, args.dry_run)
    record = {"facts": info, "spec": spec, "dry_run": args.dry_run, "budget_s": args.budget_s}

    def save(res: dict, complete: bool = False) -> Path:
        return gc_.write_json("gpu_mfu.json", {**record, **res, "elapsed_s": budget.elapsed(), "complete": complete})

    with gc_.eager_compile_backend(args.dry_run):
        res = run_all(args, spec, device, memory, budget, save)
    pk = res["peaks"]
    measured = f"{pk['measured_bf16_matmul'] / 1e12:.0f}" if pk["measured_bf16_matmul"] else "n/a"
    if args.dry_run:
        print("\nDRY RUN on the CPU at a tiny shape: the numbers below test the script, they measure nothing")
    print(f"\nMFU against {pk['mfu_peak'] / 1e12:.1f} TFLOP/s, bf16 peak of {info['name']} "
          f"(source: {pk['mfu_peak_source']}); measured bf16 matmul peak here: {measured} TFLOP/s")
    print(f"estimator's largest micro-batch: {res['estimator_micro']['none'][0]} (no checkpointing), "
          f"{res['estimator_micro']['selective'][0]} (selective)")
    print(gc_.table(res["results"], COLS))
    checks = shape_check(res["results"]) + loss_check(res["results"])
    for line in ratios(res["results"]) + checks + [f"skipped {s}" for s in res["skipped"]]:
        print(line)
    path = save(res, complete=True)
    print(f"wrote {path} ({budget.elapsed():.0f}s)")
    failed = [r for r in res["results"] if str(r.get("note", "")).startswith(("FAILED", "out of memory"))]
    return 1 if failed or not res["results"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
