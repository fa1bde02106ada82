"""The one checkpoint folder protocol: naming, atomic writing, verification, pruning.

A checkpoint is ``<run_dir>/checkpoints/step_0000100/``. ``write_folder`` builds it as
``step_0000100.tmp-<pid>/`` (the writers fill it) → every file fsynced and hashed (sha256, the files spread
over the ranks) → ``manifest.json`` → ``COMPLETE`` → atomic rename → prune. Only a folder named ``step_N``
holding ``COMPLETE`` is ever read; a crash at any point leaves a ``.tmp-``/``.old-`` folder (removed by a
later save) or the previous folder untouched. ``verify`` checks the marker and every file's size and sha256.
``checkpoints/unusable/`` (``ASIDE``) holds what ``lmforge checkpoint move-aside`` moved there; no reader
and no prune ever looks inside it (``aside.py``).

``Comm`` is the group the protocol runs over: ``Comm(collective=True)`` every rank of the default process
group (each call is then collective), ``Comm(collective=False)`` this process alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import time
from contextlib import suppress
from pathlib import Path
from typing import Any, Callable, Optional

import torch.distributed as dist

from lmforge.errors import CheckpointError

MARKER, MANIFEST = "COMPLETE", "manifest.json"
ASIDE = "unusable"  # checkpoints/unusable/: folders moved aside on request, never read (no step_N name)
FORMAT_VERSION = 2
_STEP = re.compile(r"^step_(\d{7,})$")
_LEFTOVER = re.compile(r"^(step_\d{7,})\.(tmp|old)-(\d+)$")  # a save's temporary / swapped-out folder


class Comm:
    """Rank / world size and the object collectives the protocol needs (no-ops when not collective)."""

    def __init__(self, collective: bool):
        self.on = collective and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.rank, self.size = (dist.get_rank(), dist.get_world_size()) if self.on else (0, 1)

    def gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order."""
        out = [obj] * self.size
        if self.on:
            dist.all_gather_object(out, obj)
        return out

    def first(self, error: Optional[str]) -> Optional[str]:
        """The first rank's error (None when no rank has one), the same on every rank."""
        return next((e for e in self.gather(error) if e), None)

    def agree(self, error: Optional[str]) -> None:
        """Raise the first rank's error on every rank (so no rank is left waiting in a collective)."""
        if (error := self.first(error)) is not None:
            raise CheckpointError(error)


def step_folder(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:07d}"


def step_of(folder: Path) -> Optional[int]:
    m = _STEP.match(folder.name)
    return int(m.group(1)) if m else None


def step_folders(run_dir: str | Path) -> list[Path]:
    """Every ``step_N`` folder of the run (complete or not; never ``.tmp-``/``.old-``), oldest first."""
    root = Path(run_dir) / "checkpoints"
    found = [p for p in root.iterdir() if p.is_dir() and step_of(p) is not None] if root.is_dir() else []
    return sorted(found, key=step_of)


def complete_folders(run_dir: str | Path) -> list[Path]:
    return [p for p in step_folders(run_dir) if (p / MARKER).is_file()]


def is_checkpoint(path: Path) -> bool:
    """A folder that is (or claims to be) one checkpoint rather than a run folder."""
    return path.is_dir() and ((path / MARKER).exists() or (path / MANIFEST).exists() or step_of(path) is not None)


def read_manifest(folder: Path) -> dict:
    """The manifest; folders of ``lmforge.distributed.checkpoint`` (``meta.json``, no checksums) read as
    format_version 0."""
    folder = Path(folder)
    try:
        if not (folder / MANIFEST).exists() and (folder / "meta.json").is_file():
            return {"format_version": 0, "format": "dcp", "files": {}, **json.loads((folder / "meta.json").read_text())}
        if not (folder / MANIFEST).exists() and any(folder.glob("*model_states.pt")):  # old DeepSpeed engine
            return {"format_version": 0, "format": "deepspeed", "files": {}, "step": step_of(folder)}
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{folder / MANIFEST}: unreadable ({e})") from None


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _files(folder: Path) -> list[str]:
    """Every file below ``folder`` (relative posix paths) except the manifest and the marker."""
    names = (p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return sorted(n for n in names if n not in (MANIFEST, MARKER))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    with suppress(OSError):  # some filesystems refuse fsync on directories
        os.fsync(fd)
    os.close(fd)


_VERIFIED: dict[tuple, tuple] = {}  # (folder, rank, ranks) → file stats when its share last verified


def problem(folder: Path, comm: Optional[Comm] = None) -> Optional[str]:
    """Why ``folder`` cannot be used (None when it verifies). Collective with a collective ``comm``: the
    ranks hash a share of the files each and all return the same answer."""
    comm, folder = comm or Comm(False), Path(folder)
    err = None
    try:
        if not folder.is_dir():
            raise CheckpointError(f"{folder}: does not exist" if not folder.exists() else f"{folder}: not a folder")
        if not (folder / MARKER).is_file():
            raise CheckpointError(f"{folder}: no {MARKER} marker (the save did not finish)")
        _check(folder, read_manifest(folder)["files"], comm)
    except (CheckpointError, OSError) as e:
        err = str(e)
    return comm.first(err)


def _check(folder: Path, files: dict, comm: Comm) -> None:
    for name in files:
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder / name}: missing")
    key = (folder.resolve(), comm.rank, comm.size)
    stats = tuple((n, (folder / n).stat().st_size, (folder / n).stat().st_mtime_ns) for n in sorted(files))
    if _VERIFIED.get(key) == stats:  # hashed by this process since, and untouched
        return
    for i, (name, info) in enumerate(sorted(files.items())):
        f = folder / name
        if i % comm.size != comm.rank:
            continue
        if f.stat().st_size != info["bytes"]:
            raise CheckpointError(f"{f}: {f.stat().st_size} bytes, manifest says {info['bytes']} (truncated?)")
        if sha256(f) != info["sha256"]:
            raise CheckpointError(f"{f}: sha256 differs from manifest.json (corrupted)")
    _VERIFIED[key] = stats


def verify(folder: Path, comm: Optional[Comm] = None) -> dict:
    """The manifest of a checkpoint that verifies; else ``CheckpointError`` saying why."""
    why = problem(folder, comm)
    if why:
        raise CheckpointError(why)
    return read_manifest(folder)


def newest_valid(run_dir: str | Path, comm: Optional[Comm] = None) -> Optional[Path]:
    """The newest checkpoint of the run that verifies; each newer one that does not is skipped with a warning
    naming the problem. None when the run has no checkpoint; ``CheckpointError`` listing every checkpoint and
    why when none verifies (nothing is deleted or overwritten). Collective with a collective ``comm``."""
    comm, reasons = comm or Comm(False), []
    if comm.rank == 0:
        restore_swapped_out(Path(run_dir) / "checkpoints")
    comm.gather(None)  # every rank lists after rank 0 put back what it could
    folders = step_folders(run_dir)
    for older, folder in reversed(list(enumerate(folders))):  # `older`: how many older candidates remain
        why = problem(folder, comm)
        if why is None:
            return folder
        reasons.append(why)
        if comm.rank == 0 and older:  # on stderr, not `warnings`: a filter must never hide a skipped checkpoint
            print(f"warning: skipping checkpoint {folder.name}: {why}; falling back to an older one",
                  file=sys.stderr, flush=True)
    if reasons:
        raise CheckpointError(f"none of the {len(folders)} checkpoints in {Path(run_dir) / 'checkpoints'} verifies: "
                              + "; ".join(reasons),
                              hint="nothing was loaded, deleted or overwritten; restore the folders from a backup, "
                                   f"or run `lmforge checkpoint move-aside {run_dir}` to move the unusable ones into "
                                   f"checkpoints/{ASIDE}/ (with a note each) and start the run over")
    aside = moved_aside(run_dir)
    if aside and comm.rank == 0:
        print(f"note: no checkpoint in {Path(run_dir) / 'checkpoints'}; the {len(aside)} folder(s) in {ASIDE}/ were "
              "moved aside by `lmforge checkpoint move-aside` (they do not verify) and are never read",
              file=sys.stderr, flush=True)
    return None


def moved_aside(run_dir: str | Path) -> list[Path]:
    """The folders ``lmforge checkpoint move-aside`` moved into ``checkpoints/unusable/`` (never read)."""
    root = Path(run_dir) / "checkpoints" / ASIDE
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def write_folder(run_dir: str | Path, step: int, write: Callable[[Path], None], manifest: dict[str, Any],
                 comm: Comm, prune_kw: Optional[dict] = None) -> Path:
    """The protocol (collective with a collective ``comm``). ``write(tmp)`` writes this rank's files;
    ``manifest`` is completed with format_version, step, time and files."""
    final = step_folder(run_dir, step)
    tmp, err = final.parent / f"{final.name}.tmp-{comm.gather(os.getpid())[0]}", None
    if comm.rank == 0:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        except OSError as e:
            err = f"{tmp}: cannot create the checkpoint folder ({e})"
    comm.agree(err)
    share: dict = {}
    try:
        write(tmp)
    except Exception as e:  # noqa: BLE001 - every rank must learn that the save failed
        err = f"{tmp}: writing rank {comm.rank}'s files failed ({type(e).__name__}: {e})"
    comm.agree(err)
    for i, name in enumerate(_files(tmp)):
        if i % comm.size == comm.rank:
            _fsync(tmp / name)
            share[name] = {"sha256": sha256(tmp / name), "bytes": (tmp / name).stat().st_size}
    files = {k: v for part in comm.gather(share) for k, v in part.items()}
    # re-saving a step: does the folder it replaces verify? (hashed by all ranks, cached from the resume)
    replaced = problem(final, comm) if comm.gather(final.exists())[0] else None
    err = None
    if comm.rank == 0:
        try:
            _finish(tmp, final, {"format_version": FORMAT_VERSION, **manifest, "step": step, "time": time.time(),
                                 "files": dict(sorted(files.items()))}, replaced)
            if prune_kw is not None:
                prune(run_dir, **prune_kw)
        except OSError as e:
            err = f"{final}: finishing the checkpoint failed ({e})"
    comm.agree(err)
    return final


def _finish(tmp: Path, final: Path, manifest: dict, replaced: Optional[str] = None) -> None:
    """Marker, fsync, rename into place. ``replaced``: why the ``final`` this replaces does not verify (None:
    it verifies, or there is none); such a folder is set aside with a note, never deleted."""
    for name, text in ((MANIFEST, json.dumps(manifest, indent=1)), (MARKER, str(manifest["step"]))):
        (tmp / name).write_text(text)
        _fsync(tmp / name)
    for sub in sorted({p.parent for p in tmp.rglob("*") if p.is_file()}, key=lambda p: -len(p.parts)):
        _fsync(sub)
    old = final.parent / f"{final.name}.old-{os.getpid()}"
    if final.exists():  # re-saving a step (a run resumed from an older one): swap the old folder out
        if replaced is None:
            os.rename(final, old)
        else:  # a folder the resume skipped as corrupt is evidence: set aside with a note, never deleted
            from lmforge.checkpoint.aside import set_aside

            set_aside(final, replaced, by=f"a save of the same step ({final.name}), which would have replaced it")
    os.rename(tmp, final)
    _fsync(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def writer_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (a writer on another node cannot be seen)."""
    if not 0 < pid < 2 ** 31:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def leftover(path: Path) -> Optional[tuple[str, str, int]]:
    """``(step_N, "tmp" | "old", pid)`` for a save's leftover folder name, else None."""
    m = _LEFTOVER.match(Path(path).name)
    return (m[1], m[2], int(m[3])) if m else None


def restore_swapped_out(root: Path) -> list[Path]:
    """A crash between ``_finish``'s two renames leaves ``step_N.old-PID`` as the only copy of ``step_N``: put
    it back wherever no ``step_N`` took its place (never delete it). Whether PID still runs is not asked: a
    PID seen from another container or reused by another job proves nothing, and a live writer holds that
    state only between two renames. Called by readers (``newest_valid``) and writers (``prune``)."""
    restored = []
    for p in sorted(root.iterdir()) if root.is_dir() else []:
        name, kind, _ = leftover(p) or ("", "", 0)
        if kind == "old" and p.is_dir() and not (root / name).exists():
            try:
                os.rename(p, root / name)
            except OSError as e:  # e.g. a read-only copy of the run: readers still fall back past it
                print(f"warning: cannot put back {p} as {name}: {e}", file=sys.stderr, flush=True)
                continue
            print(f"note: put back {name} from {p.name} (the only copy: a save was cut between its two renames)",
                  file=sys.stderr, flush=True)
            restored.append(root / name)
    return restored


def prune(run_dir: str | Path, keep_last: int, keep_best: int = 0, best_metric: str = "val_loss",
          best_mode: str = "min") -> list[Path]:
    """Delete complete checkpoints beyond the newest ``keep_last`` (sparing the ``keep_best`` best by
    ``best_metric``) and the ``.tmp-``/``.old-`` leftovers of other processes, after putting back a
    swapped-out folder that is the only copy of its step (``restore_swapped_out``). A ``step_N`` folder
    without ``COMPLETE`` is left alone (it is never read, and may be someone's evidence)."""
    restore_swapped_out(Path(run_dir) / "checkpoints")
    done = complete_folders(run_dir)
    keep = set(done[-keep_last:]) if keep_last > 0 else set()
    scored = []
    for p in done if keep_best > 0 else []:
        try:
            value = read_manifest(p).get("metrics", {}).get(best_metric)
        except CheckpointError:
            continue
        if isinstance(value, (int, float)):
            scored.append((value if best_mode == "min" else -value, step_of(p), p))
    keep.update(p for *_, p in sorted(scored)[:keep_best])
    root = Path(run_dir) / "checkpoints"
    stale = [p for p in root.iterdir() if p.is_dir() and leftover(p) and leftover(p)[2] != os.getpid()] \
        if root.is_dir() else []
    removed = [p for p in done if p not in keep] + stale
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed
