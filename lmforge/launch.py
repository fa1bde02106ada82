"""``lmforge train --nproc N``: a thin wrapper that re-executes the same command under torchrun."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from lmforge.errors import SetupError


def torchrun_command(nproc: int, config: str | None, overrides: list[str], deepspeed: str | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "lmforge", "train"]
    if config:
        cmd += ["--config", config]
    if deepspeed:
        cmd += ["--deepspeed", deepspeed]
    return cmd + list(overrides)


def launch_torchrun(args: argparse.Namespace, overrides: list[str]) -> int:
    if "RANK" in os.environ:  # already under a launcher: never nest torchrun
        raise SetupError("--nproc: already running under a launcher (RANK is set); torchrun is never nested",
                         hint="drop --nproc when launching with torchrun yourself")
    cmd = torchrun_command(args.nproc, args.config, overrides, getattr(args, "deepspeed", None))
    print("launching:", " ".join(cmd), file=sys.stderr)
    return subprocess.call(cmd)
