"""Where the repository and the shared data sets are (``$LMFORGE_DATA``, default ``<repo>/../shared/data``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("LMFORGE_DATA", REPO.parent / "shared" / "data"))


def shared(*parts: str) -> Path:
    """A path inside the shared data folder, or skip the test saying where it looked."""
    p = DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"shared data not found at {p} (set LMFORGE_DATA to the shared data folder)")
    return p
