"""Small built-in corpora that need no download."""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path
from typing import Iterator, Optional

_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "idlelib", "turtledemo"}
_MAX_FILE_BYTES = 512 * 1024  # generated tables and the like; not representative code


def python_stdlib_documents(max_bytes: Optional[int] = None) -> Iterator[str]:
    """Yield the running interpreter's standard-library ``.py`` files as documents, in a fixed order.

    Skips third-party packages, files over 512 KiB and files that are not valid UTF-8; stops once
    ``max_bytes`` of source have been yielded.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(f"standard library folder not found: {root}")
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            path = Path(dirpath) / name
            try:
                if path.stat().st_size > _MAX_FILE_BYTES:
                    continue
                text = path.read_bytes().decode("utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            if not text.strip():
                continue
            yield text
            total += len(text.encode("utf-8"))
            if max_bytes is not None and total >= max_bytes:
                return
