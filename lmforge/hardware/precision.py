"""Which compute precision a job uses: ``resolve_precision(want, device) -> PrecisionChoice``.

Rules for ``want="auto"``:
- CUDA: bf16 where the device runs it natively (compute capability ≥ 8.0), else fp16 with loss scaling.
- MPS: the fastest by the probe among what runs there (fp32; bf16; fp16 with loss scaling), low precision
  only when it beats fp32 by ``SPEEDUP_MARGIN``, bf16 preferred to fp16 unless fp16 is clearly faster.
- CPU: bf16 when the probe measures it at least ``SPEEDUP_MARGIN`` × faster than fp32 (AVX-512-bf16 / AMX),
  else fp32 (AVX2-only CPUs emulate bf16 ~60× slower). fp16 is never chosen on a CPU: it needs loss scaling
  and gains nothing over bf16 for training there.
An explicit fp32/bf16/fp16 is always honoured; ``warning`` says when it is slow on this device (bf16 on a CPU
or GPU without native bf16, fp16 on a CPU), with the measured numbers. ``warn()`` prints it once per process.

Inference jobs (``lmforge serve``, ``lmforge generate``) name dtypes as torch does: ``resolve_dtype(want, device)``
takes ``auto`` or float32/bfloat16/float16; ``auto`` is the rule above (``resolve_precision("auto", ...)``), unless
the caller gives a reason the job must stay float32 (a compressed folder). An explicit name is honoured unprobed.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field, replace
from typing import Optional

import torch

from lmforge.errors import ConfigError
from lmforge.hardware.matmul import ProbeResult

PRECISIONS = ("fp32", "bf16", "fp16")
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
INFERENCE_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}  # torch name → precision
SPEEDUP_MARGIN = 1.15  # low precision must beat fp32 by this factor to be picked (else fp32's accuracy wins)
_WARNED: set[str] = set()


@dataclass(frozen=True)
class PrecisionChoice:
    """The resolved precision of a job and why. ``peaks``: the probe's FLOP/s per dtype ({} when not probed);
    ``loss_scaling``: fp16 needs dynamic loss scaling; ``warning``: set when an explicit choice is slow here."""

    precision: str
    requested: str
    device: str
    reason: str
    peaks: dict[str, Optional[float]] = field(default_factory=dict)
    loss_scaling: bool = False
    warning: Optional[str] = None

    @property
    def dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.precision]

    @property
    def peak_flops(self) -> Optional[float]:
        """Measured matmul peak of the chosen dtype (what MFU is measured against on a CPU)."""
        return self.peaks.get(self.precision)

    def to_dict(self) -> dict:
        return asdict(self)

    def log_line(self) -> str:
        """One line for the run's log: ``precision bf16 (auto): <reason>``."""
        return f"precision {self.precision} ({self.requested}): {self.reason}"

    @property
    def dtype_name(self) -> str:
        """The torch name of the dtype: float32, bfloat16, float16."""
        return str(self.dtype).removeprefix("torch.")

    def dtype_log_line(self) -> str:
        """One line for an inference job's log: ``dtype bfloat16 (auto): <reason>``."""
        return f"dtype {self.dtype_name} ({self.requested}): {self.reason}"

    def warn(self, stream=None) -> bool:
        """Print ``warning`` to stderr once per process (the same text is never printed twice)."""
        if not self.warning or self.warning in _WARNED:
            return False
        _WARNED.add(self.warning)
        print(f"warning: {self.warning}", file=stream or sys.stderr, flush=True)
        return True


def _gflops(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{v / 1e9:,.1f}"


def _measured(probe: ProbeResult, *names: str) -> str:
    return ", ".join(f"{n} {_gflops(probe.peak(n))}" for n in names) + " GFLOP/s"


def _cpu_choice(want: str, probe: ProbeResult, key: str, cpu_model: Optional[str]) -> tuple[str, str, Optional[str]]:
    fp32, bf16, fp16 = (probe.peak(n) for n in PRECISIONS)
    bf16_x = bf16 / fp32 if bf16 and fp32 else 0.0
    nums = _measured(probe, "fp32", "bf16")
    where = f"this CPU ({cpu_model})" if cpu_model else "this CPU"
    noisy = " (probe disturbed by other processes)" if probe.disturbed else ""
    if want == "auto":
        if bf16_x >= SPEEDUP_MARGIN:
            return "bf16", f"CPU bf16 matmul {bf16_x:.1f}× fp32 ({nums}){noisy}", None
        return "fp32", f"CPU bf16 matmul {bf16_x:.2g}× fp32 ({nums}), not worth it{noisy}", None
    if want == "bf16":
        reason = f"requested; CPU bf16 matmul {bf16_x:.2g}× fp32 ({nums})"
        if bf16_x and bf16_x < 1 / SPEEDUP_MARGIN:
            return "bf16", reason, (
                f"{key}=bf16 on {where} without native bf16: measured bf16 {_gflops(bf16)} vs fp32 "
                f"{_gflops(fp32)} GFLOP/s, {1 / bf16_x:.0f}× slower. It runs, slowly; {key}=auto picks fp32 here")
        return "bf16", reason, None
    if want == "fp16":
        return "fp16", f"requested ({_measured(probe, 'fp32', 'fp16')})", (
            f"{key}=fp16 on a CPU: fp16 {_gflops(fp16)} vs fp32 {_gflops(fp32)} GFLOP/s measured; CPU training "
            f"gains nothing from fp16 over bf16/fp32 (emulated on most CPUs, narrower range, needs loss scaling). "
            f"Use {key}=auto")
    return "fp32", f"requested ({nums})", None


def _cuda_choice(want: str, bf16_ok: bool, name: str, key: str) -> tuple[str, str, Optional[str]]:
    if want == "auto":
        if bf16_ok:
            return "bf16", f"{name} runs bf16 natively", None
        return "fp16", f"{name} has no native bf16 (compute capability < 8.0): fp16 with loss scaling", None
    if want == "bf16" and not bf16_ok:
        return "bf16", "requested", (f"{key}=bf16 on {name}, which has no native bf16 (compute capability < 8.0): "
                                     f"it is emulated and slow. Use {key}=auto (fp16 with loss scaling)")
    return want, "requested", None


def _mps_choice(want: str, probe: ProbeResult, key: str) -> tuple[str, str, Optional[str]]:
    fp32, bf16, fp16 = (probe.peak(n) for n in PRECISIONS)
    nums = _measured(probe, *PRECISIONS)
    if want == "auto":
        fast = [n for n, v in (("bf16", bf16), ("fp16", fp16)) if v and fp32 and v >= SPEEDUP_MARGIN * fp32]
        if not fast:
            return "fp32", f"MPS low precision not faster than fp32 ({nums})", None
        pick = "fp16" if fast == ["fp16"] or (bf16 and fp16 and fp16 > SPEEDUP_MARGIN * bf16) else "bf16"
        return pick, f"MPS fastest that runs ({nums})", None
    if want != "fp32" and probe.peak(want) is None:
        return want, "requested", f"{key}={want}: the MPS probe could not run {want} on this machine ({nums})"
    return want, f"requested ({nums})", None


def resolve_precision(want: str, device: torch.device | str = "cpu", *, probe: Optional[ProbeResult] = None,
                      bf16_supported: Optional[bool] = None, key: str = "training.precision",
                      cpu_model: Optional[str] = None) -> PrecisionChoice:
    """Resolve ``want`` ("auto", "fp32", "bf16", "fp16") for ``device``. ``probe`` (default: the cached
    probe of the device, measured on first use), ``bf16_supported`` (CUDA; default: asked of the device) and
    ``cpu_model`` (default: read from the machine) can be injected. ``key`` names the config key in messages."""
    if want not in ("auto", *PRECISIONS):
        raise ConfigError(f"invalid value for '{key}': {want!r} (allowed: auto, {', '.join(PRECISIONS)})")
    device = torch.device(device)
    if device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"{key}: no precision rules for device type {device.type!r} (cpu, cuda, mps)")
    if probe is None:
        from lmforge.hardware.matmul import probe as run_probe

        probe = run_probe(device)
    if device.type == "cuda":
        from lmforge.hardware.facts import cuda_bf16_native

        idx = device.index or 0
        ok = cuda_bf16_native(idx) if bf16_supported is None else bf16_supported
        name = torch.cuda.get_device_name(idx) if torch.cuda.is_available() else "this GPU"
        precision, reason, warning = _cuda_choice(want, ok, name, key)
    elif device.type == "mps":
        precision, reason, warning = _mps_choice(want, probe, key)
    else:
        if cpu_model is None:
            from lmforge.hardware.facts import cpu_facts

            cpu_model = cpu_facts()["model"]
        precision, reason, warning = _cpu_choice(want, probe, key, cpu_model)
    return PrecisionChoice(precision=precision, requested=want, device=device.type, reason=reason,
                           peaks=dict(probe.peaks), loss_scaling=precision == "fp16", warning=warning)


def check_dtype_name(want: str, key: str = "--dtype") -> str:
    """``want`` if it is ``auto`` or a torch dtype name an inference job runs in, else a ConfigError naming ``key``."""
    if want != "auto" and want not in INFERENCE_DTYPES:
        raise ConfigError(f"{key} {want!r}: not one of auto, {', '.join(INFERENCE_DTYPES)}")
    return want


def resolve_dtype(want: str, device: torch.device | str = "cpu", *, keep_fp32: Optional[str] = None,
                  key: str = "--dtype", **inject) -> PrecisionChoice:
    """The dtype an inference job (serve, generate) runs in. ``want``: ``auto`` or float32/bfloat16/float16.
    ``auto`` is the trainer's rule, ``resolve_precision("auto", device)`` (``inject``: its ``probe``,
    ``bf16_supported``, ``cpu_model``), except that ``keep_fp32`` (why the job must stay float32, e.g. a
    compressed folder) keeps float32 without probing. An explicit name is honoured as given, unprobed."""
    check_dtype_name(want, key)
    kind = torch.device(device).type
    if want != "auto":
        return PrecisionChoice(INFERENCE_DTYPES[want], want, kind, "requested")
    if keep_fp32:
        return PrecisionChoice("fp32", want, kind, keep_fp32)
    choice = resolve_precision(want, device, key=key, **inject)
    # no gradients at inference: fp16 needs no loss scaling
    return replace(choice, reason=choice.reason.removesuffix(" with loss scaling"), loss_scaling=False)
