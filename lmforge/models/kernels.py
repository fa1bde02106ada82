"""Hand-written autograd for memory-bound ops, so the backward does not replay a chain of small kernels.

``rope(x, cos, sin_signed)``: HF "rotate half" RoPE; its backward is the inverse rotation.
``rms_norm(x, weight, eps, out_dtype)``: RMSNorm computed in float32, output optionally cast (bf16 autocast).

Legend: B batch, T tokens, H heads, Dh head dim, D features.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def _swap_halves(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([x[..., half:], x[..., :half]], dim=-1)


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_BTHD, cos, sin_signed):
        ctx.save_for_backward(cos, sin_signed)
        return torch.addcmul(x_BTHD * cos, _swap_halves(x_BTHD), sin_signed)

    @staticmethod
    def backward(ctx, g_BTHD):
        cos, sin_signed = ctx.saved_tensors
        # y = x·c + P(x)·s with P the half swap (P = Pᵀ)  ⇒  dx = g·c + P(g·s)
        return torch.add(g_BTHD * cos, _swap_halves(g_BTHD * sin_signed)), None, None


def rope(x_BTHD: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """x·cos + [x2, x1]·sin_signed (= x·cos + rotate_half(x)·sin). cos/sin: [T, 1, Dh] or [B, T, 1, Dh]."""
    if cos.dtype != x_BTHD.dtype:
        cos, sin_signed = cos.to(x_BTHD.dtype), sin_signed.to(x_BTHD.dtype)
    if torch.is_grad_enabled() and x_BTHD.requires_grad:
        return _Rope.apply(x_BTHD, cos, sin_signed)
    return torch.addcmul(x_BTHD * cos, _swap_halves(x_BTHD), sin_signed)


def _acc(t: torch.Tensor) -> torch.Tensor:
    """Upcast half precision to float32; float32/float64 stay as they are."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps: float, out_dtype):
        xf = _acc(x)
        rstd = torch.rsqrt(xf.square().mean(-1, keepdim=True).add_(eps))
        w = _acc(weight).to(xf.dtype)
        out = (xf * rstd).mul_(w)
        ctx.save_for_backward(x, weight, rstd)
        return out.to(out_dtype) if out_dtype is not None else out.to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        x, weight, rstd = ctx.saved_tensors
        xhat = _acc(x) * rstd
        gf = _acc(g).to(xhat.dtype)
        gw = gf * _acc(weight).to(xhat.dtype)
        # dx = rstd · (gw − x̂ · mean(gw · x̂))
        dx = (gw - xhat * (gw * xhat).mean(-1, keepdim=True)).mul_(rstd)
        dweight = (gf * xhat).reshape(-1, x.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        return dx.to(x.dtype), (dweight.to(weight.dtype) if dweight is not None else None), None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: Optional[torch.dtype] = None):
    """RMSNorm over the last dim in float32; returns ``out_dtype`` (default: x's dtype)."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _RMSNorm.apply(x, weight, eps, out_dtype)
    out = F.rms_norm(_acc(x), (x.shape[-1],), _acc(weight), eps)  # inference: no autograd.Function overhead
    want = out_dtype or x.dtype
    return out if out.dtype == want else out.to(want)
