"""``lmforge finetune`` and ``lmforge evaluate`` (both kinds of run; registered by ``add_finetune_commands``)."""

from __future__ import annotations

import argparse
import os

from lmforge.config import ConfigError


def _cmd_finetune(args: argparse.Namespace, extra: list[str]) -> int:
    from lmforge.finetune.config import load_finetune_config
    from lmforge.finetune.trainer import finetune

    resume = [f"--checkpoint.resume={args.resume}"] if args.resume else []
    cfg = load_finetune_config(args.config, list(extra) + resume)
    summary = finetune(cfg)
    if os.environ.get("RANK", "0") != "0":  # under torchrun: rank 0 reports
        return 0
    if summary["best_value"] is None:
        print(f"stopped ({summary['stop_reason']}) at step {summary['steps']} before any evaluation; run folder "
              f"{cfg.run_dir}")
        return 0
    print(f"best {summary['metric']} {summary['best_value']:.4f} at step {summary['best_step']}; "
          f"run folder {cfg.run_dir}")
    return 0


def _cmd_evaluate(args: argparse.Namespace, extra: list[str]) -> int:
    """One command for both kinds of run: a fine-tuning run (finetune.yaml) is scored on ``--data``; a
    pretraining run (config.yaml) by perplexity / bits-per-byte and harness tasks."""
    from pathlib import Path

    if extra:
        raise ConfigError(f"evaluate: unexpected arguments {' '.join(extra)}")
    for flag, value, default in (("--max-examples", args.max_examples, "every example"),
                                 ("--batch-size", args.batch_size, "the run's eval batch size")):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} {value}: must be >= 1 (leave it out for {default})")
    run = args.run_pos or args.run
    if not run:
        raise ConfigError("evaluate: name the run folder (lmforge evaluate RUN ...)")
    if (Path(run) / "finetune.yaml").is_file() or (args.data and not (Path(run) / "config.yaml").is_file()):
        if not args.data:
            raise ConfigError("evaluate: a fine-tuning run is scored on --data FILE (the run's task format)")
        from lmforge.finetune.evaluation import evaluate_run

        evaluate_run(run, args.data, name=args.name, max_examples=args.max_examples, batch_size=args.batch_size,
                     runtime=args.runtime)
        return 0
    if args.data:
        raise ConfigError(f"evaluate: {run} is not a fine-tuning run (no finetune.yaml); for a pretraining run "
                          "use --text FILE, --packed DIR|run or --harness-tasks TASK.yaml")
    from lmforge.evaluation.run import evaluate_lm_run

    evaluate_lm_run(run, args.checkpoint, name=args.name if args.name != "eval" else "lm_eval",
                    texts=args.text, packed=args.packed, split=args.split, window=args.window, stride=args.stride,
                    harness_tasks=args.harness_tasks, limit=args.limit, batch_size=args.batch_size or 8,
                    max_tokens=args.max_tokens, runtime=args.runtime)
    return 0


def add_finetune_commands(subparsers) -> None:
    f = subparsers.add_parser("finetune", help="fine-tune a base (lmforge run or HF folder) for classification, "
                              "token classification or SFT with full/lora/adalora/adapter/prefix")
    f.add_argument("--config", help="YAML fine-tuning config (see docs/finetune.md)")
    f.add_argument("--resume", help="'auto' (newest checkpoint of run_dir that verifies) or a checkpoint folder")
    f.set_defaults(func=_cmd_finetune)
    e = subparsers.add_parser("evaluate", help="score a run: a fine-tuning run's best weights on a data file (P/R/F1, "
                              "confusion), or a pretraining run's perplexity / bits-per-byte and lm-eval-harness "
                              "tasks; reports in RUN/reports/")
    e.add_argument("run_pos", nargs="?", metavar="RUN", help="run folder (fine-tuning or pretraining)")
    e.add_argument("--run", help="run folder (same as RUN)")
    e.add_argument("--data", help="fine-tuning run: file in the run's task format (TSV/CSV/JSONL or CoNLL)")
    e.add_argument("--text", action="append", help="pretraining run: raw text file scored as a document (repeat)")
    e.add_argument("--packed", help="pretraining run: a packed data folder, or 'run' for the run's data.path")
    e.add_argument("--split", default="val", help="split of --packed (default val)")
    e.add_argument("--window", type=int, default=None, help="sliding window in tokens (default: model context)")
    e.add_argument("--stride", type=int, default=None, help="window step (default: window/2)")
    e.add_argument("--max-tokens", type=int, default=None, help="--packed: score at most this many tokens")
    e.add_argument("--harness-tasks", action="append", help="local lm-evaluation-harness task YAML (repeat)")
    e.add_argument("--limit", type=int, default=None, help="harness: examples per task")
    e.add_argument("--checkpoint", help="pretraining run: checkpoint folder or .safetensors (default: newest)")
    e.add_argument("--name", default="eval", help="report file name stem (default: eval; lm_eval for LM runs)")
    e.add_argument("--max-examples", type=int, default=None)
    e.add_argument("--batch-size", type=int, default=None)
    e.add_argument("--runtime", choices=["torch", "onnxruntime"], default="torch",
                   help="onnxruntime: score the graph `lmforge compress export` wrote into the run (classifier or "
                   "decoder) on ONNX Runtime")
    e.set_defaults(func=_cmd_evaluate)
