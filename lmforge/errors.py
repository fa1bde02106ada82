"""The error types every lmforge subsystem raises for a problem the user can fix.

A ``UserError`` is bad input, config, data, a checkpoint or the environment: the CLI prints its message as one
``error:`` line (plus its ``hint``) and exits with code 2. Anything else escaping a command is a bug in
lmforge: the CLI prints the traceback and exits with code 1. ``LMFORGE_DEBUG=1`` shows the traceback always.
Each message says what is wrong, where (config key, file:line, shard, tensor) and, where known, what to do.
"""

from __future__ import annotations

from typing import Optional


class UserError(Exception):
    """Base of every user-fixable error; ``hint`` is an optional second line saying what to do."""

    def __init__(self, message: str, hint: Optional[str] = None):
        super().__init__(message)
        self.hint = hint


class ConfigError(UserError, ValueError):
    """A config problem; the message names the key path (and file:line:column when it came from YAML)."""


class DataError(UserError, ValueError):
    """Input or packed data that cannot be used; the message names the file and line, or the shard."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used (missing file, checksum mismatch, unreadable, other shape)."""


class SetupError(UserError, RuntimeError):
    """The environment cannot run the job (missing package, device, launcher variable)."""
