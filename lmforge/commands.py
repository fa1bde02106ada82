"""Subcommand groups contributed by subsystems. Each entry takes argparse's subparsers object and adds
parsers whose ``func(args, extra)`` returns an exit code. Registrars import nothing heavy."""

from lmforge.compress.cli import add_compress_commands
from lmforge.data.cli import add_data_commands
from lmforge.distributed.cli import add_distributed_commands
from lmforge.environment import add_env_commands
from lmforge.finetune.cli import add_finetune_commands
from lmforge.serve.cli import add_serve_commands
from lmforge.tune.cli import add_tune_commands


def _cmd_hf(args, extra: list[str]) -> int:
    from lmforge.models.hf.convert import run

    return run(extra)


def add_hf_commands(subparsers) -> None:
    h = subparsers.add_parser("hf", add_help=False,
                              help="HF interop: export a run to a transformers folder, check an HF folder")
    h.set_defaults(func=_cmd_hf, passthrough=True)


REGISTRARS: list = [add_data_commands, add_finetune_commands, add_distributed_commands, add_hf_commands,
                    add_env_commands, add_serve_commands, add_tune_commands, add_compress_commands]
