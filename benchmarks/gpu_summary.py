"""The one summary table of ``gpu_suite.sh``: reads what its stages wrote (env.json, pytest_cuda.xml,
gpu_mfu.json, gpu_memory.json, stages.tsv) from one folder and prints every check against its target.

    python benchmarks/gpu_summary.py DIR [--dry-run]
"""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_common import table  # noqa: E402

COLS = [("check", "check", ""), ("result", "result", ""), ("target", "target", ""), ("status", "status", "")]


def _load(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def pytest_rows(path: Path, dry: bool) -> list[dict]:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return [{"check": "pytest -m cuda", "result": "no report (timed out or crashed?)", "status": "FAIL"}]
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    if dry:
        status = "skipped here" if n["skipped"] == n["tests"] and not (n["failures"] or n["errors"]) else "FAIL"
    else:
        status = "ok" if passed == n["tests"] and n["tests"] else "FAIL"
    rows = [{"check": "pytest -m cuda", "result": f"{passed} passed, {n['failures']} failed, {n['errors']} errors, "
             f"{n['skipped']} skipped of {n['tests']}", "target": "all pass, none skipped", "status": status}]
    for case in suite.iter("testcase"):
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:
            rows.append({"check": f"  {case.get('name')}", "result": (bad.get("message") or "")[:90],
                         "status": "FAIL"})
    return rows


def mfu_rows(data: dict | None) -> list[dict]:
    if data is None:
        return [{"check": "gpu_mfu", "result": "no gpu_mfu.json", "status": "FAIL"}]
    rows, dry = [], data.get("dry_run")
    peak = data["peaks"]
    for r in data["results"]:
        if r.get("tokens_per_s") is None:
            rows.append({"check": f"MFU {r['name']}", "result": r.get("note", "failed"), "status": "FAIL"})
            continue
        lm = r["lib"] == "lmforge"
        rows.append({"check": f"MFU {r['name']} (micro {r['micro']})",
                     "result": f"{r['mfu_pct']:.1f}% · {r['tokens_per_s']:,.0f} tok/s · "
                               + (f"{r['peak_gib']:.1f} GiB" if r.get("peak_gib") is not None else "n/a GiB"),
                     "target": ">= 50%" if lm else "reference",
                     "status": "dry run" if dry or not lm else ("ok" if r["mfu_pct"] >= 50 else "below")})
    for hf in (r for r in data["results"] if r.get("lib") == "hf" and r.get("tokens_per_s")):
        same = [r for r in data["results"] if r.get("lib") == "lmforge" and r.get("tokens_per_s")
                and r.get("ac") == "none" and r.get("compile") == hf["compile"] and r.get("micro") == hf["micro"]]
        if same:
            x = same[0]["tokens_per_s"] / hf["tokens_per_s"]
            rows.append({"check": f"lmforge / {hf['name']} (micro {hf['micro']})", "result": f"{x:.2f}x",
                         "target": ">= 1.2x", "status": "dry run" if dry else ("ok" if x >= 1.2 else "below")})
    rows += [{"check": "MFU variant skipped", "result": s, "status": "skipped"} for s in data.get("skipped", [])]
    rows.append({"check": "MFU peak used", "result": f"{peak['mfu_peak'] / 1e12:.0f} TFLOP/s "
                 f"({peak['mfu_peak_source']}, {data['facts'].get('name')})", "status": "-"})
    return rows


def memory_rows(data: dict | None) -> list[dict]:
    if data is None:
        return [{"check": "estimator", "result": "no gpu_memory.json", "status": "FAIL"}]
    rows = []
    for r in data["rows"]:
        result = (f"est {r['estimate_gib']:.2f} / measured {r['measured_gib']:.2f} GiB = {r['ratio']:.3f}"
                  if r.get("ratio") else r.get("status"))
        rows.append({"check": f"estimator micro {r['micro']} AC {r['ac']}", "result": result, "target": "±15%",
                     "status": r["status"]})
    ok = sum(r["status"] == "ok" for r in data["rows"])
    rows.append({"check": "estimator configs within ±15%", "result": str(ok), "target": ">= 3",
                 "status": "ok" if ok >= 3 else ("n/a" if data.get("dry_run") else "FAIL")})
    return rows


def stage_rows(path: Path) -> list[dict]:
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            name, rc, secs, cap = line.split("\t")
            status = "ok" if rc == "0" else ("TIMEOUT" if rc in ("124", "137") else f"rc {rc}")
            rows.append({"check": f"stage {name}", "result": f"{float(secs):.0f}s (cap {cap}s)", "status": status})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("dir", type=Path)
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args(argv)
    d = args.dir
    env = _load(d / "env.json") or {}
    dev = (env.get("devices", {}).get("cuda", {}).get("devices") or [{}])[0]
    head = (f"device {dev.get('name', 'none (CPU)')} · torch {env.get('torch', {}).get('version')} · CUDA "
            f"{env.get('torch', {}).get('cuda')} · cuDNN {env.get('torch', {}).get('cudnn')} · NCCL "
            f"{env.get('torch', {}).get('nccl')}")
    rows = (stage_rows(d / "stages.tsv") + pytest_rows(d / "pytest_cuda.xml", args.dry_run)
            + mfu_rows(_load(d / "gpu_mfu.json")) + memory_rows(_load(d / "gpu_memory.json")))
    text = ("DRY RUN (CPU): plumbing only, nothing below is a GPU measurement\n" if args.dry_run else "") + \
        head + "\n" + table(rows, COLS)
    print(text)
    (d / "summary.txt").write_text(text + "\n", encoding="utf-8")
    return 1 if any(r.get("status") in ("FAIL", "TIMEOUT") or str(r.get("status", "")).startswith("rc ")
                    for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
