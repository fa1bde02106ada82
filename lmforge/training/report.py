"""End-of-run outputs: ``summary.json``, a self-contained ``report.html`` (plots as base64 PNGs + the resolved
config) and, when enabled and installed, an offline Weights & Biases run built from ``metrics.jsonl``."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import yaml

from lmforge.config import Config, config_to_dict
from lmforge.training.metrics import read_metrics

PLOTS = [("loss", "loss (train / val)", ["loss", "val_loss"]), ("lr", "learning rate", ["lr"]),
         ("grad_norm", "grad norm", ["grad_norm"]), ("tokens_per_s", "tokens / s", ["tokens_per_s"]),
         ("mfu", "MFU", ["mfu"]), ("mem_gb", "peak memory (GiB)", ["mem_gb"]), ("loss_scale", "loss scale",
                                                                            ["loss_scale"])]


def _plot(records: list[dict], title: str, keys: list[str]) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {k: [(r["step"], r[k]) for r in records if r.get(k) is not None] for k in keys}
    if not any(series.values()):
        return None
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=90)
    for k, pts in series.items():
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, markersize=3, label=k)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if len([s for s in series.values() if s]) > 1:
        ax.legend()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def write_report(cfg: Config, run_dir: Path, summary: dict) -> Path:
    records = read_metrics(run_dir)
    imgs = [(t, _plot(records, t, keys)) for _, t, keys in PLOTS]
    rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>"
                   for k, v in summary.items())
    figs = "".join(f'<figure><img src="data:image/png;base64,{b64}" alt="{html.escape(t)}"></figure>'
                   for t, b64 in imgs if b64)
    cfg_text = html.escape(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>lmforge run {html.escape(str(run_dir))}"
            "</title><style>body{font-family:sans-serif;margin:2em}figure{display:inline-block;margin:.5em}"
            "td{padding:2px 10px;border-bottom:1px solid #ddd}pre{background:#f6f6f6;padding:1em}</style></head>"
            f"<body><h1>Run {html.escape(str(run_dir))}</h1><h2>Summary</h2><table>{rows}</table>"
            f"<h2>Curves</h2>{figs or '<p>no metrics logged</p>'}<h2>Resolved config</h2><pre>{cfg_text}</pre>"
            "</body></html>")
    out = run_dir / "report.html"
    out.write_text(page, encoding="utf-8")
    return out


def _wandb(cfg: Config, run_dir: Path, summary: dict) -> None:
    try:
        import wandb
    except ImportError:
        print("note: logging.wandb=true but wandb is not installed; skipped")
        return
    run = wandb.init(project=cfg.logging.wandb_project, dir=str(run_dir), mode="offline",
                     config=config_to_dict(cfg), name=run_dir.name)
    for rec in read_metrics(run_dir):
        run.log({k: v for k, v in rec.items() if k not in ("step", "time") and v is not None}, step=rec["step"])
    run.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
    run.finish()


def finish_run(cfg: Config, run_dir: Path, summary: dict) -> None:
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if cfg.logging.report:
        summary["report"] = str(write_report(cfg, run_dir, summary))
    if cfg.logging.wandb:
        _wandb(cfg, run_dir, summary)
