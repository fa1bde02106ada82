"""Command-line conversion between lmforge runs and HF folders (for ``lmforge hf ...``).

    export RUN_DIR OUT [--checkpoint CKPT] [--dtype float32|bfloat16]
        newest (or given) checkpoint of a run → HF folder (config.json, model.safetensors, tokenizer files)
    check HF_DIR
        import an HF folder and print the lmforge model config it maps to (validation only)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import torch

from lmforge.errors import CheckpointError, ConfigError, UserError


def export_run(run_dir: str | Path, out: str | Path, checkpoint: Optional[str] = None,
               dtype: Optional[torch.dtype] = None) -> Path:
    """Write a run's model (and tokenizer, when the run has one) as an HF folder. A run quantized by
    ``lmforge compress`` is written with its int8 layers dequantized (HF folders have no such format)."""
    from lmforge.compress.qlinear import dequantized
    from lmforge.inference import load_run
    from lmforge.models.hf import save_hf

    model, tok, cfg, ckpt = load_run(run_dir, checkpoint)
    model = dequantized(model)
    out = save_hf(model, out, dtype=dtype)
    tok.save(out / "tokenizer.json")
    specials = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.model.max_seq_len}
    for key, tid in (("eos_token", tok.eos_id), ("pad_token", tok.pad_id)):
        if tid is not None:
            specials[key] = tok.decode([tid])
    (out / "tokenizer_config.json").write_text(json.dumps(specials, indent=2) + "\n", encoding="utf-8")
    (out / "lmforge_source.json").write_text(json.dumps({"run_dir": str(run_dir), "checkpoint": str(ckpt)},
                                                        indent=2) + "\n", encoding="utf-8")
    return out


def run(argv: Optional[list[str]] = None) -> int:
    """``lmforge hf ...`` (argv after ``hf``). Raises on failure; ``lmforge.cli`` reports it."""
    ap = argparse.ArgumentParser(prog="lmforge hf", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="run folder → HF folder loadable by transformers")
    e.add_argument("run_dir")
    e.add_argument("out")
    e.add_argument("--checkpoint", default=None)
    e.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    c = sub.add_parser("check", help="validate an HF folder and print the lmforge model config")
    c.add_argument("hf_dir")
    args = ap.parse_args(argv)
    try:
        return _export(args) if args.cmd == "export" else _check(args)
    except (ValueError, KeyError) as err:  # models/hf's readers name the folder, file and tensor (bad input)
        if isinstance(err, UserError):
            raise
        raise CheckpointError(str(err.args[0] if err.args else err)) from err


def _export(args: argparse.Namespace) -> int:
    if Path(args.out).exists() and any(Path(args.out).iterdir()):
        raise ConfigError(f"output folder {args.out} exists and is not empty",
                          hint="give a new or empty folder; the export never overwrites")
    out = export_run(args.run_dir, args.out, args.checkpoint, getattr(torch, args.dtype) if args.dtype else None)
    print(f"wrote {out}")
    return 0


def _check(args: argparse.Namespace) -> int:
    from lmforge.models.hf import hf_config_to_lmforge, load_hf

    cfg = hf_config_to_lmforge(args.hf_dir)
    model = load_hf(args.hf_dir)
    print(json.dumps(cfg.model_dump(mode="json"), indent=2))
    print(f"params {model.num_params() / 1e6:.2f}M")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """Standalone entry (``python -m lmforge.models.hf.convert``): the same as ``lmforge hf ...``, through the
    one error handler of ``lmforge.cli``."""
    from lmforge.cli import main as lmforge_main

    return lmforge_main(["hf", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
