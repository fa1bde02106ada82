"""Run metrics: ``metrics.jsonl`` (one JSON object per record), TensorBoard events, a progress display, and
the peak-FLOP/s figure MFU is measured against. Only the main process writes (``is_main``).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch


def peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """Peak FLOP/s MFU is measured against: ``lmforge.hardware.peak_flops`` (a known GPU's datasheet in
    bf16/fp16, else the cached matmul probe of that dtype; ``LMFORGE_PEAK_FLOPS`` overrides both)."""
    from lmforge.hardware.peak import peak_flops as hardware_peak_flops

    return hardware_peak_flops(device, dtype)


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
