"""``lmforge finetune`` and ``lmforge evaluate`` (registered by ``add_finetune_commands``)."""

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
    if extra:
        raise ConfigError(f"evaluate: unexpected arguments {' '.join(extra)}")
    for flag, value, default in (("--max-examples", args.max_examples, "every example"),
                                 ("--batch-size", args.batch_size, "the run's eval batch size")):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} {value}: must be >= 1 (leave it out for {default})")
    from lmforge.finetune.evaluation import evaluate_run

    evaluate_run(args.run, args.data, name=args.name, max_examples=args.max_examples, batch_size=args.batch_size)
    return 0


def add_finetune_commands(subparsers) -> None:
    f = subparsers.add_parser("finetune", help="fine-tune a base (lmforge run or HF folder) for classification, "
                              "token classification or SFT with full/lora/adalora/adapter/prefix")
    f.add_argument("--config", help="YAML fine-tuning config (see docs/finetune.md)")
    f.add_argument("--resume", help="'auto' (newest checkpoint of run_dir that verifies) or a checkpoint folder")
    f.set_defaults(func=_cmd_finetune)
    e = subparsers.add_parser("evaluate", help="score a fine-tuning run's best weights on a data file and write "
                              "the report (JSON, Markdown, HTML, confusion PNG) to RUN/reports/")
    e.add_argument("--run", required=True, help="fine-tuning run folder")
    e.add_argument("--data", required=True, help="file in the run's task format (TSV/CSV/JSONL or CoNLL)")
    e.add_argument("--name", default="eval", help="report file name stem (default: eval)")
    e.add_argument("--max-examples", type=int, default=None)
    e.add_argument("--batch-size", type=int, default=None)
    e.set_defaults(func=_cmd_evaluate)
