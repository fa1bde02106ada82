"""``lmforge estimate`` and ``lmforge checkpoint consolidate|list|move-aside``."""

from __future__ import annotations

import argparse


def _cmd_estimate(args: argparse.Namespace, extra: list[str]) -> int:
    from lmforge.distributed.estimate import estimate_main

    return estimate_main(extra)


def _cmd_consolidate(args: argparse.Namespace, extra: list[str]) -> int:
    from lmforge.config import ConfigError

    if extra:
        raise ConfigError(f"checkpoint consolidate: unexpected arguments {' '.join(extra)}")
    from lmforge.checkpoint import consolidate

    out = consolidate(args.checkpoint, args.out)  # CheckpointError / FileNotFoundError: lmforge.cli reports them
    print(f"wrote {out}")
    return 0


def _cmd_list(args: argparse.Namespace, extra: list[str]) -> int:
    from lmforge.config import ConfigError

    if extra:
        raise ConfigError(f"checkpoint {args.checkpoint_command}: unexpected arguments {' '.join(extra)}")
    from lmforge.checkpoint.aside import checkpoints_root, describe, describe_moved, move_aside, survey
    from lmforge.checkpoint.folder import restore_swapped_out

    entries = survey(args.run)  # CheckpointError when it is not a run folder with checkpoints/
    if args.checkpoint_command == "move-aside":
        if restore_swapped_out(checkpoints_root(args.run)):  # an only copy goes back, never aside
            entries = survey(args.run)
        print(describe_moved(args.run, entries, move_aside(args.run, entries)))
    else:
        print(describe(args.run, entries))
    return 0


def add_distributed_commands(subparsers) -> None:
    e = subparsers.add_parser("estimate", add_help=False,
                              help="per-rank memory for each parallel strategy, and a recommendation for a budget")
    e.set_defaults(func=_cmd_estimate, passthrough=True)

    c = subparsers.add_parser("checkpoint", help="checkpoint tools (consolidate, list and verify, move aside)")
    csub = c.add_subparsers(dest="checkpoint_command", metavar="CHECKPOINT_COMMAND", required=True)
    k = csub.add_parser("consolidate", help="merge a sharded checkpoint's weights into one safetensors file")
    k.add_argument("checkpoint", help="checkpoint folder (step_XXXXXXX) of any format, or a run folder (its newest "
                   "checkpoint that verifies)")
    k.add_argument("--out", required=True, help="output .safetensors file")
    k.set_defaults(func=_cmd_consolidate)
    for name, help_ in (("list", "every checkpoint folder of a run: OK, or why it does not verify"),
                        ("move-aside", "move a run's checkpoint folders that do not verify (and leftovers of dead "
                         "writers) into checkpoints/unusable/, a note beside each; nothing is deleted")):
        m = csub.add_parser(name, help=help_)
        m.add_argument("run", help="run folder (holds checkpoints/)")
        m.set_defaults(func=_cmd_list)
