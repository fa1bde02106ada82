"""Matmul throughput probe: FLOP/s of fp32, bf16 and fp16 matrix products on one device, cached per machine.

Contract (per dtype d):
    peak[d] = max over shapes (m, k, n) of  2·m·k·n / t_min(m, k, n)
where t_min is the fastest of a few timed calls of ``torch.mm(a_MK, b_KN, out=c_MN)`` after one warm-up. The
shapes run from tiny to large and include the non-square products training issues (activations × weight:
m ≫ k; weight gradients: k ≫ m), so the best-of over them bounds what a model's matmuls sustain in that dtype
(MFU > 100% would mean the peak is wrong). Shapes go in order of cost; a shape is skipped when its predicted
cost (from the best rate so far) would overrun the dtype's budget (the first two, 128³ and 256³, always run),
so an emulated dtype (bf16 on an AVX2 CPU: ~1 GFLOP/s) costs about 0.1 s. A dtype the device
cannot run gets ``None``. Total on a CPU: ≲ 0.5 s; on a GPU ≲ 1 s.

Cache: ``cache_dir()/hardware_probe.json`` (``LMFORGE_CACHE`` moves it), one entry per device identity
(CPU model + flags + CPU count, or GPU name + capability), torch version, thread count and fp32 matmul
precision. Processes on one machine probe one at a time (a file lock) and the rest read the cache, so ranks
of a job do not slow each other's measurement. A CPU probe during which other processes took cores (this
process got < 75% of its threads' CPU time) is repeated once, each dtype keeping its better figure, and is
cached only when undisturbed (a disturbed one is kept for the rest of the process). The probe never
touches the global RNG (its own generator) nor the thread settings.
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

PROBE_VERSION = 1
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# (m, k, n) in order of cost: squares, activations × weight (m ≫ k), weight gradients (k ≫ m).
CPU_SHAPES = ((128, 128, 128), (256, 256, 256), (512, 512, 512), (1024, 1024, 1024), (4096, 256, 1024),
              (256, 4096, 1024), (2048, 2048, 2048), (8192, 512, 2048), (1024, 8192, 2048), (4096, 4096, 4096))
GPU_SHAPES = ((1024, 1024, 1024), (2048, 2048, 2048), (4096, 4096, 4096), (16384, 1024, 4096),
              (1024, 16384, 4096), (8192, 8192, 8192))
CPU_BUDGET_S = {"fp32": 0.2, "bf16": 0.15, "fp16": 0.1}
GPU_BUDGET_S = {"fp32": 0.3, "bf16": 0.3, "fp16": 0.3}
SAMPLES = 3  # timed samples per shape at least (fewer only when the budget runs out; never none) ...
SHAPE_MIN_S = 0.01  # ... and more, up to MAX_SAMPLES, until the shape has had this long: a cheap shape gets a
MAX_SAMPLES = 50  # best-of-many, so a neighbour process stealing a core cannot hide the peak
MIN_SAMPLE_S = 1e-3  # a timed sample repeats the product until it lasts this long (timer resolution)
MIN_CPU_SHARE = 0.75  # below this share of its threads' CPU time a CPU probe counts as disturbed
_DISTURBED: dict[tuple[str, str], "ProbeResult"] = {}  # (cache file, key) → disturbed result, this process only


@dataclass(frozen=True)
class ProbeResult:
    """Measured matmul throughput of one device. ``peaks`` maps "fp32"/"bf16"/"fp16" to FLOP/s (None: the
    device cannot run it); ``best_shape`` names the m×k×n that reached it."""

    device: str
    peaks: dict[str, Optional[float]]
    best_shape: dict[str, Optional[str]] = field(default_factory=dict)
    threads: int = 1
    seconds: float = 0.0
    key: str = ""
    cached: bool = False
    cpu_share: Optional[float] = None

    @property
    def disturbed(self) -> bool:
        """True when other processes took this process's cores during the measurement (peaks too low)."""
        return self.cpu_share is not None and self.cpu_share < MIN_CPU_SHARE

    def peak(self, precision: str) -> Optional[float]:
        return self.peaks.get(precision)

    def speedup(self, precision: str) -> Optional[float]:
        """Peak of ``precision`` over the fp32 peak (bf16 on an AVX2 CPU: ~0.02; on AMX: > 5)."""
        p, base = self.peaks.get(precision), self.peaks.get("fp32")
        return p / base if p and base else None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ProbeResult":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def summary(self) -> str:
        """``fp32 43.7, bf16 0.7, fp16 1.1 GFLOP/s``."""
        parts = [f"{k} {v / 1e9:,.1f}" if v else f"{k} n/a" for k, v in self.peaks.items()]
        return ", ".join(parts) + " GFLOP/s"


def cache_dir() -> Path:
    """``$LMFORGE_CACHE``, else ``$XDG_CACHE_HOME/lmforge``, else ``~/.cache/lmforge``."""
    if os.environ.get("LMFORGE_CACHE"):
        return Path(os.environ["LMFORGE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lmforge"


def _device_identity(device: torch.device) -> str:
    from lmforge.hardware.facts import cpu_identity

    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(idx)
        tf32 = torch.backends.cuda.matmul.allow_tf32
        return f"cuda|{torch.cuda.get_device_name(idx)}|cc{major}.{minor}|cuda {torch.version.cuda}|tf32 {tf32}"
    return f"{device.type}|{cpu_identity()}"


def probe_key(device: torch.device) -> str:
    return (f"v{PROBE_VERSION}|{_device_identity(device)}|torch {torch.__version__}|threads "
            f"{torch.get_num_threads()}|fp32 matmul {torch.get_float32_matmul_precision()}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


class _Clock:
    """Wall and process CPU seconds spent inside timed samples (for the CPU share of a probe)."""

    def __init__(self):
        self.wall = self.cpu = 0.0

    def share(self, threads: int) -> Optional[float]:
        """CPU time / (wall × threads that can run at once: torch threads, at most the usable CPUs)."""
        from lmforge.hardware.facts import usable_cpus

        return round(self.cpu / (self.wall * min(threads, usable_cpus())), 3) if self.wall > 0 else None


def _time_shape(shape: tuple[int, int, int], dtype: torch.dtype, device: torch.device,
                gen: torch.Generator, deadline: float, clock: _Clock) -> float:
    """FLOP/s of the fastest timed sample of one (m, k, n) product (warm-up excluded)."""
    m, k, n = shape
    a_MK = torch.randn(m, k, generator=gen, device=device).to(dtype)
    b_KN = torch.randn(k, n, generator=gen, device=device).to(dtype)
    c_MN = torch.empty(m, n, device=device, dtype=dtype)
    _sync(device)
    t0 = time.perf_counter()
    torch.mm(a_MK, b_KN, out=c_MN)
    _sync(device)
    warm = time.perf_counter() - t0
    reps = max(1, math.ceil(MIN_SAMPLE_S / max(warm, 1e-9)))
    best, t_shape, i = math.inf, time.perf_counter(), 0
    while i < MAX_SAMPLES and (i < SAMPLES or time.perf_counter() - t_shape < SHAPE_MIN_S):
        if i and time.perf_counter() + min(best, warm) * reps > deadline:
            break
        t0, cpu0 = time.perf_counter(), time.process_time()
        for _ in range(reps):
            torch.mm(a_MK, b_KN, out=c_MN)
        _sync(device)
        dt = time.perf_counter() - t0
        clock.wall, clock.cpu = clock.wall + dt, clock.cpu + time.process_time() - cpu0
        best = min(best, dt / reps)
        i += 1
    return 2.0 * m * k * n / best


def measure_dtype(dtype: torch.dtype, device: torch.device, budget_s: float, shapes: tuple = CPU_SHAPES,
                  clock: Optional[_Clock] = None) -> tuple[Optional[float], Optional[str]]:
    """(peak FLOP/s, best shape) of one dtype within ``budget_s``; (None, None) if the device cannot run it.

    The first two shapes always run. A later one runs when warm-up + one sample fits the remaining budget at
    the best rate so far, or while the rate is still climbing steeply (> 2× per shape: per-call overhead,
    e.g. threads waiting for a core a neighbour holds, not compute, dominates; at most 2× the budget)."""
    gen = torch.Generator(device=device).manual_seed(0)
    clock = clock or _Clock()
    start = time.perf_counter()
    deadline = start + budget_s
    best, best_shape, last, growing = 0.0, None, 0.0, False
    for i, shape in enumerate(shapes):
        flops = 2.0 * shape[0] * shape[1] * shape[2]
        now = time.perf_counter()
        if i >= 2 and now + 2 * flops / best > deadline and not (growing and now < start + 2 * budget_s):
            break
        try:
            rate = _time_shape(shape, dtype, device, gen, deadline, clock)
        except (RuntimeError, TypeError, NotImplementedError) as e:  # dtype unsupported, or out of memory
            if i == 0:
                return None, None
            if "out of memory" in str(e).lower():
                break
            continue
        growing, last = rate > 2 * last > 0, rate
        if rate > best:
            best, best_shape = rate, "×".join(str(s) for s in shape)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return best, best_shape


def measure(device: torch.device | str = "cpu", budgets: Optional[dict[str, float]] = None) -> ProbeResult:
    """Run the probe now (no cache): every dtype of ``DTYPES`` within its budget. On a CPU it also records
    ``cpu_share`` = CPU time this process got during the timed products / (their wall time × torch threads):
    well below 1 means other processes took cores during the measurement, so the peaks are too low."""
    device = torch.device(device)
    gpu = device.type in ("cuda", "mps")
    budgets = budgets or (GPU_BUDGET_S if gpu else CPU_BUDGET_S)
    t0, clock = time.perf_counter(), _Clock()
    peaks, shapes = {}, {}
    for name, dtype in DTYPES.items():
        peaks[name], shapes[name] = measure_dtype(dtype, device, budgets[name], GPU_SHAPES if gpu else CPU_SHAPES,
                                                  clock)
    wall = time.perf_counter() - t0
    share = None if gpu else clock.share(torch.get_num_threads())
    return ProbeResult(device=device.type, peaks=peaks, best_shape=shapes, threads=torch.get_num_threads(),
                       seconds=round(wall, 3), key=probe_key(device), cpu_share=share)


def _merge(a: ProbeResult, b: ProbeResult) -> ProbeResult:
    """Per dtype the better of two measurements (each is a lower bound of the true peak)."""
    peaks, shapes = dict(a.peaks), dict(a.best_shape)
    for name, v in b.peaks.items():
        if v is not None and (peaks.get(name) is None or v > peaks[name]):
            peaks[name], shapes[name] = v, b.best_shape.get(name)
    shares = [s for s in (a.cpu_share, b.cpu_share) if s is not None]
    return ProbeResult(device=a.device, peaks=peaks, best_shape=shapes, threads=a.threads,
                       seconds=round(a.seconds + b.seconds, 3), key=a.key, cpu_share=max(shares) if shares else None)


@contextmanager
def _locked(path: Path):
    """Exclusive lock on ``path`` (no-op where fcntl is missing or the folder is read-only)."""
    try:
        import fcntl

        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "a+")
    except (ImportError, OSError):
        yield
        return
    try:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(path: Path, key: str, entry: dict) -> None:
    try:
        data = _read_cache(path)
        data[key] = entry
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs a re-probe next time


def probe(device: torch.device | str = "cpu", *, refresh: bool = False) -> ProbeResult:
    """The cached probe result of ``device`` (measured on first use on this machine, or when ``refresh``)."""
    device = torch.device(device)
    key = probe_key(device)
    path = cache_dir() / "hardware_probe.json"
    if not refresh and key in (cached := _read_cache(path)):
        return _from_cache(cached[key], key)
    if not refresh and (str(path), key) in _DISTURBED:  # measured under load in this process: not again
        return _DISTURBED[(str(path), key)]
    with _locked(path.with_suffix(".lock")):
        if not refresh and key in (cached := _read_cache(path)):  # another process measured while we waited
            return _from_cache(cached[key], key)
        result = measure(device)
        if result.disturbed:  # a neighbour took cores: measure once more and keep the better of each
            result = _merge(result, measure(device))
        if result.disturbed:  # used for the rest of this process, measured again by the next one
            _DISTURBED[(str(path), key)] = result
        else:
            entry = result.to_dict()
            entry["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
            _write_cache(path, key, entry)
    return result


def _from_cache(entry: dict, key: str) -> ProbeResult:
    r = ProbeResult.from_dict(entry)
    return ProbeResult(**{**asdict(r), "key": key, "cached": True})
