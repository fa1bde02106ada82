"""``lmforge data prepare|inspect|verify``. ``add_data_commands(subparsers)`` registers them."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from lmforge.config import ConfigError


def _prepare_overrides(args: argparse.Namespace, extra: list[str]) -> dict:
    """Shortcut flags → a config tree merged over the YAML (and under --section.key overrides)."""
    from lmforge.config import deep_merge, parse_overrides

    tree: dict = {}
    if args.input:
        tree["sources"] = [{"path": p, "type": args.type, "field": args.field, "doc_mode": args.doc_mode}
                           for p in args.input]
    out: dict = {}
    if args.out:
        out["dir"] = args.out
    if args.workers is not None:
        out["num_workers"] = args.workers
    if out:
        tree["output"] = out
    tok: dict = {}
    if args.tokenizer:
        tok["path"] = args.tokenizer
    if args.vocab_size:
        tok["vocab_size"] = args.vocab_size
    if tok:
        tree["tokenizer"] = tok
    if args.strict:
        tree["strict"] = True
    return deep_merge(tree, parse_overrides(extra)) if extra else tree


def cmd_prepare(args: argparse.Namespace, extra: list[str]) -> int:
    from rich.console import Console

    from lmforge.data.config import load_prepare_config
    from lmforge.data.prepare import prepare, summary_table

    console = Console(stderr=False)
    cfg = load_prepare_config(args.config, _prepare_overrides(args, extra))
    manifest = prepare(cfg, console=console, force=args.force)  # strict mode: BadInput (a DataError) names file:line
    console.print(summary_table(manifest))
    examples = manifest.get("prepare", {}).get("skipped_examples", {})
    for reason, items in examples.items():
        for item in items:
            console.print(f"[dim]skipped {reason}: {item}[/]", markup=True, highlight=False)
    for warning in manifest.get("prepare", {}).get("warnings", []):
        print(f"WARNING: {warning}", file=sys.stderr)  # one unwrapped line, last, where it is seen
    return 0


def cmd_inspect(args: argparse.Namespace, extra: list[str]) -> int:
    from rich.console import Console

    from lmforge.data.verify import inspect_data, print_inspect

    if extra:
        raise ConfigError(f"data inspect: unexpected arguments {' '.join(extra)}")
    report = inspect_data(args.dir, split=args.split, samples=args.samples, sample_tokens=args.sample_tokens)
    if args.json:
        print(json.dumps(report, ensure_ascii=False, indent=2))
    else:
        print_inspect(report, Console())
    return 0


def cmd_verify(args: argparse.Namespace, extra: list[str]) -> int:
    from lmforge.data.verify import verify

    if extra:
        raise ConfigError(f"data verify: unexpected arguments {' '.join(extra)}")
    problems = verify(args.dir, check_ids=not args.fast)
    if problems:
        for p in problems:
            print(f"FAIL {p}", file=sys.stderr)
        raise _verify_failed(Path(args.dir), problems)
    print(f"{args.dir}: OK (all shards match manifest.json)")
    return 0


def _verify_failed(folder: Path, problems: list[str]):
    """One error line naming each failing file and what failed (the FAIL lines above hold every detail)."""
    from lmforge.errors import DataError

    short = [p.removeprefix(f"{folder}{os.sep}") for p in problems]
    short = [": ".join(p.split(": ")[:2]) for p in short]  # "x.bin: sha256 mismatch (...)", without the hashes
    shown = "; ".join(short[:3]) + (f"; and {len(short) - 3} more (listed above)" if len(short) > 3 else "")
    return DataError(f"{folder}: verification failed, {len(problems)} problem(s): {shown}",
                     hint="do not train on it: re-run `lmforge data prepare` (with --force) to rebuild the folder, "
                          "or restore the files listed above from a backup")


def add_data_commands(subparsers) -> None:
    d = subparsers.add_parser("data", help="prepare, inspect and verify packed token data")
    dsub = d.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)

    p = dsub.add_parser("prepare", help="sources → clean → dedup → tokenizer → packed shards + manifest",
                        epilog="Any config key can be overridden with --section.key=value, e.g. --dedup.threshold=0.9")
    p.add_argument("--config", help="prepare YAML (see docs/data.md)")
    p.add_argument("--input", action="append", help="file, folder or glob (repeatable); replaces config sources")
    p.add_argument("--type", default="auto", help="source type for --input (auto, text, jsonl, parquet, csv, tsv, hf)")
    p.add_argument("--field", default="text", help="JSONL key / column for --input")
    p.add_argument("--doc-mode", default="file", choices=["file", "paragraph", "line"])
    p.add_argument("--out", help="output folder (output.dir)")
    p.add_argument("--tokenizer", help="use this tokenizer instead of training one")
    p.add_argument("--vocab-size", type=int, help="vocab size of the trained tokenizer")
    p.add_argument("--workers", type=int, help="tokenizer processes")
    p.add_argument("--strict", action="store_true", help="fail on the first bad input, naming file and line")
    p.add_argument("--force", action="store_true", help="redo everything even if the output is up to date")
    p.set_defaults(func=cmd_prepare)

    i = dsub.add_parser("inspect", help="manifest summary, token histogram and decoded sample windows")
    i.add_argument("dir")
    i.add_argument("--split", default="train")
    i.add_argument("--samples", type=int, default=3)
    i.add_argument("--sample-tokens", type=int, default=64)
    i.add_argument("--json", action="store_true", help="print the report as JSON")
    i.set_defaults(func=cmd_inspect)

    v = dsub.add_parser("verify", help="re-check every shard against manifest checksums (exit 2 on a problem)")
    v.add_argument("dir")
    v.add_argument("--fast", action="store_true", help="do not report token ids >= vocab_size (kept for old "
                   "scripts: the range check shares the hash's single pass and costs nothing extra)")
    v.set_defaults(func=cmd_verify)


def main(argv: list[str] | None = None) -> int:
    """Standalone entry: ``python -m lmforge.data.cli prepare ...`` is ``lmforge data prepare ...`` (same
    error handler)."""
    from lmforge.cli import main as lmforge_main

    return lmforge_main(["data", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
