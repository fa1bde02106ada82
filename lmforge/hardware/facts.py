"""What this machine is: CPU model and instruction-set flags, threads, memory, CUDA devices, MPS.

Facts only, no timing (``matmul.py`` measures). Every function is cheap, never raises on an unusual system
(a fact that cannot be read is ``None`` / empty) and imports nothing beyond torch.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
from functools import lru_cache
from typing import Optional

import torch

# Instruction-set flags that decide matmul speed, as /proc/cpuinfo spells them.
X86_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_fp16")
ARM_FLAGS = ("asimd", "sve", "sve2", "bf16", "i8mm", "fphp")
# Flags that mean bf16 matmuls run in hardware, not emulated through fp32 conversions.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


def parse_cpuinfo(text: str) -> tuple[Optional[str], frozenset[str]]:
    """(model name, flags) from /proc/cpuinfo text (x86 "model name"/"flags", Arm "Hardware"/"Features")."""
    model, flags = None, frozenset()
    for line in text.splitlines():
        key, _, val = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and model is None:
            model = val.strip() or None
        elif key in ("flags", "features") and not flags:
            flags = frozenset(val.split())
    return model, flags


@lru_cache(maxsize=1)
def _cpuinfo() -> tuple[Optional[str], frozenset[str]]:
    """(model name, set of flags) of this machine: /proc/cpuinfo (Linux) or sysctl (macOS)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            model, flags = parse_cpuinfo(f.read())
    except OSError:
        model, flags = None, frozenset()
    if platform.system() == "Darwin":
        model = model or _sysctl("machdep.cpu.brand_string")
        if _sysctl("hw.optional.arm.FEAT_BF16") == "1":
            flags = flags | {"bf16"}
    return model or platform.processor() or None, frozenset(flags)


def _sysctl(name: str) -> Optional[str]:
    try:
        out = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask), else the CPU count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def memory_gb() -> Optional[float]:
    """Total physical memory in GB (10⁹ bytes), or None."""
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1)
    except (AttributeError, ValueError, OSError):
        return None


def cpu_facts() -> dict:
    """``model``, ``arch``, ``flags`` (name → bool for the flags that matter on this arch), ``native_bf16``,
    ``capability`` (the ATen kernel level torch dispatches to: DEFAULT/AVX2/AVX512/...), CPU counts and the
    torch thread settings."""
    model, flags = _cpuinfo()
    arch = platform.machine().lower()
    return {"model": model, "arch": arch, **flag_facts(flags, arch),
            "capability": _capability(), "logical_cpus": os.cpu_count(), "usable_cpus": usable_cpus(),
            "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads()}


def flag_facts(flags: frozenset[str], arch: str) -> dict:
    """``flags``: name → present, for the flags that matter on ``arch``; ``native_bf16``: any of them says
    bf16 matmuls run in hardware."""
    names = ARM_FLAGS if arch in ("aarch64", "arm64") else X86_FLAGS
    return {"flags": {n: n in flags for n in names}, "native_bf16": any(f in flags for f in NATIVE_BF16_FLAGS)}


def _capability() -> Optional[str]:
    try:
        return torch.backends.cpu.get_cpu_capability()
    except Exception:  # older torch
        return None


def cpu_identity() -> str:
    """A short id of this kind of machine for cache keys: CPU model, a digest of its flags, CPU count, and the
    instruction sets torch's kernels may use (``ATEN_CPU_CAPABILITY``, ``ONEDNN_MAX_CPU_ISA`` and
    ``MKL_ENABLE_INSTRUCTIONS`` cap them below what the flags allow, and change which dtype is fast)."""
    import hashlib

    model, flags = _cpuinfo()
    digest = hashlib.sha256(" ".join(sorted(flags)).encode()).hexdigest()[:10]
    name = re.sub(r"\s+", " ", model or platform.machine())
    caps = [torch.backends.cpu.get_cpu_capability()] + [f"{k}={os.environ[k]}" for k in
                                                         ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
                                                         if os.environ.get(k)]
    return f"{name}|flags:{digest}|cpus:{os.cpu_count()}|isa:{','.join(caps)}"


def cuda_bf16_native(index: int = 0) -> bool:
    """True when CUDA device ``index`` runs bf16 matmuls in hardware (compute capability ≥ 8.0; ROCm: what
    torch reports). ``torch.cuda.is_bf16_supported()`` alone also says True for emulated bf16 (V100, T4)."""
    if not torch.cuda.is_available():
        return False
    if torch.version.hip:
        with torch.cuda.device(index):
            return bool(torch.cuda.is_bf16_supported())
    return torch.cuda.get_device_capability(index) >= (8, 0)


def _nccl_version() -> Optional[str]:
    try:
        v = torch.cuda.nccl.version()
    except Exception:  # CPU build, or NCCL missing
        return None
    return ".".join(str(x) for x in v) if isinstance(v, tuple) else str(v)


def device_facts() -> dict:
    """``cuda``: available, runtime version, NCCL, and per device name / capability / memory / native bf16;
    ``mps``: built and available."""
    cuda: dict = {"available": torch.cuda.is_available(), "version": torch.version.cuda, "hip": torch.version.hip,
                  "nccl": _nccl_version() if torch.cuda.is_available() else None, "devices": []}
    if cuda["available"]:
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            cuda["devices"].append({"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
                                    "memory_gb": round(p.total_memory / 1e9, 1),
                                    "bf16": cuda_bf16_native(i)})
    mps_backend = getattr(torch.backends, "mps", None)
    mps = {"built": bool(mps_backend and mps_backend.is_built()),
           "available": bool(mps_backend and mps_backend.is_available())}
    return {"cuda": cuda, "mps": mps}
