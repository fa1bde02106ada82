"""Int8 linear layers: one stored format, the kernel chosen per machine at load time.

Stored (what a quantized run's checkpoint holds for each quantized ``nn.Linear`` ``name``):
``name.qweight`` int8 [out, in] and ``name.scale`` float32 [out], with W ≈ qweight · scale[:, None]
(symmetric per output row, computed by torchao's ``Int8WeightOnlyConfig``), plus ``name.bias`` when the layer
has one, and ``name.smooth`` float32 [in] when it was quantized with SmoothQuant scales (the layer then
computes (x · smooth) (qweight · scale)ᵀ: the stored weight is W·diag(1/smooth), so outlier input channels no
longer set the activations' quantization range). Nothing in the format depends on the kernel, so one folder
runs on any device.

Kernels (``QuantizedLinear.prepare(kernel)``; y = x Wᵀ + b):
- ``fbgemm`` (int8_dynamic): torch's ``quantized::linear_dynamic`` over the prepacked weight (x86 / fbgemm
  engine: int8 GEMM with VNNI); activations quantized per tensor (one scale per call) at run time.
- ``torchao`` (int8_dynamic: per-token activations + ``torch._int_mm``; int8_weight: the float activation times
  the int8 weight cast per call): torchao's ``Int8Tensor`` rebuilt from the stored values, exactly.
- ``dequantized``: the float weight qweight · scale, built once (no speed-up; the file stays 4× smaller).
``auto`` times the candidates on the model's largest layer (batch 1 and batch N), checks each one's output
against the exact product of the stored weights (``kernel_error``), and takes the faster at batch 1 (decode)
among the accurate ones that keep the scheme's meaning (int8_dynamic: fbgemm or torchao; int8_weight:
torchao or dequantized); the probe numbers are recorded next to the choice.

Legend: N rows (tokens), I in features, O out features.
"""

from __future__ import annotations

import logging
import time
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import ConfigError

KERNELS = {"int8_dynamic": ("fbgemm", "torchao", "dequantized"), "int8_weight": ("torchao", "dequantized")}
AUTO = {"int8_dynamic": ("fbgemm", "torchao"), "int8_weight": ("torchao", "dequantized")}  # what auto picks from


def quiet_torchao():
    """Import torchao without its log lines about optional CUDA extensions this CPU build cannot load."""
    prev = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torchao.quantization as q
    finally:
        logging.disable(prev)
    return q


class QuantizedLinear(nn.Module):
    """A stored int8 ``nn.Linear`` (module doc). ``weight`` reads back the dequantized float weight."""

    def __init__(self, in_features: int, out_features: int, bias: bool, scheme: str, device=None,
                 smooth: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_buffer("smooth", torch.ones(in_features, device=device) if smooth else None)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None
        self.kernel, self._run = "dequantized", None

    @property
    def weight(self) -> torch.Tensor:
        """The float weight the layer computes with (the smoothing folded back in)."""
        w = self.stored_weight()
        return w if self.smooth is None else w * self.smooth[None, :]

    def stored_weight(self) -> torch.Tensor:
        return self.qweight.float() * self.scale[:, None]

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, scheme={self.scheme}, kernel={self.kernel}"

    def prepare(self, kernel: str) -> None:
        """Build the kernel's own form of the stored weights (after they were loaded)."""
        if kernel not in KERNELS[self.scheme]:
            raise ConfigError(f"quantize.kernel={kernel} cannot run scheme {self.scheme} (choose from "
                              f"{', '.join(KERNELS[self.scheme])})")
        bias = self.bias.detach() if self.bias is not None else None
        if kernel == "fbgemm":
            zeros = torch.zeros(self.out_features, dtype=torch.long)
            with warnings.catch_warnings():  # torch's quantized-tensor constructors warn of their deprecation
                warnings.simplefilter("ignore")
                qw = torch._make_per_channel_quantized_tensor(self.qweight.cpu(), self.scale.double().cpu(), zeros, 0)
                packed = torch.ops.quantized.linear_prepack(qw, bias)
            reduce = not _has_vnni()
            self._run = lambda x_NI: torch.ops.quantized.linear_dynamic(x_NI, packed, reduce)
        elif kernel == "torchao":
            lin = _torchao_linear(self.qweight, self.scale, bias, self.scheme)
            self._run = lambda x_NI: lin(x_NI)  # a closure, not a submodule: its Int8Tensor stays out of state_dict
        else:
            w_OI = self.stored_weight()
            self._run = lambda x_NI: F.linear(x_NI, w_OI, bias)
        self.kernel = kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._run is None:
            self.prepare("dequantized")
        shape = x.shape
        x_NI = x.reshape(-1, shape[-1]).float()
        y = self._run(x_NI if self.smooth is None else x_NI * self.smooth)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)


def _torchao_linear(qweight: torch.Tensor, scale: torch.Tensor, bias, scheme: str):
    """An ``nn.Linear`` whose weight is torchao's ``Int8Tensor`` holding exactly the stored values."""
    q = quiet_torchao()
    config = q.Int8DynamicActivationInt8WeightConfig() if scheme == "int8_dynamic" else q.Int8WeightOnlyConfig()
    lin = nn.Linear(qweight.shape[1], qweight.shape[0], bias=bias is not None)
    with torch.no_grad():
        lin.weight.copy_(qweight.float() * scale[:, None])  # the stored weight; QuantizedLinear applies smooth
        if bias is not None:
            lin.bias.copy_(bias)
    q.quantize_(lin, config)
    lin.weight.qdata = qweight.clone()  # the stored values, not torchao's re-rounding of the dequantized ones
    lin.weight.scale = scale.reshape(-1, 1).clone()
    return lin


def _has_vnni() -> bool:
    from lmforge.hardware import cpu_facts

    flags = cpu_facts().get("flags", {})
    return bool(flags.get("avx512_vnni") or flags.get("avx_vnni") or flags.get("amx_tile"))


@torch.no_grad()
def quantize_weight(weight_OI: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(qweight int8 [O, I], scale [O]) by torchao's int8 weight-only quantizer (symmetric, per row)."""
    q = quiet_torchao()
    lin = nn.Linear(weight_OI.shape[1], weight_OI.shape[0], bias=False)
    lin.weight.copy_(weight_OI.float())
    q.quantize_(lin, q.Int8WeightOnlyConfig())
    return lin.weight.qdata.clone(), lin.weight.scale.reshape(-1).float().clone()


def targets(model: nn.Module, skip: list[str]) -> list[str]:
    """Names of the ``nn.Linear`` modules to quantize (not those whose name contains a ``skip`` entry)."""
    return [n for n, m in model.named_modules() if type(m) is nn.Linear and not any(s in n for s in skip)]


def swap_in(model: nn.Module, names: list[str], scheme: str, fill: bool, smooth: Optional[dict] = None) -> None:
    """Replace each named ``nn.Linear`` by a ``QuantizedLinear``; ``fill``: quantize its weights (else the
    buffers stay empty for a checkpoint to fill). ``smooth``: the layers that multiply their input at run time
    (``smooth.py``; their weights already carry s), name → 1/s (``fill``; None where a checkpoint fills it)."""
    smooth = smooth or {}
    for name in names:
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        lin = getattr(owner, leaf)
        dev = lin.weight.device if lin.weight.device.type != "meta" else "cpu"
        ql = QuantizedLinear(lin.in_features, lin.out_features, lin.bias is not None, scheme, device=dev,
                             smooth=name in smooth)
        if fill:
            qweight, scale = quantize_weight(lin.weight)
            ql.qweight.copy_(qweight)
            ql.scale.copy_(scale)
            if name in smooth:
                ql.smooth.copy_(smooth[name])
            if lin.bias is not None:
                ql.bias.data.copy_(lin.bias.detach())
        setattr(owner, leaf, ql)


def quantized_layers(model: nn.Module) -> list[QuantizedLinear]:
    return [m for m in model.modules() if isinstance(m, QuantizedLinear)]


def _time(fn, x: torch.Tensor, repeats: int = 20) -> float:
    with torch.inference_mode():
        fn(x)
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn(x)
    return (time.perf_counter() - t0) / repeats


MAX_KERNEL_ERROR = 0.05  # relative rms error against the stored weights' float product; int8 kernels sit near 0.01


def _probe_layer(layer: QuantizedLinear, kernel: str) -> Optional[QuantizedLinear]:
    """A bias-free copy of ``layer``'s stored weights (no ``smooth``: the kernel is what is checked) running
    ``kernel``, or None where this machine lacks its engine."""
    probe_layer = QuantizedLinear(layer.in_features, layer.out_features, False, layer.scheme)
    probe_layer.qweight.copy_(layer.qweight)
    probe_layer.scale.copy_(layer.scale)
    try:
        probe_layer.prepare(kernel)
    except (RuntimeError, NotImplementedError):
        return None
    return probe_layer


@torch.no_grad()
def kernel_error(layer: QuantizedLinear, kernel: str, rows: int = 32) -> Optional[float]:
    """Relative rms difference between ``kernel``'s output and x·(qweight·scale)ᵀ on random rows, measured here:
    a kernel can be wrong on some CPUs (torch's ``_int_mm`` without VNNI sums u8·s8 pairs in saturating int16,
    ~15% off on an AVX2-only CPU), so ``auto`` never trusts one it has not checked. None: not runnable here."""
    probe_layer = _probe_layer(layer, kernel)
    if probe_layer is None:
        return None
    x = torch.randn(rows, layer.in_features, generator=torch.Generator().manual_seed(0))
    ref = F.linear(x, layer.stored_weight())
    return float((probe_layer(x) - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-12))


def probe(layer: QuantizedLinear, rows: int = 32) -> dict:
    """Seconds per call of each kernel of the layer's scheme at 1 and ``rows`` rows (fp32 F.linear as the
    reference) and each kernel's ``kernel_error`` (``KERNEL:err``), on this machine now."""
    out = {}
    w_OI = layer.stored_weight()
    for rows_n in (1, rows):
        x = torch.randn(rows_n, layer.in_features)
        out[f"fp32@{rows_n}"] = _time(lambda v: F.linear(v, w_OI), x)
    for kernel in KERNELS[layer.scheme]:
        probe_layer = _probe_layer(layer, kernel)
        if probe_layer is None:  # an engine this machine lacks
            continue
        for rows_n in (1, rows):
            out[f"{kernel}@{rows_n}"] = _time(probe_layer, torch.randn(rows_n, layer.in_features))
        out[f"{kernel}:err"] = kernel_error(layer, kernel, rows)
    return out


def choose_kernel(model: nn.Module, want: str) -> tuple[str, dict]:
    """(kernel, probe numbers): ``want`` itself once its accuracy is checked on the largest quantized layer, or
    for ``auto`` the kernel fastest at batch 1 there among the accurate ones (``dequantized``, exact, when none
    is)."""
    layers = quantized_layers(model)
    if not layers:
        return want, {}
    big = max(layers, key=lambda m: m.qweight.numel())
    if want != "auto":
        err = kernel_error(big, want)
        if err is not None and err > MAX_KERNEL_ERROR:
            raise ConfigError(f"quantize.kernel={want}: on this machine its results are {err:.1%} (rms) off the "
                              f"int8 weights' exact product (bound {MAX_KERNEL_ERROR:.0%}); use quantize.kernel=auto")
        return want, {}
    numbers = probe(big)
    real = AUTO[layers[0].scheme]
    ones = {k.split("@")[0]: v for k, v in numbers.items() if k.endswith("@1") and k.split("@")[0] in real
            and numbers[f"{k.split('@')[0]}:err"] <= MAX_KERNEL_ERROR}
    shown = {k: round(v * 1e6, 1) if "@" in k else round(v, 4) for k, v in numbers.items()}
    return (min(ones, key=ones.get) if ones else "dequantized"), shown


def prepare_all(model: nn.Module, kernel: str) -> None:
    for layer in quantized_layers(model):
        layer.prepare(kernel)


def dequantized(model: nn.Module) -> nn.Module:
    """The model with every ``QuantizedLinear`` replaced by a float ``nn.Linear`` of its dequantized weight and
    every int8 embedding table by a float one (in place; a model without any is returned as is): for formats
    with no int8 form, e.g. the HF export."""
    from lmforge.compress.qembed import dequantized_embeddings

    dequantized_embeddings(model)
    for name, m in list(model.named_modules()):
        if isinstance(m, QuantizedLinear):
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(m.weight)
                if m.bias is not None:
                    lin.bias.copy_(m.bias)
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, lin)
    return model


def machine_key() -> dict:
    """What decides which kernel is fast: the CPU, its flags and torch's quantized engine."""
    from lmforge.hardware import cpu_facts

    cpu = cpu_facts()
    return {"cpu": cpu.get("model"), "flags": sorted(k for k, v in cpu.get("flags", {}).items() if v),
            "isa": torch.backends.cpu.get_cpu_capability(), "engine": torch.backends.quantized.engine,
            "cuda": torch.cuda.is_available()}


def kernel_names() -> dict:
    return {"fbgemm": f"torch quantized::linear_dynamic ({torch.backends.quantized.engine} engine"
                      f"{', VNNI' if _has_vnni() else ''})",
            "torchao": "torchao Int8Tensor (eager)", "dequantized": "fp32 F.linear of the dequantized weight"}


def check_scheme(scheme: str, device: Optional[str] = "cpu") -> None:
    """int4_weight has no eager torch kernel here: a clear error naming the key (and the path that has one)."""
    if scheme == "int4_weight":
        raise ConfigError(
            f"quantize.scheme=int4_weight: no int4 kernel for device {device} in this torch/torchao build "
            "(torchao 0.18 runs int4 on CUDA/XPU/NPU, and on CPU only through its C++ kernel library, which is "
            "not loaded here; torch's _weight_int4pack_mm_for_cpu measured slower than fp32)",
            hint="use int8_dynamic / int8_weight, or `lmforge compress export SOURCE --out OUT "
                 "--export.quantize=int4_weight` (ONNX Runtime's MatMulNBits kernel)")
