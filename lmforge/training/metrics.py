"""Run metrics: ``metrics.jsonl`` (one JSON object per record), TensorBoard events, a progress display, and
the peak-FLOP/s figure MFU is measured against. Only the main process writes (``is_main``).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Optional

import torch

# dense bf16/fp16 tensor-core peak (FLOP/s) by substring of torch.cuda.get_device_name()
GPU_PEAK_BF16 = {"H200": 989e12, "H100 SXM": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 756e12,
                 "A100": 312e12, "A10G": 125e12, "L40S": 362e12, "L4": 121e12, "A6000": 155e12, "4090": 165e12,
                 "V100": 125e12, "T4": 65e12, "B200": 2250e12, "GH200": 989e12}


def _cache_file() -> Path:
    root = os.environ.get("LMFORGE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lmforge")
    return Path(root) / "peak_flops.json"


def _probe(device: torch.device, dtype: torch.dtype, seconds: float = 0.3) -> float:
    n = 1024 if device.type == "cpu" else 8192
    g = torch.Generator(device=device).manual_seed(0)  # never touch the global RNG (bitwise resume)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    for _ in range(2):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    iters, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        iters += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
    return 2.0 * n ** 3 * iters / (time.perf_counter() - t0)


def peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """Known GPU table, else a short matmul probe cached per (device, dtype, threads) on this machine.
    ``LMFORGE_PEAK_FLOPS`` overrides both."""
    if os.environ.get("LMFORGE_PEAK_FLOPS"):
        return float(os.environ["LMFORGE_PEAK_FLOPS"])
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, val in GPU_PEAK_BF16.items():
            if key in name:
                return val if dtype != torch.float32 else val / 2  # TF32 is half the bf16 rate
        ident = name
    else:
        import platform

        ident = f"{platform.processor() or platform.machine()}-threads{torch.get_num_threads()}"
    key = f"{device.type}:{ident}:{str(dtype).removeprefix('torch.')}"
    path = _cache_file()
    try:
        cache = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        cache = {}
    if key not in cache:
        cache[key] = _probe(device, dtype)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp-{os.getpid()}")
            tmp.write_text(json.dumps(cache, indent=1))
            os.replace(tmp, path)
        except OSError:
            pass
    return float(cache[key])


class MetricsLogger:
    """Append-only JSONL + TensorBoard + progress. ``log(record)`` takes a flat dict with a ``step`` key."""

    def __init__(self, run_dir: str | Path, max_steps: int, *, is_main: bool = True, tensorboard: bool = True,
                 progress: bool = True, resume_step: int = 0, stream=None):
        self.is_main, self.max_steps = is_main, max_steps
        self.path = Path(run_dir) / "metrics.jsonl"
        self.stream = stream or sys.stdout
        self._tb = None
        self._bar = None
        if not is_main:
            return
        self._truncate_after(resume_step)
        self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=resume_step or None)
            except ImportError:
                print("note: tensorboard is not installed; logging.tensorboard ignored", file=self.stream)
        if progress and getattr(self.stream, "isatty", lambda: False)():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeRemainingColumn())
            self._bar.start()
            self._task = self._bar.add_task("train", total=max_steps, completed=resume_step, info="")

    def _truncate_after(self, step: int) -> None:
        """On resume, drop records a killed run wrote after the checkpoint it resumes from."""
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
            if rec.get("step", 0) <= step:
                keep.append(line)
        self.path.write_text("".join(k + "\n" for k in keep), encoding="utf-8")

    def log(self, record: dict, echo: bool = True) -> None:
        if not self.is_main:
            return
        rec = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        rec.setdefault("time", time.time())
        self._file.write(json.dumps(rec) + "\n")
        self._file.flush()
        step = record["step"]
        if self._tb is not None:
            for k, v in record.items():
                if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(_tb_name(k), v, step)
        if echo:
            self._echo(record)

    def _echo(self, r: dict) -> None:
        parts = [f"{k} {_fmt(r[k])}" for k in ("loss", "val_loss", "val_ppl", "lr", "grad_norm", "tokens_per_s",
                                               "mfu", "loss_scale") if r.get(k) is not None]
        if r.get("skipped"):
            parts.append(f"skipped {r['skipped']}")
        line = "  ".join(parts)
        if self._bar is not None:
            self._bar.update(self._task, completed=r["step"], info=line)
        else:
            print(f"step {r['step']:>6}/{self.max_steps}  {line}", file=self.stream, flush=True)

    def message(self, text: str) -> None:
        if not self.is_main:
            return
        if self._bar is not None:
            self._bar.console.print(text)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if not self.is_main:
            return
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        self._file.close()


def _tb_name(key: str) -> str:
    if key.startswith("val_"):
        return f"val/{key[4:]}"
    return f"train/{key}"


def _fmt(v) -> str:
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.3e}"
        return f"{v:.4f}" if abs(v) < 10 else f"{v:,.0f}"
    return str(v)


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
