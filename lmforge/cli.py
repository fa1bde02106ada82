"""The ``lmforge`` command line: one subcommand per job, each a thin shell over a library function.

Heavy modules (torch, tokenizers, ...) are imported inside the handlers so ``lmforge --help`` is instant.
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import sys
import traceback
from typing import Optional

from lmforge.errors import ConfigError, UserError

# OSErrors that are the user's to fix (a path that is missing, unwritable, not a folder, full) → exit 2
_USER_OS_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)
_OS_HINTS = {errno.EROFS: "the file system is read-only: choose a writable folder",
             errno.EACCES: "check the path's permissions, or choose a folder you can write to",
             errno.EPERM: "check the path's permissions, or choose a folder you can write to",
             errno.ENOSPC: "the disk is full: free some space or write to another disk",
             errno.EDQUOT: "the disk quota is exhausted: free some space or write to another disk",
             errno.ENOTDIR: "a part of this path is a file, not a folder"}
_USER_ERRNOS = set(_OS_HINTS) | {errno.ENOENT, errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG,
                                 errno.ELOOP, errno.ENOTEMPTY}


def user_problem(err: BaseException) -> Optional[tuple[str, Optional[str]]]:
    """(message, hint) when ``err`` is the user's to fix; None when it is a bug in lmforge."""
    if isinstance(err, UserError):
        return str(err), err.hint
    if isinstance(err, OSError) and (isinstance(err, _USER_OS_ERRORS) or err.errno in _USER_ERRNOS):
        if err.strerror and err.filename is not None:  # raised by the OS: "[Errno 30] ..." → "path: reason"
            to = f" → {err.filename2}" if err.filename2 is not None else ""
            return f"{err.filename}{to}: {err.strerror}", _OS_HINTS.get(err.errno)
        return str(err), _OS_HINTS.get(err.errno)
    return None


def report_error(prog: str, err: BaseException) -> int:
    """The error policy of every command. A user error (``UserError``, or a path the user must fix) → one
    ``PROG: error: ...`` line per message line plus ``hint: ...``, exit 2. Anything else is a bug → its
    traceback and a line saying so, exit 1. ``LMFORGE_DEBUG=1`` prints the traceback for every error."""
    debug = os.environ.get("LMFORGE_DEBUG", "") not in ("", "0")
    problem = user_problem(err)
    if debug or problem is None:
        traceback.print_exception(err, file=sys.stderr)
    if problem is None:
        print(f"{prog}: internal error: {type(err).__name__}: {err}".splitlines()[0], file=sys.stderr)
        print(f"{prog}: this is a bug in lmforge, not a problem with your input; please report it with the "
              "traceback above and the output of `lmforge env --json` (versions, devices, CPU flags, probe)",
              file=sys.stderr)
        return 1
    message, hint = problem
    for line in message.splitlines() or [type(err).__name__]:
        print(f"{prog}: error: {line}", file=sys.stderr)
    if hint:
        print(f"hint: {hint}", file=sys.stderr)
    return 2


def _cmd_quickstart(args: argparse.Namespace, extra: list[str]) -> int:
    from lmforge.quickstart import run_quickstart

    run_quickstart(run_dir=args.run_dir, minutes=args.minutes, overrides=extra, prompt=args.prompt,
                   corpus_mb=args.corpus_mb)
    return 0


def _cmd_train(args: argparse.Namespace, extra: list[str]) -> int:
    overrides = list(extra)
    if args.resume:
        overrides.append(f"--checkpoint.resume={args.resume}")
    if args.nproc is not None and args.nproc < 1:
        raise ConfigError(f"--nproc {args.nproc}: the number of processes must be >= 1",
                          hint="drop --nproc for one process, or give the processes to start on this machine")
    if args.nproc is not None and args.nproc > 1:
        from lmforge.launch import launch_torchrun

        return launch_torchrun(args, overrides)
    _export_launcher()  # mpirun / srun without torchrun: every engine then sees torchrun's variables
    cfg = _train_config(args, overrides)
    from lmforge.training.trainer import train

    train(cfg)  # native at any world size, or the DeepSpeed engine (distributed.engine)
    return 0


def _export_launcher() -> None:
    """Rank, world size and rendezvous discovered from an MPI / Slurm launch, exported as torchrun's variables."""
    from lmforge.distributed.launch_env import discover

    env = discover()
    if env.world_size > 1 and env.source != "torchrun":
        env.export()


def _train_config(args: argparse.Namespace, overrides: list[str]):
    """YAML config, then a DeepSpeed JSON (``--deepspeed``) over it, then command-line overrides over both."""
    import os

    from lmforge.config import build_config, config_to_dict, deep_merge, load_config, parse_overrides

    if not args.deepspeed:
        return load_config(args.config, overrides)
    from lmforge.distributed.deepspeed_config import load_deepspeed_config

    base = load_config(args.config, overrides)
    d = base.distributed
    world = int(os.environ.get("WORLD_SIZE", args.nproc or 1))
    dp = max(world // (max(d.tp, 1) * max(d.pp, 1)), 1)
    cfg, notes = load_deepspeed_config(args.deepspeed, dp, base=base)
    if int(os.environ.get("RANK", 0)) == 0:
        for note in notes:
            print(f"deepspeed config: {note}", file=sys.stderr)
    return build_config(deep_merge(config_to_dict(cfg), parse_overrides(overrides)), source="command line")


def _cmd_generate(args: argparse.Namespace, extra: list[str]) -> int:
    if extra:
        raise ConfigError(f"generate: unexpected arguments {' '.join(extra)}")
    _check_generate_args(args)
    from lmforge.inference import generate_from_run

    texts = generate_from_run(
        args.run, args.prompt, checkpoint=args.checkpoint, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop, runtime=args.runtime,
        dtype=args.dtype,
    )
    for prompt, text in zip(args.prompt, texts):
        print(prompt + text)
        if len(args.prompt) > 1:
            print("-" * 40)
    return 0


def _check_generate_args(args: argparse.Namespace) -> None:
    """Refuse sampling flags that mean nothing before any model is loaded, naming the flag."""
    from lmforge.hardware.precision import check_dtype_name

    check_dtype_name(args.dtype, "--dtype")
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {args.max_new_tokens}: must be >= 1")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise ConfigError(f"--temperature {args.temperature}: must be a finite number >= 0 (0: greedy decoding)")
    if args.top_k is not None and args.top_k < 1:
        raise ConfigError(f"--top-k {args.top_k}: must be >= 1 (leave it out to keep every token)")
    if args.top_p is not None and not 0.0 < args.top_p <= 1.0:
        raise ConfigError(f"--top-p {args.top_p}: must be in (0, 1] (leave it out to keep every token)")
    if not math.isfinite(args.repetition_penalty) or args.repetition_penalty <= 0:
        raise ConfigError(f"--repetition-penalty {args.repetition_penalty}: must be a finite number > 0 "
                          "(1: no penalty)")
    for prompt in args.prompt:
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as e:  # undecodable command-line bytes arrive as lone surrogates
            raise ConfigError(f"--prompt {prompt[:40]!r}...: not valid UTF-8 text (at character {e.start})") from None


def _cmd_config(args: argparse.Namespace, extra: list[str]) -> int:
    import yaml

    from lmforge.config import config_to_dict, load_config, reference_markdown

    if args.reference:
        print(reference_markdown())
        return 0
    cfg = load_config(args.config, extra)
    from lmforge.config_checks import lint

    for warning in lint(cfg):  # a contradiction raises ConfigError
        print(f"lmforge config: warning: {warning}", file=sys.stderr)
    print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lmforge",
        description="Train language models from raw text to a served model, with one config.",
        epilog="Config overrides: any command taking --config also accepts --section.key=value.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    q = sub.add_parser("quickstart", help="build a corpus from Python's stdlib, train a tokenizer and a small "
                       "code model for a few minutes, evaluate it and generate a sample")
    q.add_argument("--run-dir", default="runs/quickstart", help="run folder (default: runs/quickstart)")
    q.add_argument("--minutes", type=float, default=4.0, help="training time budget (default: 4)")
    q.add_argument("--prompt", default="def ", help="prompt for the sample at the end")
    q.add_argument("--corpus-mb", type=float, default=None, help="use only this many MB of the stdlib (default: all)")
    q.set_defaults(func=_cmd_quickstart)

    t = sub.add_parser("train", help="train (or resume) a model from a YAML config plus --section.key=value overrides")
    t.add_argument("--config", help="YAML config file")
    t.add_argument("--resume", help="'auto' (newest complete checkpoint in run_dir) or a checkpoint folder")
    t.add_argument("--nproc", type=int, default=None, help="processes on this machine (wraps torchrun)")
    t.add_argument("--deepspeed", metavar="DS_CONFIG_JSON",
                   help="a DeepSpeed JSON config, mapped onto the native config (overrides still win)")
    t.set_defaults(func=_cmd_train)

    g = sub.add_parser("generate", help="generate text from a trained run folder")
    g.add_argument("--run", required=True, help="run folder written by train/quickstart")
    g.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    g.add_argument("--checkpoint", help="checkpoint folder (default: newest complete one in the run)")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--runtime", choices=["torch", "onnxruntime"], default="torch",
                   help="onnxruntime: run the graph `lmforge compress export` wrote into the run (CPU)")
    g.add_argument("--dtype", default="auto", help="auto (default: what training.precision auto picks on this "
                   "machine; float32 for a compressed run), float32, bfloat16, float16")
    g.set_defaults(func=_cmd_generate)

    c = sub.add_parser("config", help="validate a config and print it fully resolved (defaults and presets filled)")
    c.add_argument("--config", help="YAML config file")
    c.add_argument("--reference", action="store_true", help="print the reference of every key (Markdown)")
    c.set_defaults(func=_cmd_config)

    for register in _optional_commands():
        register(sub)
    return p


def _optional_commands():
    """Subcommand groups that live with their subsystem (data, distributed, ...)."""
    from lmforge.commands import REGISTRARS

    return REGISTRARS


def main(argv: list[str] | None = None) -> int:
    """The one entry and the one error handler of every ``lmforge`` command (see ``report_error``)."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "passthrough", False):  # the command parses its own arguments
        extra = argv[argv.index(args.command) + 1:]
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args, extra) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001  (the one place every command's failure is reported)
        return report_error(_command_name(args, extra), err)


def _command_name(args: argparse.Namespace, extra: list[str]) -> str:
    parts = ["lmforge", args.command]
    parts += [getattr(args, k) for k in ("data_command", "checkpoint_command", "compress_command")
              if getattr(args, k, None)]
    if getattr(args, "passthrough", False) and extra and not extra[0].startswith("-"):
        parts.append(extra[0])  # lmforge hf export
    return " ".join(parts)
