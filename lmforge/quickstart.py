"""``lmforge quickstart``: the whole pipeline on text every machine has.

Python's own standard library sources → byte-level BPE tokenizer → packed token shards (train/val split
by document) → a small Llama-style model trained for a few minutes → validation loss and perplexity →
a generated code sample. Everything lands in one run folder.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from rich.console import Console

from lmforge.config import build_config

QUICKSTART_VOCAB = 8192


def _prepare_data(data_dir: Path, console: Console, corpus_mb: float | None = None) -> Path:
    from lmforge.data.corpus import python_stdlib_documents
    from lmforge.data.pack import pack_documents
    from lmforge.data.tokenizer import load_tokenizer, train_tokenizer

    if (data_dir / "manifest.json").exists():
        console.print(f"[dim]data: reusing {data_dir}[/dim]")
        return data_dir
    t0 = time.time()
    docs = list(python_stdlib_documents(int(corpus_mb * 1e6) if corpus_mb else None))
    mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6
    console.print(f"corpus: {len(docs)} Python files from the standard library, {mb:.1f} MB")
    tok_path = data_dir.parent / "tokenizer.json"
    if tok_path.exists():
        tok = load_tokenizer(tok_path)
    else:
        tok = train_tokenizer(docs, vocab_size=QUICKSTART_VOCAB)
        data_dir.parent.mkdir(parents=True, exist_ok=True)
        tok.save(tok_path)
    console.print(f"tokenizer: byte-level BPE, {tok.vocab_size} tokens ({time.time() - t0:.0f}s)")
    manifest = pack_documents(docs, tok, data_dir, val_fraction=0.02, seed=0)
    n_train = sum(s["tokens"] for s in manifest["splits"]["train"])
    n_val = sum(s["tokens"] for s in manifest["splits"]["val"])
    console.print(f"packed: {n_train:,} train / {n_val:,} val tokens in {data_dir} ({time.time() - t0:.0f}s total)")
    return data_dir


def quickstart_config(run_dir: str, data_dir: str, minutes: float, overrides: list[str] | None = None):
    """The quickstart's config: a small code model sized so a few CPU minutes give Python-like output."""
    from lmforge.config import deep_merge, parse_overrides

    tree = {
        "run_dir": run_dir,
        "model": {"preset": "quickstart"},
        "data": {"path": data_dir, "seq_len": 256},
        "optimizer": {"name": "adamw", "lr": 3e-3, "weight_decay": 0.1, "betas": [0.9, 0.95]},
        "scheduler": {"name": "cosine", "warmup_steps": 50, "min_lr_ratio": 0.1},
        "training": {"max_steps": 1000, "max_minutes": minutes, "micro_batch_size": 8, "grad_accum_steps": 1,
                     "precision": "auto", "eval_every": 0, "eval_batches": 20, "seed": 1337},
        "checkpoint": {"every_steps": 200, "keep_last": 2},
        "logging": {"log_every": 10},
    }
    if overrides:
        tree = deep_merge(tree, parse_overrides(overrides))
    return build_config(tree, source="quickstart")


def calibrate_max_steps(cfg, minutes: float, vocab_size: int, probe_steps: int = 3) -> tuple[int, str]:
    """Time a few optimizer steps of the configured model on this machine and return how many fit in
    ``minutes``, so the cosine schedule decays over the run actually trained (not a nominal horizon), and a
    line saying what was measured (median step time, the precision and why it was chosen)."""
    import torch

    from lmforge.models import build_model
    from lmforge.training.optim import build_optimizer
    from lmforge.training.engine import accumulate_gradients

    from lmforge.hardware import resolve_precision

    decision = resolve_precision(cfg.training.precision, torch.device("cpu"))  # what train() will use
    precision = decision.precision
    mcfg = cfg.model.model_copy(update={"vocab_size": vocab_size})
    model = build_model(mcfg, seed=0)
    opt = build_optimizer(model, cfg.optimizer)
    B, T = cfg.training.micro_batch_size, cfg.data.seq_len
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(0, vocab_size, (B, T), generator=g),
             "labels": torch.randint(0, vocab_size, (B, T), generator=g)}
    times = []
    for _ in range(probe_steps + 1):
        t0 = time.perf_counter()
        accumulate_gradients(model, [batch] * cfg.training.grad_accum_steps, torch.device("cpu"),
                             precision=precision)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    step_s = sorted(times[1:])[len(times[1:]) // 2]  # median, first step excluded (warm-up)
    measured = (f"measured {step_s * 1000:.0f} ms per optimizer step (median of {probe_steps}) in "
                f"{precision}: {decision.reason}")
    return max(20, int(minutes * 60 / step_s)), measured


def run_quickstart(run_dir: str = "runs/quickstart", minutes: float = 4.0, overrides: list[str] | None = None,
                   prompt: str = "def ", corpus_mb: float | None = None) -> dict:
    from lmforge.inference import generate_from_run
    from lmforge.training.trainer import train

    console = Console()
    run = Path(run_dir)
    data_dir = run.parent / f"{run.name}-data" / "packed"
    cfg = quickstart_config(str(run), str(data_dir), minutes, overrides)  # a bad override fails before any work
    data_dir = _prepare_data(data_dir, console, corpus_mb)
    given = " ".join(overrides or [])
    if "--training.max_steps" not in given:
        from lmforge.data.pack import read_manifest

        steps, measured = calibrate_max_steps(cfg, minutes, read_manifest(data_dir)["vocab_size"])
        fitted = [f"--training.max_steps={steps}"]
        if "--scheduler.warmup_steps" not in given:  # a tenth of a short run warms up, at most the recipe's 50
            fitted.append(f"--scheduler.warmup_steps={max(5, min(cfg.scheduler.warmup_steps, steps // 10))}")
        # the wall-clock budget stays as a safety net a little past the calibrated length
        cfg = quickstart_config(str(run), str(data_dir), minutes * 1.25, (overrides or []) + fitted)
        console.print(f"calibrated: {steps} optimizer steps ({cfg.training.micro_batch_size} × {cfg.data.seq_len} "
                      f"tokens, warm-up {cfg.scheduler.warmup_steps}) fit in ~{minutes:g} minutes on this machine; "
                      f"{measured}")
    run.mkdir(parents=True, exist_ok=True)
    shutil.copy(data_dir / "tokenizer.json", run / "tokenizer.json")
    summary = train(cfg)

    console.rule("result")
    val_loss = summary.get("val_loss")
    if val_loss is not None:
        console.print(f"validation loss {val_loss:.3f}  perplexity {summary.get('val_ppl', float('nan')):.1f}")
    sample = generate_from_run(str(run), [prompt], max_new_tokens=200, temperature=0.7, top_k=50, seed=0)[0]
    console.print("[bold]sample[/bold] (prompt in brackets):")
    console.print(f"[{prompt}]" + sample, markup=False, highlight=False)
    (run / "sample.txt").write_text(prompt + sample, encoding="utf-8")
    (run / "quickstart_summary.json").write_text(json.dumps({**summary, "sample": prompt + sample}, indent=2))
    console.print(f"\nrun folder: {run}  (config.yaml, checkpoints/, metrics.jsonl, tensorboard/, tokenizer.json)")
    console.print(f"try: lmforge generate --run {run} --prompt 'import os\\n'")
    return summary
