"""Subcommand groups contributed by subsystems. Each entry takes argparse's subparsers object and adds
parsers whose ``func(args, extra)`` returns an exit code. Registrars import nothing heavy."""

from lmforge.data.cli import add_data_commands
from lmforge.distributed.cli import add_distributed_commands

REGISTRARS: list = [add_data_commands, add_distributed_commands]
