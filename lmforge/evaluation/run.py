"""``lmforge evaluate RUN`` for a pretraining run: perplexity / bits-per-byte (sliding window) on text files
or on packed data, and local lm-evaluation-harness tasks. Results: ``RUN/reports/{name}.json`` (values with
their standard errors) and ``{name}.html`` in the fine-tuning reports' style. ``lmforge train`` calls
``evaluate_lm`` at the end of a run when ``eval.enabled`` is set.
"""

from __future__ import annotations

import html
import json
import math
import time
from pathlib import Path
from typing import Optional

from lmforge.errors import ConfigError


def evaluate_model(model, tok, cfg, *, texts: Optional[list[str]] = None, packed: Optional[str] = None,
                   split: str = "val", window: Optional[int] = None, stride: Optional[int] = None,
                   harness_tasks: Optional[list[str]] = None, limit: Optional[int] = None, batch_size: int = 8,
                   max_tokens: Optional[int] = None) -> dict:
    from lmforge.evaluation.lm import packed_texts, read_texts, score_documents

    ctx = cfg.model.max_seq_len
    window = window or ctx
    if window > ctx:
        raise ConfigError(f"--window {window} exceeds the model's context model.max_seq_len={ctx}")
    stride = stride or max(1, window // 2)
    if harness_tasks:
        from lmforge.evaluation.harness import task_names

        task_names(harness_tasks)  # a task file that does not parse fails before anything runs
    rep: dict = {"window": window, "stride": stride}
    t0 = time.time()
    if texts:
        rep["text"] = {**score_documents(model, tok, read_texts(texts), window, stride, batch_size=batch_size),
                       "files": list(texts)}
    if packed:
        docs = packed_texts(packed, tok, split, max_tokens)
        rep["packed"] = {**score_documents(model, tok, docs, window, stride, batch_size=batch_size),
                         "path": packed, "split": split}
    if harness_tasks:
        from lmforge.evaluation.harness import run_harness

        rep["harness"] = run_harness(model, tok, ctx, harness_tasks, limit, batch_size)
    rep["seconds"] = time.time() - t0
    return rep


def flat(rep: dict, prefix: str = "eval_") -> dict:
    """Scalars for summaries and tuning objectives: eval_loss, eval_perplexity, eval_bits_per_byte (text
    files first, else packed data) and eval_<task>_<metric>."""
    out = {}
    src = rep.get("text") or rep.get("packed")
    if src:
        out.update({f"{prefix}{k}": src[k] for k in ("loss", "perplexity", "bits_per_byte")})
    for task, metrics in (rep.get("harness") or {}).get("tasks", {}).items():
        for k, v in metrics.items():
            if not k.endswith("stderr") and k != "sample_len":
                out[f"{prefix}{task}_{k}"] = v
    return out


def write_lm_report(rep: dict, out_dir: Path, name: str, title: str) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{name}.json", "html": out_dir / f"{name}.html"}
    paths["json"].write_text(json.dumps(rep, indent=2, default=str))
    paths["html"].write_text(to_html(rep, title))
    return paths


def _num(v) -> str:
    return f"{v:.5g}" if isinstance(v, float) and math.isfinite(v) else html.escape(str(v))


def to_html(rep: dict, title: str) -> str:
    e, parts = html.escape, []
    for key in ("text", "packed"):
        if key in rep:
            r = rep[key]
            rows = "".join(f"<tr><td>{k}</td><td>{_num(r[k])}</td><td>{_num(r.get(k + '_stderr', ''))}</td></tr>"
                           for k in ("perplexity", "bits_per_byte", "loss"))
            parts.append(f"<p>{key}: {r['documents']} documents, {r['tokens']} tokens, {r['bytes']} bytes; window "
                         f"{r['window']}, stride {r['stride']}</p><table><thead><tr><th>metric</th><th>value</th>"
                         f"<th>stderr</th></tr></thead><tbody>{rows}</tbody></table>")
    for task, m in (rep.get("harness") or {}).get("tasks", {}).items():
        rows = "".join(f"<tr><td>{e(k)}</td><td>{_num(v)}</td><td>{_num(m.get(k + '_stderr', ''))}</td></tr>"
                       for k, v in m.items() if not k.endswith("_stderr") and k != "alias")
        parts.append(f"<h4>{e(task)}</h4><table><thead><tr><th>metric</th><th>value</th><th>stderr</th></tr>"
                     f"</thead><tbody>{rows}</tbody></table>")
    return f"<section class=\"lmforge-report\"><h3>{e(title)}</h3>{''.join(parts)}</section>\n"


def evaluate_lm_run(run_dir: str, checkpoint: Optional[str] = None, name: str = "lm_eval", show: bool = True,
                    runtime: str = "torch", **kw) -> dict:
    """Score a pretraining run folder (its newest checkpoint that verifies, or ``checkpoint``). ``runtime=
    "onnxruntime"``: the run's exported graph (``lmforge compress export``) on ONNX Runtime instead of eager torch."""
    from lmforge.inference import load_run

    if not any(kw.get(k) for k in ("texts", "packed", "harness_tasks")):
        raise ConfigError("evaluate: give --text FILE, --packed DIR (or --packed run: the run's data.path) or "
                          "--harness-tasks TASK.yaml")
    model, tok, cfg, ckpt = load_run(run_dir, checkpoint, runtime=runtime)
    if kw.get("packed") == "run":
        if not cfg.data.path:
            raise ConfigError(f"--packed run: {run_dir} has no data.path")
        kw["packed"] = cfg.data.path
    rep = {"run": str(run_dir), "checkpoint": str(ckpt), "runtime": runtime, **evaluate_model(model, tok, cfg, **kw)}
    write_lm_report(rep, Path(run_dir) / "reports", name, f"{name}: {Path(run_dir).name}")
    if show:
        for k, v in flat(rep).items():
            print(f"{k}: {v:.6g}" if isinstance(v, float) else f"{k}: {v}")
    return rep


def evaluate_at_end(cfg, model, run_dir: Path) -> dict:
    """``eval.enabled``: score the final weights as configured; → flat eval_* metrics."""
    from lmforge.inference import find_tokenizer

    ec = cfg.eval
    was = model.training
    model.eval()
    try:
        rep = evaluate_model(model, find_tokenizer(run_dir, cfg.data.path), cfg, texts=ec.text or None,
                             packed=cfg.data.path if ec.packed else None, window=ec.window, stride=ec.stride,
                             harness_tasks=ec.harness_tasks or None, limit=ec.limit, max_tokens=ec.max_tokens)
    finally:
        model.train(was)
    write_lm_report(rep, run_dir / "reports", "lm_eval", f"end of run: {run_dir.name}")
    return flat(rep)
