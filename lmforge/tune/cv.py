"""K-fold cross-validation of a fine-tuning trial (``cv: {folds: 5, stratified: true}``).

The folds are cut from ``data.train`` only (``data.validation`` and ``data.test`` are never read by a fold):
rows are shuffled with ``cv.seed`` (stratified: within each label, then dealt round-robin, so every fold keeps
the label proportions) and dealt into ``folds`` parts, written once to ``DIR/folds/fold_i/{train,val}.*``
(the same files for every trial: deterministic). Fold i trains on the other parts and is scored on part i;
the trial's objective is the mean over folds, its standard deviation the ``cv_std`` user attribute. After
each fold the running mean is reported (step = fold index), so a pruner can stop a trial between folds.
"""

from __future__ import annotations

import dataclasses
import json
import random
import statistics
from pathlib import Path

from lmforge.errors import DataError
from lmforge.tune.plan import Plan


def _rows(path: Path, task: str) -> tuple[str, list[str]]:
    """(header, rows): TSV/CSV lines after a header, JSONL lines, or CoNLL sentence blocks."""
    text = path.read_text(encoding="utf-8")
    if task == "token-classification":
        return "", [b.strip("\n") for b in text.split("\n\n") if b.strip()]
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if path.suffix.lower() in (".jsonl", ".json"):
        return "", lines
    return lines[0], lines[1:]


def _labels(path: Path, cfg) -> list:
    from lmforge.data.tasks import read_classification

    return read_classification(path, cfg.data.text_field, cfg.data.label_field).labels


def fold_indices(labels: list, n: int, folds: int, stratified: bool, seed: int) -> list[list[int]]:
    """Deterministic partition of range(n) into ``folds`` parts (stratified by ``labels`` when asked)."""
    rng = random.Random(seed)
    groups: dict = {}
    for i in range(n):
        groups.setdefault(labels[i] if stratified else 0, []).append(i)
    parts: list[list[int]] = [[] for _ in range(folds)]
    k = 0
    for key in sorted(groups, key=str):
        idx = groups[key]
        rng.shuffle(idx)
        for i in idx:
            parts[k % folds].append(i)
            k += 1
    return [sorted(p) for p in parts]


def write_folds(plan: Plan, base_cfg) -> list[tuple[Path, Path]]:
    cv, src = plan.cfg.cv, Path(base_cfg.data.train)
    root = plan.dir / "folds"
    done = root / "folds.json"
    header, rows = _rows(src, base_cfg.task)
    suffix = ".conll" if base_cfg.task == "token-classification" else src.suffix
    out = [(root / f"fold_{i}" / f"train{suffix}", root / f"fold_{i}" / f"val{suffix}") for i in range(cv.folds)]
    if done.is_file():
        return out
    if len(rows) < cv.folds:
        raise DataError(f"{src}: {len(rows)} examples cannot be cut into cv.folds={cv.folds} folds")
    stratified = cv.stratified and base_cfg.task == "classification"
    labels = _labels(src, base_cfg) if stratified else [0] * len(rows)
    if len(labels) != len(rows):
        raise DataError(f"{src}: {len(labels)} labelled rows but {len(rows)} lines; stratified folds need one "
                        "example per line (set cv.stratified: false)")
    parts = fold_indices(labels, len(rows), cv.folds, stratified, cv.seed)
    sep = "\n\n" if base_cfg.task == "token-classification" else "\n"
    for i, (tr, va) in enumerate(out):
        tr.parent.mkdir(parents=True, exist_ok=True)
        held = set(parts[i])
        for path, keep in ((tr, [r for j, r in enumerate(rows) if j not in held]), (va, [rows[j] for j in parts[i]])):
            path.write_text((header + "\n" if header else "") + sep.join(keep) + "\n", encoding="utf-8")
    done.write_text(json.dumps({"folds": cv.folds, "stratified": stratified, "seed": cv.seed, "source": str(src),
                                "sizes": [len(p) for p in parts]}))
    return out


def run_cv(plan: Plan, run_dir: Path, params: dict, trial, distributed: bool, rank0: bool) -> dict:
    from lmforge.tune.runner import run_single
    from lmforge.tune.trial import PruneHook

    base_cfg = plan.job().load(params)
    files = write_folds(plan, base_cfg) if rank0 else None
    from lmforge.tune.trial import _broadcast

    files = _broadcast(files, distributed)
    values, metric = [], plan.metrics[0]
    hook = PruneHook(trial, metric, distributed, rank0)
    for i, (tr, va) in enumerate(files):
        extra = {"data.train": str(tr), "data.validation": str(va), "data.test": None}
        single = dataclasses.replace(plan, metrics=[metric])
        out = run_single(single, run_dir / f"fold_{i}", params, None, distributed, rank0, extra)
        if out["state"] != "complete":
            return {**out, "run_dir": str(run_dir)}
        values.append(out["values"][0])
        hook.evaluated(i, {metric: statistics.fmean(values)})
        if hook.reason == "pruned" and i < len(files) - 1:
            return {"state": "pruned", "values": [], "run_dir": str(run_dir), "reason": f"pruner after fold {i}",
                    "user_attrs": {"cv_values": values}}
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"state": "complete", "values": [statistics.fmean(values)], "run_dir": str(run_dir),
            "user_attrs": {"cv_values": values, "cv_std": std}}
