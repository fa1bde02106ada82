"""``report.{json,md,html}``: the source and the result of one compress command side by side, with ratios,
the kernels that produced the speed numbers and the machine they were measured on."""

from __future__ import annotations

import html
import json
import time
from pathlib import Path
from typing import Optional

ROWS = [  # key, label, better ("lower" | "higher" | None), format
    ("file_bytes", "weights file (MB)", "lower", lambda v: f"{v / 1e6:.2f}"),
    ("params", "parameters (M)", "lower", lambda v: f"{v / 1e6:.3f}"),
    ("nonzero_params", "non-zero parameters (M)", "lower", lambda v: f"{v / 1e6:.3f}"),
    ("decode_tokens_per_s", "batch-1 decode (tokens/s)", "higher", lambda v: f"{v:.1f}"),
    ("throughput_tokens_per_s", "batch-N forward (tokens/s)", "higher", lambda v: f"{v:.0f}"),
    ("batch1_examples_per_s", "batch-1 (examples/s)", "higher", lambda v: f"{v:.1f}"),
    ("throughput_examples_per_s", "batch-N (examples/s)", "higher", lambda v: f"{v:.1f}"),
    ("val_ppl", "validation perplexity", "lower", lambda v: f"{v:.3f}"),
    ("val_accuracy", "validation accuracy", "higher", lambda v: f"{v:.4f}"),
    ("val_macro_f1", "validation macro-F1", "higher", lambda v: f"{v:.4f}"),
]


def machine() -> dict:
    from lmforge.hardware import cpu_facts

    import torch

    cpu = cpu_facts()
    return {"cpu": cpu.get("model"), "flags": sorted(k for k, v in cpu.get("flags", {}).items() if v),
            "torch": torch.__version__, "quantized_engine": torch.backends.quantized.engine,
            "threads": torch.get_num_threads()}


def ratios(src: dict, out: dict) -> dict:
    """result / source for every numeric row both have (speed-ups > 1 are better; size < 1 is smaller)."""
    return {k: out[k] / src[k] for k, *_ in ROWS
            if isinstance(src.get(k), (int, float)) and isinstance(out.get(k), (int, float)) and src[k]}


def build(command: str, source: str, out: str, columns: dict[str, dict], step: dict, notes: list[str]) -> dict:
    names = list(columns)
    first = columns[names[0]]
    return {"command": command, "source": source, "out": out, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            "machine": machine(), "step": step, "columns": columns,
            "ratios": {n: ratios(first, columns[n]) for n in names[1:]}, "notes": notes}


def _cell(key: str, value) -> str:
    fmt = next((f for k, _, _, f in ROWS if k == key), None)
    return "–" if value is None else (fmt(value) if fmt and isinstance(value, (int, float)) else str(value))


def markdown(rep: dict) -> str:
    names = list(rep["columns"])
    lines = [f"# lmforge compress {rep['command']}", "", f"source `{rep['source']}` → `{rep['out']}`", "",
             "| | " + " | ".join(names) + " | " + " | ".join(f"{n} / {names[0]}" for n in names[1:]) + " |",
             "|---|" + "---:|" * (2 * len(names) - 1)]
    for key, label, _, _ in ROWS:
        vals = [rep["columns"][n].get(key) for n in names]
        if all(v is None for v in vals):
            continue
        rs = [rep["ratios"][n].get(key) for n in names[1:]]
        lines.append(f"| {label} | " + " | ".join(_cell(key, v) for v in vals) + " | "
                     + " | ".join("–" if r is None else f"{r:.2f}×" for r in rs) + " |")
    m = rep["machine"]
    lines += ["", f"Measured on {m['cpu']} ({', '.join(m['flags']) or 'no vector flags read'}), torch {m['torch']}, "
              f"{m['threads']} threads, quantized engine {m['quantized_engine']}.", ""]
    step = {k: v for k, v in rep["step"].items() if k not in ("modules", "layers_report")}
    lines += ["Step: `" + json.dumps(step) + "`", ""]
    if rep["step"].get("layers_report"):
        lines += ["| layer | sparsity |", "|---|---:|"]
        lines += [f"| {n} | {s:.3f} |" for n, s in rep["step"]["layers_report"].items()]
        lines.append("")
    lines += [f"- {n}" for n in rep["notes"]]
    return "\n".join(lines) + "\n"


def write(folder: Path, rep: dict) -> None:
    (folder / "report.json").write_text(json.dumps(rep, indent=2) + "\n")
    md = markdown(rep)
    (folder / "report.md").write_text(md)
    body = "\n".join(f"<p>{html.escape(line)}</p>" if not line.startswith("|") else line for line in md.splitlines())
    table = _html_table(rep)
    (folder / "report.html").write_text(
        "<!doctype html><meta charset='utf-8'><title>lmforge compress</title>"
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}td,th{padding:.2em .6em;"
        "border-bottom:1px solid #ddd;text-align:right}td:first-child{text-align:left}</style>"
        f"<h1>lmforge compress {html.escape(rep['command'])}</h1>{table}"
        + "".join(f"<p>{html.escape(line)}</p>" for line in body.splitlines()
                  if not line.startswith("|") and not line.startswith("<p>#")))


def _html_table(rep: dict) -> str:
    names = list(rep["columns"])
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    rows = []
    for key, label, _, _ in ROWS:
        vals = [rep["columns"][n].get(key) for n in names]
        if all(v is None for v in vals):
            continue
        rows.append(f"<tr><td>{html.escape(label)}</td>" + "".join(f"<td>{_cell(key, v)}</td>" for v in vals)
                    + "</tr>")
    return f"<table><tr><th></th>{head}</tr>{''.join(rows)}</table>"


def print_summary(rep: dict, out: Optional[Path] = None) -> None:
    print(markdown(rep).split("\nMeasured on")[0])
    if out is not None:
        print(f"report: {out / 'report.md'}")
