"""Hand-written autograd for memory-bound ops, so the backward does not replay a chain of small kernels.

``rope(x, cos, sin_signed)``: HF "rotate half" RoPE; its backward is the inverse rotation.
``rms_norm(x, weight, eps, out_dtype)``: RMSNorm computed in float32, output optionally cast (bf16 autocast).
``probs_attention(q, k, v, mask, causal)``: attention that keeps its softmax probabilities for the backward.
On CPU, for the short sequences this project trains on, four batched matmuls and one fused softmax backward
beat SDPA's flash kernel (which recomputes the scores in tiles) by ~2.5× fwd+bwd in bf16 (B8 H6 T256 Dh64).

Legend: B batch, T tokens, H heads, Dh head dim, D features.
"""

from __future__ import annotations

import math
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


class _ProbsAttention(torch.autograd.Function):
    """softmax(q·kᵀ/√Dh + mask)·v with the probabilities P saved: dV = Pᵀ·dO, dS = softmax_bwd(dO·vᵀ, P),
    dQ = dS·k/√Dh, dK = dSᵀ·q/√Dh. Matmuls run in the inputs' dtype; softmax accumulates in float32."""

    @staticmethod
    def forward(ctx, q_BHTD, k_BHSD, v_BHSD, hide_BHTS):
        scale = 1.0 / math.sqrt(q_BHTD.shape[-1])
        with torch.autocast(q_BHTD.device.type, enabled=False):
            s_BHTS = torch.matmul(q_BHTD * scale, k_BHSD.transpose(-1, -2))
            if hide_BHTS is not None:
                s_BHTS.masked_fill_(hide_BHTS, float("-inf"))
            p_BHTS = torch.softmax(s_BHTS, -1)
            out = torch.matmul(p_BHTS, v_BHSD)
        ctx.save_for_backward(q_BHTD, k_BHSD, v_BHSD, p_BHTS)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, g_BHTD):
        q, k, v, p = ctx.saved_tensors
        with torch.autocast(q.device.type, enabled=False):
            g = g_BHTD.to(v.dtype)
            dv = torch.matmul(p.transpose(-1, -2), g)
            ds = torch._softmax_backward_data(torch.matmul(g, v.transpose(-1, -2)), p, -1, p.dtype)
            dq = torch.matmul(ds, k).mul_(ctx.scale)
            dk = torch.matmul(ds.transpose(-1, -2), q).mul_(ctx.scale)
        return dq, dk, dv, None


PROBS_ATTENTION_MAX_BYTES = 256 * 2**20  # P per layer; above this, SDPA's tiled kernel (no [T, S] state)


def probs_attention_ok(q_BHTD: torch.Tensor, k_BHSD: torch.Tensor, dropout_p: float) -> bool:
    """Worth it on CPU in half precision, without dropout, while P stays small: in training (its backward is
    faster; in float32 SDPA is ~10% faster) and for a one-query decode step, where SDPA's CPU flash kernel is
    4-7x slower in bf16 (B16 H6 S96 Dh64: 962 vs 221 us; S256: 3031 vs 417 us, one AVX-512-bf16 thread).
    Prompts (T > 1) at inference stay on SDPA: there the two are within ~2x either way."""
    B, H, T, _ = q_BHTD.shape
    if not (q_BHTD.device.type == "cpu" and q_BHTD.dtype in (torch.bfloat16, torch.float16) and dropout_p == 0.0
            and B * H * T * k_BHSD.shape[-2] * q_BHTD.element_size() <= PROBS_ATTENTION_MAX_BYTES):
        return False
    training = torch.is_grad_enabled() and (q_BHTD.requires_grad or k_BHSD.requires_grad)
    return training or T == 1


def probs_attention(q_BHTD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor,
                    mask: Optional[torch.Tensor], causal: bool) -> torch.Tensor:
    """Same result as ``F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)`` for a
    boolean ``mask`` (True = attend) or ``causal`` (top-left aligned, as SDPA); q, k, v of one dtype."""
    T, S = q_BHTD.shape[-2], k_BHSD.shape[-2]
    if mask is not None and mask.dtype != torch.bool:
        raise ValueError(f"probs_attention: boolean mask expected, got {mask.dtype}")
    if mask is not None:
        hide = mask.logical_not()
    else:  # causal: hide the keys after each query
        hide = torch.ones(T, S, dtype=torch.bool, device=q_BHTD.device).triu_(1) if causal else None
    dt = torch.promote_types(q_BHTD.dtype, torch.promote_types(k_BHSD.dtype, v_BHSD.dtype))
    return _ProbsAttention.apply(q_BHTD.to(dt), k_BHSD.to(dt), v_BHSD.to(dt), hide)
