"""What a ``prepare`` output was built from, and why a rerun must redo it.

``inputs_of(cfg)`` records the settings that shape the output (everything except output.dir,
num_workers and keep_staging) and every input file's size and mtime (make-style; a tokenizer given by
path counts as an input). ``explain_change(old, new)`` names the changed config keys (old → new) and
the added / removed / modified files.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional

import numpy as np

from lmforge.data.config import PrepareConfig
from lmforge.data.sources import expand_paths

_RUNTIME_ONLY = {"output": {"dir", "num_workers", "keep_staging"}}
_REPORT_ONLY = ("max_skipped_fraction",)  # top-level keys that change what is reported, not the output


def _stat(path: Path) -> list:
    st = path.stat()
    return [str(path), st.st_size, st.st_mtime_ns]


def inputs_of(cfg: PrepareConfig) -> dict:
    """{"config": settings that shape the output, "files": [[path, size, mtime_ns], ...] of the sources,
    "tokenizer_file": [path, size, mtime_ns] of ``tokenizer.path`` or None}."""
    config = cfg.model_dump(mode="json")
    for section, keys in _RUNTIME_ONLY.items():
        for k in keys:
            config[section].pop(k, None)
    for k in _REPORT_ONLY:
        config.pop(k, None)
    files = []
    for src in cfg.sources:
        for p in expand_paths(src):
            if p.is_dir():  # HF save_to_disk folder
                files += [_stat(f) for f in sorted(p.rglob("*")) if f.is_file()]
            else:
                files.append(_stat(p))
    tok = None
    if cfg.tokenizer.path:
        t = Path(cfg.tokenizer.path)
        tok = _stat(t / "tokenizer.json" if t.is_dir() else t)
    return {"config": config, "files": files, "tokenizer_file": tok}


def digest(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(tree, list) and tree and all(isinstance(x, dict) for x in tree):
        out = {f"{prefix}len": len(tree)}
        for i, v in enumerate(tree):
            out.update(_flatten(v, f"{prefix}{i}."))
        return out
    return {prefix.rstrip("."): tree}


def explain_change(old: Optional[dict], new: dict, limit: int = 5) -> list[str]:
    """Human-readable reasons why ``old`` inputs differ from ``new`` (empty list: identical)."""
    if not old:
        return ["the existing output records no inputs (made by an older lmforge or another tool)"]
    reasons = []
    a, b = _flatten(old.get("config", {})), _flatten(new["config"])
    changed = [f"{k}: {a.get(k, '<unset>')!r} → {b.get(k, '<unset>')!r}" for k in sorted(a.keys() | b.keys())
               if a.get(k) != b.get(k)]
    if changed:
        reasons.append("config changed: " + "; ".join(changed[:limit]) + (" ..." if len(changed) > limit else ""))
    fa = {f[0]: f[1:] for f in [*old.get("files", []), old.get("tokenizer_file")] if f}
    fb = {f[0]: f[1:] for f in [*new["files"], new.get("tokenizer_file")] if f}
    for label, names in (("added", sorted(fb.keys() - fa.keys())), ("removed", sorted(fa.keys() - fb.keys())),
                         ("modified", sorted(k for k in fa.keys() & fb.keys() if fa[k] != fb[k]))):
        if names:
            reasons.append(f"{len(names)} input file(s) {label}: " + ", ".join(names[:limit])
                           + (" ..." if len(names) > limit else ""))
    return reasons


def outputs_intact(out: Path, manifest: dict) -> Optional[str]:
    """None when every shard listed in the manifest exists with the right size, else the problem."""
    itemsize = np.dtype(manifest["dtype"]).itemsize
    if not (out / "tokenizer.json").is_file():
        return "tokenizer.json is missing"
    if (out / "progress.json").exists():
        return "progress.json shows an unfinished pack"
    for split in manifest.get("splits", {}).values():
        for e in split:
            f = out / e["file"]
            if not f.is_file():
                return f"shard {e['file']} is missing"
            if f.stat().st_size != e["tokens"] * itemsize:
                return f"shard {e['file']} has {f.stat().st_size} bytes, expected {e['tokens'] * itemsize}"
    return None
