"""A run's checkpoint folders with their verification status, and moving the unusable ones aside on request.

``survey(run_dir)``: every ``step_N`` folder (``folder.problem`` says why it cannot be used, None when it
verifies) and every ``.tmp-<pid>`` / ``.old-<pid>`` leftover of an unfinished save. ``move_aside(run_dir)``:
each folder that does not verify, and each leftover whose writer is no longer running on this machine, is
renamed (atomically, never over anything) into ``checkpoints/unusable/`` with a ``<name>.NOTE.txt`` beside it
(time, original path, reason). Nothing is ever deleted, and no reader or prune looks inside ``unusable/``.
``lmforge checkpoint list|move-aside RUN`` are the command line over them.
"""

from __future__ import annotations

import itertools
import os
from contextlib import suppress
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from lmforge.checkpoint.folder import (ASIDE, _fsync, is_checkpoint, leftover, moved_aside, problem,
                                       step_folders, writer_alive)
from lmforge.errors import CheckpointError


@dataclass
class Entry:
    path: Path
    problem: Optional[str]  # None: a checkpoint that verifies
    leftover: bool = False  # a .tmp-/.old- folder of an unfinished save (never read)
    busy: bool = False  # a leftover whose writer still runs on this machine: never moved

    @property
    def usable(self) -> bool:
        return self.problem is None


def checkpoints_root(run_dir: str | Path) -> Path:
    """``run_dir/checkpoints``; ``CheckpointError`` when ``run_dir`` is not a run folder that has one."""
    run = Path(run_dir)
    if not run.exists():
        raise CheckpointError(f"{run}: does not exist")
    if is_checkpoint(run) and run.parent.name == "checkpoints":
        raise CheckpointError(f"{run}: a checkpoint folder, not a run folder",
                              hint=f"give the run folder that holds it: {run.parent.parent}")
    if not (run / "checkpoints").is_dir():
        raise CheckpointError(f"{run}: no checkpoints folder (is it a run folder, and did the run save one?)")
    return run / "checkpoints"


def survey(run_dir: str | Path) -> list[Entry]:
    """Every checkpoint folder of the run (oldest first) with why it cannot be used, then the leftovers."""
    root = checkpoints_root(run_dir)
    entries = [Entry(p, problem(p)) for p in step_folders(run_dir)]
    for p in sorted(p for p in root.iterdir() if p.is_dir() and leftover(p)):
        name, kind, pid = leftover(p)
        step = root / name
        if kind == "old" and not step.exists():  # never moved aside: restore_swapped_out puts it back
            entries.append(Entry(p, f"{p}: the only copy of {step.name} (a save was cut between its two renames); "
                                    "the next resume, save or move-aside puts it back", leftover=True, busy=True))
            continue
        busy = writer_alive(pid)
        what = "an unfinished save" if kind == "tmp" else "the previous folder of a re-saved step"
        state = "still running on this machine: a save may be in progress" if busy else "no longer running"
        entries.append(Entry(p, f"{p}: {what} by process {pid} ({state}); never read", leftover=True, busy=busy))
    return entries


@dataclass
class Moved:
    source: Path
    dest: Path
    note: Path
    reason: str


def move_aside(run_dir: str | Path, entries: Optional[list[Entry]] = None) -> list[Moved]:
    """Move every folder of ``survey(run_dir)`` that cannot be used (busy leftovers excepted) into
    ``checkpoints/unusable/``, a note beside each. Returns what was moved; the folders that verify stay."""
    entries = survey(run_dir) if entries is None else entries
    todo = [e for e in entries if not e.usable and not e.busy]
    if not todo:
        return []
    return [set_aside(e.path, e.problem or "") for e in todo]


def set_aside(src: Path, reason: str, by: str = "`lmforge checkpoint move-aside`") -> Moved:
    """Move one folder of ``checkpoints/`` into ``checkpoints/unusable/`` with a note saying ``reason``."""
    aside = Path(src).parent / ASIDE
    aside.mkdir(exist_ok=True)
    moved = _move(Path(src), reason, aside, by)
    _fsync(aside)
    _fsync(aside.parent)
    return moved


def _reserve(aside: Path, name: str) -> tuple[Path, Path]:
    """An empty folder ``aside/name`` (or ``name.2``, ``name.3``...) created here, so no earlier one is ever
    overwritten, and the name of its note, which does not exist yet."""
    for n in itertools.count(1):
        dest = aside / (name if n == 1 else f"{name}.{n}")
        note = aside / f"{dest.name}.NOTE.txt"
        if os.path.lexists(note):
            continue
        try:
            os.mkdir(dest)  # exclusive: fails when the name is taken
        except FileExistsError:
            continue
        return dest, note
    raise AssertionError("unreachable")


def _move(src: Path, reason: str, aside: Path, by: str) -> Moved:
    dest, note = _reserve(aside, src.name)
    now = datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")
    text = (f"moved aside by {by} at {now} (process {os.getpid()})\n"
            f"original path: {src.resolve()}\n"
            f"now at: {dest.resolve()}\n"
            f"reason: {reason}\n"
            "Nothing in it was changed or deleted. No reader (train --resume auto, generate, hf export, checkpoint\n"
            f"consolidate, fine-tuning bases) looks inside checkpoints/{ASIDE}/. Once repaired, move it back to its\n"
            "original path to use it again.\n")
    wrote = False
    try:
        with open(note, "x", encoding="utf-8") as f:  # "x": never over an existing file
            wrote = True
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.rename(src, dest)  # atomic; replaces only the empty folder reserved above
    except OSError:
        with suppress(OSError):  # undo only what this call created (rmdir: the reserved folder, still empty)
            if wrote:
                note.unlink()
        with suppress(OSError):
            dest.rmdir()
        raise
    return Moved(src, dest, note, reason)


# ------------------------------------------------------------------------ what the command line prints

def _short(why: str, path: Path) -> str:
    """``why`` without the folder's own path (``…/step_N/x.distcp: …`` → ``x.distcp: …``)."""
    why = why[len(f"{path}: "):] if why.startswith(f"{path}: ") else why
    return why.replace(f"{path}{os.sep}", "")


def _newest_usable(entries: list[Entry]) -> Optional[Entry]:
    return next((e for e in reversed(entries) if e.usable), None)


def describe(run_dir: str | Path, entries: list[Entry]) -> str:
    """``lmforge checkpoint list``: one line per folder (OK / FAIL / LEFTOVER and why), then what readers use."""
    root = checkpoints_root(run_dir)
    ckpts = [e for e in entries if not e.leftover]
    bad, aside = [e for e in entries if not e.usable and not e.busy], moved_aside(run_dir)
    lines = [f"{root}: {len(ckpts)} checkpoint(s), {sum(e.usable for e in ckpts)} verify"
             + (f"; {len(entries) - len(ckpts)} leftover(s) of unfinished saves" if len(entries) > len(ckpts) else "")]
    width = max((len(e.path.name) for e in entries), default=0)
    for e in entries:
        status = "OK" if e.usable else "LEFTOVER" if e.leftover else "FAIL"
        lines.append(f"  {e.path.name:<{width}}  {status}" + ("" if e.usable else f"  {_short(e.problem, e.path)}"))
    newest = _newest_usable(entries)
    if newest is not None:
        lines.append(f"readers use {newest.path.name} (the newest that verifies: train --resume auto, generate, "
                     "hf export, checkpoint consolidate)")
    elif ckpts:
        lines.append("none verifies: train --resume auto, generate and hf export stop with an error")
    if bad:
        lines.append(f"{len(bad)} folder(s) cannot be used: `lmforge checkpoint move-aside {run_dir}` moves them "
                     f"into {root / ASIDE} with a note each (nothing is deleted)")
    if aside:
        lines.append(f"{ASIDE}/: {len(aside)} folder(s) moved aside earlier (never read; see their .NOTE.txt)")
    return "\n".join(lines)


def describe_moved(run_dir: str | Path, entries: list[Entry], moved: list[Moved]) -> str:
    """``lmforge checkpoint move-aside``: what moved where and why, what stayed, and what readers use now."""
    root = checkpoints_root(run_dir)
    lines = [f"moved {m.source.name} → {m.dest} (note: {m.note.name}): {_short(m.reason, m.source)}" for m in moved]
    lines += [f"left in place: {e.path.name} ({_short(e.problem, e.path)})" for e in entries if e.busy]
    if not moved:
        what = "every checkpoint in it verifies" if entries else "it holds no checkpoint folders"
        lines.append(f"nothing to move aside in {root}: {what}" if not any(e.busy for e in entries)
                     else f"nothing else to move aside in {root}")
        return "\n".join(lines)
    lines.append(f"moved {len(moved)} folder(s) into {root / ASIDE}; nothing was deleted")
    newest = _newest_usable(entries)
    if newest is not None:
        kept = sum(e.usable for e in entries)
        lines.append(f"{kept} checkpoint(s) that verify stay in place; readers use {newest.path.name}")
    else:
        lines.append(f"no checkpoint is left in {root}: `lmforge train --resume auto` on this run now starts over "
                     "from step 0, and generate / hf export need a new checkpoint")
    return "\n".join(lines)
