"""Shared by the GPU benchmarks (``gpu_mfu.py``, ``gpu_memory.py``): the device's facts and MFU peak, where
results go, the plain-text table, the time budget, and the dry-run stand-ins (a CPU, a tiny shape, an eager
compile backend) that let each script run end to end on a machine without a GPU."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import subprocess
import sys
import time
from functools import partialmethod
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

# The benchmark shape: the llama-1b preset (d 2048, 16 layers, 32 heads / 8 kv heads, FFN 5632, tied) with the
# Llama-2 / TinyLlama vocabulary size, seq 2048. The dry run: the tiny preset at seq 64.
REAL = {"preset": "llama-1b", "vocab": 32000, "seq_len": 2048, "model": {}}
DRY = {"preset": "tiny", "vocab": 512, "seq_len": 64, "model": {"d_model": 64, "n_layers": 2, "n_heads": 4,
                                                                 "n_kv_heads": 2, "ffn_hidden": 128}}
DRY_MEMORY_BYTES = 256 * 2**20  # the pretend device memory the dry run sizes its micro-batch for


def output_dir() -> Path:
    """``$OUT`` (the device machine's result folder) when set, else ``runs/gpu`` (git-ignored)."""
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else REPO / "runs" / "gpu"
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_json(name: str, data: dict) -> Path:
    path = output_dir() / name
    path.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    return path


def device_and_memory(dry_run: bool) -> tuple[torch.device, int]:
    if dry_run:
        return torch.device("cpu"), DRY_MEMORY_BYTES
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry-run to exercise the script on a CPU")
    dev = torch.device("cuda", 0)
    return dev, torch.cuda.get_device_properties(dev).total_memory


def peaks(device: torch.device) -> dict:
    """The MFU denominator (``hardware.peak_info`` for bf16: a known GPU's dense datasheet figure) and the
    measured bf16 matmul peak of this device (``hardware.probe``), both in FLOP/s."""
    from lmforge.hardware import peak_info, probe

    peak, source = peak_info(device, torch.bfloat16)
    measured = probe(device).peak("bf16")
    return {"mfu_peak": peak, "mfu_peak_source": source, "measured_bf16_matmul": measured}


def facts(device: torch.device) -> dict:
    """Device, driver, torch / CUDA versions, commit and date, for the record of every number."""
    out = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
           "cuda": torch.version.cuda, "device": str(device), "commit": _git("rev-parse", "--short", "HEAD")}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        out.update(name=p.name, memory_gib=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}",
                   driver=_nvidia_smi("driver_version"), cudnn=torch.backends.cudnn.version())
    else:
        out.update(name="cpu (dry run)")
    return out


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _nvidia_smi(field: str) -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20).stdout.strip()
        return out.splitlines()[0] if out else None
    except (OSError, subprocess.SubprocessError):
        return None


def start(script: str, budget_s: float, dry_run: bool) -> tuple["Budget", dict, torch.device, int, dict]:
    """(budget, shape spec, device, device memory bytes, facts) of a benchmark run; prints its header line."""
    budget = Budget(budget_s)
    spec = DRY if dry_run else REAL
    device, memory = device_and_memory(dry_run)
    info = facts(device)
    print(f"{script}: {info['name']} · torch {info['torch']} · CUDA {info['cuda']} · commit {info['commit']} · "
          f"{spec['preset']} vocab {spec['vocab']} seq {spec['seq_len']} bf16 · budget {budget_s:.0f}s")
    return budget, spec, device, memory, info


class Budget:
    """Wall-clock budget of a script: ``left()`` seconds, ``allows(cost)`` before starting a part."""

    def __init__(self, seconds: float):
        self.t0, self.seconds = time.monotonic(), seconds

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def allows(self, cost_s: float) -> bool:
        return self.left() >= cost_s


def table(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    """Plain-text table: ``cols`` = (key, header, format spec); missing / None values print as "-"."""
    def cell(row, key, spec):
        v = row.get(key)
        return "-" if v is None else format(v, spec) if spec else str(v)

    body = [[cell(r, k, s) for k, _, s in cols] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, (_, h, _) in enumerate(cols)]
    lines = ["  ".join(h.ljust(w) for (_, h, _), w in zip(cols, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths)) for b in body]
    return "\n".join(lines)


@contextlib.contextmanager
def eager_compile_backend(enabled: bool):
    """Dry run only: ``nn.Module.compile`` traces with Dynamo but runs the eager backend (Inductor's code
    generation takes minutes on a small CPU); the real run compiles with Inductor."""
    if not enabled:
        yield
        return
    original = torch.nn.Module.compile
    torch.nn.Module.compile = partialmethod(original, backend="eager")
    try:
        yield
    finally:
        torch.nn.Module.compile = original
