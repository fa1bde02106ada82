"""The machine a job runs on, measured: facts (CPU flags, devices), a cached matmul probe, the precision
``auto`` resolves to, and the peak FLOP/s MFU is measured against.

    facts.py      cpu_facts(), device_facts(), memory_gb(), cuda_bf16_native()
    matmul.py     probe(device) -> ProbeResult (cached FLOP/s of fp32 / bf16 / fp16 matmuls), measure(), cache_dir()
    precision.py  resolve_precision(want, device) -> PrecisionChoice
    peak.py       peak_flops(device, dtype), peak_info() -> (FLOP/s, source)
"""

from lmforge.hardware.facts import cpu_facts, cuda_bf16_native, device_facts, memory_gb
from lmforge.hardware.peak import peak_flops, peak_info
from lmforge.hardware.precision import PrecisionChoice, resolve_precision
from lmforge.hardware.matmul import ProbeResult, cache_dir, measure, probe

__all__ = ["cpu_facts", "cuda_bf16_native", "device_facts", "memory_gb", "peak_flops", "peak_info",
           "PrecisionChoice", "resolve_precision", "ProbeResult", "cache_dir", "measure", "probe"]
