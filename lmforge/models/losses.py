"""Losses that fuse the output projection with cross-entropy, chunk by chunk.

``linear_cross_entropy(h_ND, weight_VD, labels_N)`` equals ``F.cross_entropy(F.linear(h, W).float(), labels)``
but never holds the full [N, V] logits (nor their float copy, log-softmax and its gradient): each chunk of
rows computes logits, the loss and the gradients for h and W right away in the forward, and the backward
only scales them. Logits are accumulated in float32 whatever the matmul dtype.

Chunk size (``chunk_rows``): 512 rows on a CPU (what the CPU numerics and its bitwise resume tests fix). On a
GPU the matmuls [C, D]·[D, V] want a larger C to reach tensor-core rates and to launch fewer kernels, so C is
the largest multiple of 128 whose float32 [C, V] logits fit ``CUDA_CHUNK_BYTES`` (256 MiB: 2048 rows at
V = 32000), never below 512. Per chunk the transient memory is C·V·(4 + compute bytes).

Legend: N rows (B·T), D hidden, V vocab, C rows per chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # label of a position that takes no loss (PyTorch's cross_entropy default); the only copy
CPU_CHUNK_ROWS = 512
CUDA_CHUNK_BYTES = 256 * 2**20


def chunk_rows(vocab: int, device: torch.device | str) -> int:
    """Rows per chunk of ``linear_cross_entropy`` on ``device`` (see the module docstring)."""
    if torch.device(device).type != "cuda":
        return CPU_CHUNK_ROWS
    return max(CPU_CHUNK_ROWS, CUDA_CHUNK_BYTES // (4 * vocab) // 128 * 128)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_ND, weight_VD, labels_N, ignore_index: int, chunk: int, compute_dtype, reduction: str):
        N = h_ND.shape[0]
        dtype = compute_dtype or h_ND.dtype
        h = h_ND.to(dtype)
        w = weight_VD.to(dtype)
        valid_N = labels_N != ignore_index
        n_valid = valid_N.sum().clamp(min=1) if reduction == "mean" else torch.ones((), device=h.device)
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if needs_grad else None
        grad_w = torch.zeros(weight_VD.shape, dtype=torch.float32, device=w.device) if needs_grad else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, N, chunk):
            h_CD, y_C, ok_C = h[s:s + chunk], labels_N[s:s + chunk], valid_N[s:s + chunk]
            logits_CV = (h_CD @ w.t()).float()
            safe_y = torch.where(ok_C, y_C, torch.zeros_like(y_C))
            tgt_C = logits_CV.gather(1, safe_y[:, None]).squeeze(1)
            max_C1 = logits_CV.amax(-1, keepdim=True)
            exp_CV = logits_CV.sub_(max_C1).exp_()  # in place: logits are not needed any more
            sum_C = exp_CV.sum(-1)
            lse_C = max_C1.squeeze(1) + sum_C.log()
            total += ((lse_C - tgt_C) * ok_C).sum()
            if needs_grad:
                # d(loss)/d(logits) = (softmax - onehot) / n_valid, zero on ignored rows
                scale_C = ok_C.float() / n_valid
                g_CV = exp_CV.mul_((scale_C / sum_C)[:, None])
                g_CV.scatter_add_(1, safe_y[:, None], -scale_C[:, None])
                g_CV = g_CV.to(dtype)
                grad_h[s:s + chunk] = g_CV @ w
                grad_w.add_(g_CV.t() @ h_CD)
            del logits_CV, exp_CV  # free this chunk's buffers before the next chunk allocates its own
            g_CV = None
        if needs_grad:
            ctx.save_for_backward(grad_h, grad_w)
        ctx.in_dtypes = (h_ND.dtype, weight_VD.dtype)
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = (grad_h * grad_out.to(grad_h.dtype)).to(ctx.in_dtypes[0]) if ctx.needs_input_grad[0] else None
        gw = (grad_w * grad_out).to(ctx.in_dtypes[1]) if ctx.needs_input_grad[1] else None
        return gh, gw, None, None, None, None, None


def linear_cross_entropy(h_ND: torch.Tensor, weight_VD: torch.Tensor, labels_N: torch.Tensor,
                         ignore_index: int = IGNORE_INDEX, chunk_size: int | None = None,
                         reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of ``h @ weight.T`` against ``labels`` over rows whose label != ignore_index;
    ``reduction`` "mean" (over those rows) or "sum". ``chunk_size`` None: ``chunk_rows(V, device)``.

    Under CPU/CUDA autocast the matmuls run in the autocast dtype (as ``nn.Linear`` would)."""
    if h_ND.dim() != 2 or labels_N.dim() != 1 or h_ND.shape[0] != labels_N.shape[0]:
        raise ValueError(f"linear_cross_entropy: expected h [N, D] and labels [N], got {tuple(h_ND.shape)} "
                         f"and {tuple(labels_N.shape)}")
    _check_reduction("linear_cross_entropy", reduction)
    dev = h_ND.device.type
    compute_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
    if compute_dtype is None and h_ND.dtype != weight_VD.dtype:
        compute_dtype = weight_VD.dtype
    chunk = chunk_size or chunk_rows(weight_VD.shape[0], h_ND.device)
    with torch.autocast(dev, enabled=False):
        return _LinearCrossEntropy.apply(h_ND, weight_VD, labels_N, ignore_index, chunk, compute_dtype, reduction)


def cross_entropy(logits_NV: torch.Tensor, labels_N: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                  reduction: str = "mean") -> torch.Tensor:
    """Reference path: float32 cross-entropy on materialised logits."""
    _check_reduction("cross_entropy", reduction)
    return F.cross_entropy(logits_NV.float(), labels_N, ignore_index=ignore_index, reduction=reduction)


def _check_reduction(fn: str, reduction: str) -> None:
    if reduction not in ("mean", "sum"):
        raise ValueError(f"{fn}: reduction must be 'mean' or 'sum', got {reduction!r}")


def fused_head_ok(head: torch.nn.Module) -> bool:
    """The fused path reads ``head.weight`` directly: only for a plain, bias-free, unsharded nn.Linear."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        DTensor = ()  # type: ignore[assignment]
    return type(head) is torch.nn.Linear and head.bias is None and not isinstance(head.weight, DTensor)
