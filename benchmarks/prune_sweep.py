"""Wanda against magnitude pruning over several sparsities on one decoder run, perplexity only (no timing).

Uses lmforge's own scores (``compress.prune.keep_mask``) and calibration (``compress.calib``): the same
validation windows the compress table scores (``--eval-batches`` × 8 × the run's context), calibrated on the
8 batches after them. ``--sequential`` adds the Wanda paper code's variant, which calibrates each block on the
outputs of the already-pruned blocks before it. lmforge calibrates every block on the dense model.

    .venv/bin/python benchmarks/prune_sweep.py runs/compress_table/lm_teacher --sequential
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def pruned(model, method: str, sparsity: float, calib: list[dict], sequential: bool):
    from lmforge.compress.calib import input_stats
    from lmforge.compress.prune import keep_mask, prunable

    layers = prunable(model)
    groups = [layers] if not sequential else [
        {n: m for n, m in layers.items() if f".layers.{i}." in f".{n}"} for i in range(len(model.layers))]
    with torch.no_grad():
        for group in groups:  # sequential: block i is calibrated after blocks < i were pruned
            norms = input_stats(model, group, calib, "lm") if method == "wanda" else {}
            for name, lin in group.items():
                lin.weight.mul_(keep_mask(lin.weight, method, sparsity, norms.get(name)))
    return model


def main() -> int:
    from lmforge.compress.calib import calibration_batches
    from lmforge.compress.source import lm_perplexity, load_source, val_batches

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--sparsities", default="0.5,0.6,0.7")
    ap.add_argument("--eval-batches", type=int, default=10)
    ap.add_argument("--calib-batches", type=int, default=8)
    ap.add_argument("--sequential", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="write the numbers to this JSON file")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    src = load_source(a.run)
    ec = SimpleNamespace(seq_len=None, batch_size=8, batches=a.eval_batches)
    batches = val_batches(src, ec)
    calib = calibration_batches(SimpleNamespace(src=src, batches=batches, cfg=SimpleNamespace(eval=ec)),
                                a.calib_batches)  # what `compress prune` calibrates on
    dense = lm_perplexity(src.model, batches)["val_ppl"]
    print(f"{a.run}: dense perplexity {dense:.3f} ({len(batches)} eval batches, {len(calib)} calibration)")
    variants = [("magnitude", False), ("wanda", False)] + ([("wanda", True)] if a.sequential else [])
    rows = []
    for s in (float(x) for x in a.sparsities.split(",")):
        got = {}
        for method, seq_cal in variants:
            ppl = lm_perplexity(pruned(copy.deepcopy(src.model), method, s, calib, seq_cal), batches)["val_ppl"]
            got[method + (" (sequential)" if seq_cal else "")] = ppl
        inc = {k: 100 * (v / dense - 1) for k, v in got.items()}
        print(f"sparsity {s:.0%}: " + ", ".join(f"{k} {v:+.2f}%" for k, v in inc.items())
              + f"; wanda / magnitude increase {inc['wanda'] / inc['magnitude']:.2f}")
        rows.append({"sparsity": s, "ppl": got, "increase_pct": inc})
    if a.out:
        Path(a.out).write_text(json.dumps({"run": a.run, "dense_ppl": dense, "rows": rows}, indent=2))
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
