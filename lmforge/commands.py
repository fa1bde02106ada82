"""Subcommand groups contributed by subsystems. Each entry takes argparse's subparsers object and adds
parsers whose ``func(args, extra)`` returns an exit code."""

REGISTRARS: list = []
