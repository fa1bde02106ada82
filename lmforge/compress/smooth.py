"""SmoothQuant scales for int8 activations (Xiao et al. 2023), on the FFN down projections.

fbgemm's dynamic int8 linear, like ONNX Runtime's ``DynamicQuantizeLinear``, quantizes a layer's input with one
range per call. A trained decoder's FFN hidden activation (the down projection's input: silu(w1 x) ⊙ w3 x)
holds values about 10× larger than anything entering the other layers (calibration maxima 100–130 against
≤ 13 on the reference decoder), so one range leaves few of the 256 levels for the rest. The other layers gain little:
on the reference decoder, smoothing only the down projections gave +0.54% perplexity and smoothing every
layer +0.48%, against +1.17% with none.

Per input channel j of a down projection W: s_j = max|h_j|^α / max_o|W_oj|^(1-α) (``quantize.smooth_alpha``),
with h over the calibration tokens (``calib.py``). The layer then computes (h / s)(W·diag(s))ᵀ, which is the
same function. Where 1/s can be folded exactly it costs nothing at run time:
- gated FFNs (Llama's SwiGLU): h / s = silu(w1 x) ⊙ ((diag(1/s) w3) x), so w3's rows are scaled. Their
  per-row int8 scales absorb this, so w3 quantizes exactly as well as before.
- otherwise (GPT-2, BERT: act(fc x)): the nonlinearity is in the way, so the layer multiplies its input by
  1/s at run time (``QuantizedLinear.smooth``; one elementwise product, ~1.6 µs per call here).
"""

from __future__ import annotations

import torch
from torch import nn


def inverse_scale(weight_OI: torch.Tensor, amax_I: torch.Tensor, alpha: float) -> torch.Tensor:
    """1/s_j with s_j = max|x_j|^α / max_o|W_oj|^(1-α): what the layer's input is multiplied by."""
    wmax = weight_OI.detach().abs().amax(0).float().clamp_min(1e-5)
    return 1.0 / (amax_I.float().clamp_min(1e-5) ** alpha / wmax ** (1 - alpha)).clamp(1e-4, 1e4)


@torch.no_grad()
def smooth_ffn(ctx, model: nn.Module, lm: nn.Module, names: list[str], alpha: float
               ) -> tuple[list[str], dict[str, torch.Tensor]]:
    """Smooth every quantized FFN down projection of ``lm`` (inside ``model``, whose forward runs the
    calibration) in place. Returns (the layers folded into their up projection, {layer: 1/s} for the layers
    that apply it at run time)."""
    from lmforge.compress.calib import calibration_batches, input_stats
    from lmforge.compress.structured import ffn_parts

    name_of = {id(m): n for n, m in lm.named_modules()}
    downs = {}  # name → (down projection, w3: the SwiGLU factor h is linear in, or None)
    for block in lm.layers:
        down = ffn_parts(block)[1]
        if name_of[id(down)] in names:
            downs[name_of[id(down)]] = (down, getattr(block.feed_forward, "w3", None))
    amax = input_stats(model, {n: d for n, (d, _) in downs.items()},
                       calibration_batches(ctx, ctx.cfg.quantize.calib_batches), ctx.src.kind, "absmax")
    folded, runtime = [], {}
    for n, (down, w3) in downs.items():
        m_I = inverse_scale(down.weight, amax[n], alpha)
        down.weight.div_(m_I[None, :])
        if w3 is None:
            runtime[n] = m_I
            continue
        w3.weight.mul_(m_I[:, None])
        if w3.bias is not None:
            w3.bias.mul_(m_I)
        folded.append(n)
    return folded, runtime


class SmoothedLinear(nn.Module):
    """x ↦ (x · m) Wᵀ + b with W already scaled: a run-time-smoothed layer in float form, for the graphs
    ONNX Runtime's quantizer reads (Mul → MatMul) under ``export.quantize=int8_dynamic``."""

    def __init__(self, lin: nn.Linear, m_I: torch.Tensor):
        super().__init__()
        self.lin = lin
        self.register_buffer("m", m_I.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x * self.m)


def smoothed_copy(ctx, model: nn.Module, alpha: float) -> nn.Module:
    """A copy of ``model`` (lm or TaskModel) with its FFN down projections smoothed (the same function)."""
    import copy

    from lmforge.compress.qlinear import targets

    out = copy.deepcopy(model)
    lm = out if ctx.src.kind == "lm" else out.backbone.model
    _, runtime = smooth_ffn(ctx, out, lm, targets(lm, ctx.cfg.quantize.skip), alpha)
    for name, m_I in runtime.items():
        parent, _, leaf = name.rpartition(".")
        owner = lm.get_submodule(parent) if parent else lm
        setattr(owner, leaf, SmoothedLinear(getattr(owner, leaf), m_I))
    return out
