"""The peak FLOP/s that MFU is measured against: ``peak_flops(device, dtype)``.

MFU = achieved model FLOP/s / peak, so the peak must be an upper bound of what the device does in the dtype
the model computes in:
- ``LMFORGE_PEAK_FLOPS`` (FLOP/s) overrides everything;
- a known NVIDIA GPU in bf16/fp16: its dense tensor-core datasheet figure (the usual MFU denominator);
- anything else (CPUs, MPS, unknown GPUs, fp32 on any GPU, which depends on the TF32 setting): the measured
  matmul peak of that dtype from ``matmul.py`` (best of several shapes, cached per machine).
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from lmforge.hardware.matmul import ProbeResult, probe

# dense bf16/fp16 tensor-core peak (FLOP/s) by substring of torch.cuda.get_device_name(); longest match wins
GPU_PEAK_BF16 = {"H200": 989e12, "H100 SXM": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 756e12,
                 "A100": 312e12, "A10G": 125e12, "L40S": 362e12, "L4": 121e12, "A6000": 155e12, "4090": 165e12,
                 "V100": 125e12, "T4": 65e12, "B200": 2250e12, "GH200": 989e12}
_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def datasheet_peak(name: str) -> Optional[float]:
    """Datasheet dense bf16/fp16 peak of a GPU by its device name (longest matching table key), or None."""
    hits = [k for k in GPU_PEAK_BF16 if k in name]
    return GPU_PEAK_BF16[max(hits, key=len)] if hits else None


def peak_info(device: torch.device | str, dtype: torch.dtype,
              result: Optional[ProbeResult] = None) -> tuple[float, str]:
    """(peak FLOP/s, source) with source "env", "datasheet" or "measured". ``result`` injects a probe."""
    if os.environ.get("LMFORGE_PEAK_FLOPS"):
        return float(os.environ["LMFORGE_PEAK_FLOPS"]), "env"
    device = torch.device(device)
    name = _NAMES.get(dtype)
    if name is None:
        raise ValueError(f"peak_flops: no peak for dtype {dtype} (fp32, bf16, fp16)")
    if device.type == "cuda" and name != "fp32":
        sheet = datasheet_peak(torch.cuda.get_device_name(device))
        if sheet:
            return sheet, "datasheet"
    result = result or probe(device)
    value = result.peak(name) or result.peak("fp32")
    if not value:
        raise RuntimeError(f"the matmul probe measured nothing on {device} (peaks: {result.peaks})")
    return float(value), "measured"


def peak_flops(device: torch.device | str, dtype: torch.dtype) -> float:
    """Peak FLOP/s of ``device`` computing in ``dtype`` (see the module docstring for where it comes from)."""
    return peak_info(device, dtype)[0]
