"""Evaluation reports for fine-tuned models: classification and entity-level NER scores, and writers.

A report is a plain dict (JSON-serialisable)::

    {"task": "classification" | "token-classification", "n": examples, "accuracy": float | None,
     "per_class": {name: {"precision", "recall", "f1", "support"}},
     "averages": {"micro": {...}, "macro": {...}, "weighted": {...}},
     "confusion": [[int]] (classification only; rows = true, cols = predicted), "labels": [names]}

Numbers follow scikit-learn's ``classification_report`` (zero_division=0) and, for entities, seqeval.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

# ----------------------------------------------------------------------------- classification


def _prf(tp: np.ndarray, pred: np.ndarray, true: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(pred > 0, tp / np.maximum(pred, 1), 0.0)
        r = np.where(true > 0, tp / np.maximum(true, 1), 0.0)
        f = np.where(p + r > 0, 2 * p * r / np.where(p + r > 0, p + r, 1), 0.0)
    return p, r, f


def _scores(tp: np.ndarray, pred: np.ndarray, true: np.ndarray, names: list[str]) -> tuple[dict, dict]:
    p, r, f = _prf(tp, pred, true)
    per = {n: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(true[i])}
           for i, n in enumerate(names)}
    total = int(true.sum())
    mp, mr, mf = _prf(np.array([tp.sum()]), np.array([pred.sum()]), np.array([true.sum()]))
    w = true / total if total else np.zeros_like(true, dtype=float)
    avgs = {
        "micro": {"precision": float(mp[0]), "recall": float(mr[0]), "f1": float(mf[0]), "support": total},
        "macro": {"precision": float(p.mean()), "recall": float(r.mean()), "f1": float(f.mean()), "support": total},
        "weighted": {"precision": float((p * w).sum()), "recall": float((r * w).sum()), "f1": float((f * w).sum()),
                     "support": total},
    }
    return per, avgs


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], n_classes: int) -> np.ndarray:
    """[n_classes, n_classes] counts; rows are true labels, columns predictions."""
    yt, yp = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    if yt.shape != yp.shape:
        raise ValueError(f"y_true has {yt.size} items but y_pred has {yp.size}")
    for arr, what in ((yt, "y_true"), (yp, "y_pred")):
        if arr.size and (arr.min() < 0 or arr.max() >= n_classes):
            raise ValueError(f"{what} holds label {int(arr.min() if arr.min() < 0 else arr.max())} outside "
                             f"0..{n_classes - 1}")
    return np.bincount(yt * n_classes + yp, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def classification_report(y_true: Sequence[int], y_pred: Sequence[int],
                          label_names: Optional[Sequence[str]] = None) -> dict:
    """Per-class precision/recall/F1/support, micro/macro/weighted averages, accuracy, confusion matrix."""
    if label_names is None:
        k = int(max(max(y_true, default=0), max(y_pred, default=0))) + 1
        label_names = [str(i) for i in range(k)]
    names = [str(n) for n in label_names]
    cm = confusion_matrix(y_true, y_pred, len(names))
    tp = np.diag(cm).astype(float)
    per, avgs = _scores(tp, cm.sum(0).astype(float), cm.sum(1).astype(float), names)
    n = int(cm.sum())
    return {"task": "classification", "n": n, "accuracy": float(tp.sum() / n) if n else 0.0, "per_class": per,
            "averages": avgs, "confusion": cm.tolist(), "labels": names}


# ----------------------------------------------------------------------------- entities (NER)


def _split_tag(tag: str) -> tuple[str, Optional[str]]:
    if tag == "O":
        return "O", None
    prefix, sep, typ = tag.partition("-")
    if prefix not in ("B", "I") or not sep or not typ:
        raise ValueError(f"tag {tag!r} is not O, B-TYPE or I-TYPE")
    return prefix, typ


def extract_entities(tags: Sequence[str], scheme: str = "iob2", strict: bool = False) -> list[tuple[str, int, int]]:
    """Chunks as ``(type, start, end_exclusive)``.

    Default (``strict=False``): conlleval / seqeval-default chunking, the same for IOB1 and IOB2: a chunk
    starts at ``B-X`` or at ``I-X`` not continuing an ``X`` token, and ends at ``O``, a type change or a ``B-``.
    ``strict=True`` enforces the scheme: IOB2 chunks must open with ``B-X`` (a stray ``I-X`` is no entity, as
    in seqeval ``mode='strict'``); IOB1 chunks open with ``I-X`` and ``B-X`` is legal only right after an
    ``X`` token (elsewhere it is a violation and opens nothing).
    """
    if scheme not in ("iob1", "iob2"):
        raise ValueError(f"scheme must be 'iob1' or 'iob2', got {scheme!r}")
    out: list[tuple[str, int, int]] = []
    cur_type: Optional[str] = None  # type of the open chunk
    start = 0
    prev_type: Optional[str] = None  # type of the previous token (None for O)
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, typ = _split_tag(tag)
        continues = prefix == "I" and typ == prev_type
        if cur_type is not None and not (continues and typ == cur_type):
            out.append((cur_type, start, i))
            cur_type = None
        if prefix != "O" and not (continues and cur_type == typ):
            opens = True
            if strict and scheme == "iob2":
                opens = prefix == "B"
            elif strict and scheme == "iob1":
                opens = prefix == "I" or typ == prev_type
            if opens:
                cur_type, start = typ, i
        prev_type = typ
    return out


def entity_report(true_seqs: Iterable[Sequence[str]], pred_seqs: Iterable[Sequence[str]], scheme: str = "iob2",
                  strict: bool = False) -> dict:
    """Entity-level scores: a predicted chunk counts only if type, start and end all match a true chunk."""
    true_seqs, pred_seqs = list(true_seqs), list(pred_seqs)
    if len(true_seqs) != len(pred_seqs):
        raise ValueError(f"{len(true_seqs)} true sequences but {len(pred_seqs)} predicted")
    true_ents, pred_ents = set(), set()
    tok_ok = tok_n = 0
    for s, (t, p) in enumerate(zip(true_seqs, pred_seqs)):
        if len(t) != len(p):
            raise ValueError(f"sequence {s}: {len(t)} true tags but {len(p)} predicted")
        true_ents |= {(s, *e) for e in extract_entities(t, scheme, strict)}
        pred_ents |= {(s, *e) for e in extract_entities(p, scheme, strict)}
        tok_ok += sum(a == b for a, b in zip(t, p))
        tok_n += len(t)
    types = sorted({e[1] for e in true_ents | pred_ents})
    hit = true_ents & pred_ents
    tp = np.array([sum(e[1] == ty for e in hit) for ty in types], dtype=float)
    pred = np.array([sum(e[1] == ty for e in pred_ents) for ty in types], dtype=float)
    true = np.array([sum(e[1] == ty for e in true_ents) for ty in types], dtype=float)
    per, avgs = _scores(tp, pred, true, types)
    return {"task": "token-classification", "n": len(true_seqs), "accuracy": tok_ok / tok_n if tok_n else 0.0,
            "per_class": per, "averages": avgs, "labels": types, "scheme": scheme, "strict": strict}


def headline(report: dict) -> dict:
    """The few numbers worth a log line: accuracy, macro F1, micro F1."""
    a = report["averages"]
    return {"accuracy": report["accuracy"], "macro_f1": a["macro"]["f1"], "micro_f1": a["micro"]["f1"]}


# ----------------------------------------------------------------------------- writers


def _rows(report: dict) -> list[tuple[str, dict]]:
    return list(report["per_class"].items()) + [(f"{k} avg", v) for k, v in report["averages"].items()]


def _scalars(report: dict) -> list[tuple[str, str]]:
    """Reports without per-label scores (sft): their scalar metrics."""
    return [(k, f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in report.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)]


def to_markdown(report: dict, title: str = "Evaluation") -> str:
    if "per_class" not in report:
        return "\n".join([f"## {title}", "", "| metric | value |", "|---|---:|"]
                         + [f"| {k} | {v} |" for k, v in _scalars(report)]) + "\n"
    acc_name = "token accuracy" if report["task"] == "token-classification" else "accuracy"
    lines = [f"## {title}", "", f"{report['n']} examples; {acc_name} {report['accuracy']:.4f}", "",
             "| label | precision | recall | f1 | support |", "|---|---:|---:|---:|---:|"]
    for name, m in _rows(report):
        lines.append(f"| {name} | {m['precision']:.4f} | {m['recall']:.4f} | {m['f1']:.4f} | {m['support']} |")
    if report.get("confusion"):
        labels = report["labels"]
        lines += ["", "Confusion matrix (rows: true, columns: predicted)", "",
                  "| true \\ pred | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
        lines += [f"| {labels[i]} | " + " | ".join(str(c) for c in row) + " |"
                  for i, row in enumerate(report["confusion"])]
    return "\n".join(lines) + "\n"


def to_html(report: dict, title: str = "Evaluation") -> str:
    """An HTML fragment (a heading and a table), no page boilerplate."""
    e = html.escape
    if "per_class" not in report:
        rows = "".join(f"<tr><td>{e(k)}</td><td>{v}</td></tr>" for k, v in _scalars(report))
        return f"<section class=\"lmforge-report\"><h3>{e(title)}</h3><table><tbody>{rows}</tbody></table></section>\n"
    cells = "".join(f"<tr><td>{e(n)}</td><td>{m['precision']:.4f}</td><td>{m['recall']:.4f}</td>"
                    f"<td>{m['f1']:.4f}</td><td>{m['support']}</td></tr>" for n, m in _rows(report))
    return (f"<section class=\"lmforge-report\"><h3>{e(title)}</h3><p>{report['n']} examples; accuracy "
            f"{report['accuracy']:.4f}</p><table><thead><tr><th>label</th><th>precision</th><th>recall</th>"
            f"<th>f1</th><th>support</th></tr></thead><tbody>{cells}</tbody></table></section>\n")


def print_report(report: dict, title: str = "Evaluation", console=None) -> None:
    """Rich table on the terminal."""
    from rich.console import Console
    from rich.table import Table

    if "per_class" not in report:
        t = Table(title=title)
        t.add_column("metric")
        t.add_column("value", justify="right")
        for k, v in _scalars(report):
            t.add_row(k, v)
        (console or Console()).print(t)
        return
    t = Table(title=f"{title} ({report['n']} examples, accuracy {report['accuracy']:.4f})")
    for col in ("label", "precision", "recall", "f1", "support"):
        t.add_column(col, justify="left" if col == "label" else "right")
    for name, m in _rows(report):
        t.add_row(name, f"{m['precision']:.4f}", f"{m['recall']:.4f}", f"{m['f1']:.4f}", str(m["support"]))
    (console or Console()).print(t)


def plot_confusion(report: dict, path: str | Path, title: str = "Confusion matrix") -> Path:
    """Confusion-matrix PNG (counts, row-normalised colour)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(report["confusion"], dtype=float)
    labels = report["labels"]
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    size = max(3.0, 0.6 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", color="white" if norm[i, j] > 0.5 else "black")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(report: dict, out_dir: str | Path, name: str = "eval", title: Optional[str] = None) -> dict[str, Path]:
    """``{name}.json``, ``{name}.md``, ``{name}.html`` and (classification) ``{name}_confusion.png``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    title = title or name
    paths = {"json": out / f"{name}.json", "markdown": out / f"{name}.md", "html": out / f"{name}.html"}
    paths["json"].write_text(json.dumps(report, indent=2))
    paths["markdown"].write_text(to_markdown(report, title))
    paths["html"].write_text(to_html(report, title))
    if report.get("confusion"):
        paths["confusion"] = plot_confusion(report, out / f"{name}_confusion.png", title)
    return paths
