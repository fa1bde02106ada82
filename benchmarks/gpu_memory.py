"""The memory estimator against ``torch.cuda.max_memory_allocated`` at the benchmark shape (llama-1b, vocab
32000, seq 2048, bf16 autocast, eager), for micro-batches and activation checkpointing off / full / selective.

    python benchmarks/gpu_memory.py [--budget-s 60] [--dry-run]

Each config: ``SyntheticRun`` (the one build path and TrainStep), one warm-up and two measured steps (the
optimizer state exists from the first step on), peak = max allocated above what was allocated before the
build; estimate = ``estimate(shape, "ddp", 1, ...)["total"]``. Target: within ±15%. Prints one table, writes
``gpu_memory.json`` to $OUT (or runs/gpu/); exit code 1 when a measured config is outside ±15%.
``--dry-run``: the tiny shape on the CPU; nothing is measured there (the estimate is printed alone).
"""

from __future__ import annotations

import argparse
import time

import gpu_common as gc_

CONFIGS = [(2, "none"), (8, "none"), (8, "full"), (8, "selective")]
COLS = [("micro", "micro", "d"), ("ac", "checkpointing", ""), ("measured_gib", "measured GiB", ".2f"),
        ("estimate_gib", "estimate GiB", ".2f"), ("ratio", "est/measured", ".3f"), ("phase", "peak at", ""),
        ("status", "status", "")]


def measure(spec: dict, micro: int, ac: str, device) -> dict:
    from lmforge.distributed.estimate import ModelShape, estimate
    from lmforge.training.synthetic import SyntheticRun, release, synthetic_config

    release(device)
    cfg = synthetic_config(spec["preset"], vocab=spec["vocab"], seq_len=spec["seq_len"], micro_batch=micro,
                           precision="bf16", ac=ac, **spec["model"])
    run = SyntheticRun(cfg, device)
    try:
        peak = run.measure(warmup=1, steps=2).peak_bytes
    finally:
        run.close()
    est = estimate(ModelShape.from_config(cfg.model), "ddp", 1, micro_batch=micro, seq_len=spec["seq_len"],
                   precision="bf16", activation_checkpointing=ac != "none", ac_selective=ac == "selective")
    phase = max(("peak_forward", "peak_backward_start", "peak_backward_end"), key=lambda k: est[k])
    row = {"micro": micro, "ac": ac, "estimate_gib": est["total"] / 2**30, "phase": phase[5:], "estimate": est}
    if peak is None:
        return {**row, "status": "n/a (no CUDA)"}
    ratio = est["total"] / peak
    return {**row, "measured_gib": peak / 2**30, "ratio": ratio, "status": "ok" if abs(ratio - 1) <= 0.15 else "OFF"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget-s", type=float, default=60.0)
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args(argv)
    budget, spec, device, _, info = gc_.start("gpu_memory", args.budget_s, args.dry_run)
    rows, skipped = [], []

    def save(rows: list, skipped: list, complete: bool = False):
        return gc_.write_json("gpu_memory.json", {"facts": info, "spec": spec, "dry_run": args.dry_run, "rows": rows,
                                                  "skipped": skipped, "elapsed_s": budget.elapsed(),
                                                  "complete": complete})

    for micro, ac in CONFIGS:
        if not budget.allows(5.0 if args.dry_run else 12.0):
            skipped.append(f"micro {micro} {ac}: {max(budget.left(), 0):.0f}s of the budget left")
            continue
        t0 = time.monotonic()
        try:
            rows.append({**measure(spec, micro, ac, device), "wall_s": time.monotonic() - t0})
        except Exception as e:  # noqa: BLE001 - one config failing must not hide the others
            rows.append({"micro": micro, "ac": ac, "status": f"FAILED {type(e).__name__}: {str(e)[:100]}"})
        save(rows, skipped)
    print(gc_.table(rows, COLS))
    for s in skipped:
        print(f"skipped {s}")
    path = save(rows, skipped, complete=True)
    print(f"wrote {path} ({budget.elapsed():.0f}s)")
    bad = [r for r in rows if r["status"] not in ("ok", "n/a (no CUDA)")]
    return 1 if bad or not rows else 0


if __name__ == "__main__":
    raise SystemExit(main())
