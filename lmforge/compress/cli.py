"""``lmforge compress quantize|prune|distill|export SOURCE --out OUT [--config FILE] [--section.key=value ...]``."""

from __future__ import annotations

import argparse

METHODS = ("quantize", "prune", "distill", "export")


def _cmd_compress(args: argparse.Namespace, extra: list[str]) -> int:
    from lmforge.compress.config import load_compress_config
    from lmforge.compress.report import print_summary
    from lmforge.compress.run import compress

    overrides = list(extra) + [f"--source={args.source}", f"--out={args.out}"]
    cfg = load_compress_config(args.config, overrides)
    rep = compress(args.compress_command, cfg)
    from pathlib import Path

    print_summary(rep, Path(rep["out"]))
    return 0


def add_compress_commands(subparsers) -> None:
    c = subparsers.add_parser("compress", help="quantize, prune, distil or export a run (pretraining, fine-tuning "
                              "or HF folder); writes a loadable run folder with report.{json,md,html}")
    sub = c.add_subparsers(dest="compress_command", metavar="METHOD", required=True)
    helps = {"quantize": "int8 weight-only / int8 dynamic (torchao; kernel chosen per machine), QAT",
             "prune": "unstructured magnitude / Wanda, 2:4, structured FFN channels and heads (+ recovery)",
             "distill": "a shallower student from the teacher's layers, trained on KL + hard labels",
             "export": "torch.export (.pt2) or ONNX (+ ONNX Runtime quantizer), parity-checked"}
    for name in METHODS:
        p = sub.add_parser(name, help=helps[name])
        p.add_argument("source", help="run folder, fine-tuning run folder or HF folder")
        p.add_argument("--out", required=True, help="output folder (must not exist)")
        p.add_argument("--config", help="YAML config (sections: quantize, prune, distill, export, train, eval, bench)")
        p.set_defaults(func=_cmd_compress)
