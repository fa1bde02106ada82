"""Pieces shared by the model families: seeded init that ignores sharding, the KV cache, attention masks.

Legend: B batch, T new tokens, S cached key slots, H query heads, K kv heads, Dh head dim.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.models.kernels import probs_attention, probs_attention_ok


def ffn_hidden_default(d_model: int, multiple: int = 64) -> int:
    """~8/3·d_model rounded up to ``multiple`` (the SwiGLU size with the parameter count of a 4·d MLP)."""
    return multiple * math.ceil(8 * d_model / 3 / multiple)


@torch.no_grad()
def fill_normal_(param: torch.Tensor, std: float, gen: Optional[torch.Generator]) -> None:
    """Fill ``param`` from N(0, std²), drawing the FULL tensor on CPU so values do not depend on device or
    sharding (DTensor parameters receive their local shard of the same full tensor)."""
    full = torch.empty(param.shape, dtype=torch.float32).normal_(0.0, std, generator=gen)
    _assign(param, full)


@torch.no_grad()
def fill_const_(param: torch.Tensor, value: float) -> None:
    _assign(param, torch.full(param.shape, value, dtype=torch.float32))


def _assign(param: torch.Tensor, full: torch.Tensor) -> None:
    try:
        from torch.distributed.tensor import DTensor, distribute_tensor
    except ImportError:  # pragma: no cover - torch without distributed
        DTensor = ()  # type: ignore[assignment]
    if isinstance(param, DTensor):
        mesh = param.device_mesh
        full = full.to(device=mesh.device_type, dtype=param.dtype)
        full = distribute_tensor(full, mesh, param.placements, src_data_rank=None)
    param.copy_(full.to(param.dtype) if not isinstance(param, DTensor) else full)


def init_generator(seed: Optional[int]) -> Optional[torch.Generator]:
    if seed is None:
        return None
    return torch.Generator(device="cpu").manual_seed(int(seed))


class KVCache:
    """Per-layer key/value buffers for incremental decoding.

    The interface every cache implements (a paged serving cache included): the model calls
    ``begin(T, pad_mask_BT)`` before a forward of T new tokens, ``attn_mask(T)`` for its mask and ``advance(T)``
    after it; each attention layer calls ``update(layer, k, v)``; ``pos`` is the number of slots filled.
    Here ``k[i]``/``v[i]`` are [B, K, S_max, Dh], allocated lazily at the first write (dtype follows the keys,
    so bf16 autocast gives a bf16 cache), and ``valid_BS`` marks real (non-padding) slots.
    """

    def __init__(self, batch_size: int, max_len: int, n_layers: int, device: torch.device | str = "cpu"):
        self.batch_size, self.max_len, self.n_layers = batch_size, max_len, n_layers
        self.k: list[Optional[torch.Tensor]] = [None] * n_layers
        self.v: list[Optional[torch.Tensor]] = [None] * n_layers
        self.valid_BS = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.pos = 0
        self.has_padding = False

    def begin(self, T: int, pad_mask_BT: Optional[torch.Tensor]) -> None:
        """Reserve ``T`` slots for the next forward; ``pad_mask_BT`` True = real token."""
        if self.pos + T > self.max_len:
            raise ValueError(f"KV cache full: {self.pos} + {T} tokens > max_len {self.max_len}")
        if pad_mask_BT is None:
            self.valid_BS[:, self.pos:self.pos + T] = True
        else:
            self.valid_BS[:, self.pos:self.pos + T] = pad_mask_BT.to(torch.bool)
            self.has_padding = self.has_padding or not bool(pad_mask_BT.all())

    def update(self, layer: int, k_BKTD: torch.Tensor, v_BKTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new keys/values at [pos, pos+T) and return views of all filled slots."""
        if self.k[layer] is None:
            B, K, _, Dh = k_BKTD.shape
            shape = (B, K, self.max_len, Dh)
            self.k[layer] = torch.zeros(shape, dtype=k_BKTD.dtype, device=k_BKTD.device)
            self.v[layer] = torch.zeros(shape, dtype=v_BKTD.dtype, device=v_BKTD.device)
        T = k_BKTD.shape[2]
        end = self.pos + T
        self.k[layer][:, :, self.pos:end] = k_BKTD
        self.v[layer][:, :, self.pos:end] = v_BKTD
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, T: int) -> None:
        self.pos += T

    def attn_mask(self, T: int) -> Optional[torch.Tensor]:
        """Boolean [B, 1, T, S] mask for T new queries (None when plain causal attention suffices)."""
        S = self.pos + T
        if not self.has_padding:
            if T == 1:
                return None  # one query sees every cached slot
            if self.pos == 0:
                return None  # caller uses is_causal=True
        q_pos = torch.arange(self.pos, S, device=self.valid_BS.device)
        k_pos = torch.arange(S, device=self.valid_BS.device)
        causal_TS = k_pos[None, :] <= q_pos[:, None]
        mask_BTS = causal_TS[None] & self.valid_BS[:, None, :S]
        mask_BTS = mask_BTS | (k_pos[None, :] == q_pos[:, None])[None]  # padding queries see themselves: no NaN
        return mask_BTS[:, None]


def attention_mask(T: int, pad_mask_BT: Optional[torch.Tensor] = None, doc_ids_BT: Optional[torch.Tensor] = None,
                   causal: bool = True) -> Optional[torch.Tensor]:
    """Boolean [B, 1, T, T] (True = may attend), or None when neither padding nor documents are given:
    keep[b, i, j] = (j ≤ i if causal) ∧ (doc[b, i] = doc[b, j]) ∧ pad[b, j], then ∨ (i = j) so that every
    query sees itself and padding rows stay finite."""
    if pad_mask_BT is None and doc_ids_BT is None:
        return None
    dev = (pad_mask_BT if pad_mask_BT is not None else doc_ids_BT).device
    keep = torch.ones(1, 1, T, T, dtype=torch.bool, device=dev)
    if causal:
        keep = keep.tril()
    if doc_ids_BT is not None:
        keep = keep & (doc_ids_BT[:, :, None] == doc_ids_BT[:, None, :])[:, None]
    if pad_mask_BT is not None:
        keep = keep & pad_mask_BT.to(torch.bool)[:, None, None, :]
    return keep | torch.eye(T, dtype=torch.bool, device=dev)


def attention(q_BHTD: torch.Tensor, k_BKSD: torch.Tensor, v_BKSD: torch.Tensor, mask: Optional[torch.Tensor],
              causal: bool, dropout_p: float = 0.0) -> torch.Tensor:
    """SDPA with grouped-query heads expanded (K → H) only when needed; CPU training with a small enough
    [T, S] takes ``kernels.probs_attention`` instead (same math, faster backward there)."""
    H, K = q_BHTD.shape[1], k_BKSD.shape[1]
    if H != K:
        rep = H // K
        k_BKSD = k_BKSD.repeat_interleave(rep, dim=1)
        v_BKSD = v_BKSD.repeat_interleave(rep, dim=1)
    if (mask is None or mask.dtype == torch.bool) and probs_attention_ok(q_BHTD, k_BKSD, dropout_p):
        return probs_attention(q_BHTD, k_BKSD, v_BKSD, mask, causal)
    return F.scaled_dot_product_attention(q_BHTD, k_BKSD, v_BKSD, attn_mask=mask, dropout_p=dropout_p,
                                          is_causal=causal and mask is None)


class SelfAttention(nn.Module):
    """The tail every attention shares: KV-cache write, (masked) attention, output projection ``wo``.
    Subclasses own the projections ``wq``/``wk``/``wv``/``wo`` and set ``head_dim`` and ``dropout``."""

    def project(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [B, T, H, Dh], k and v [B, T, K, Dh]; a projection may be swapped (LoRA, TP): sizes come from
        its output."""
        B, T, _ = x_BTD.shape
        return tuple(lin(x_BTD).view(B, T, -1, self.head_dim) for lin in (self.wq, self.wk, self.wv))

    def attend(self, q_BHTD: torch.Tensor, k_BKTD: torch.Tensor, v_BKTD: torch.Tensor, mask: Optional[torch.Tensor],
               cache: Optional[KVCache], layer_idx: int, causal: bool = True) -> torch.Tensor:
        B, _, T, _ = q_BHTD.shape
        if cache is not None:
            k_BKTD, v_BKTD = cache.update(layer_idx, k_BKTD, v_BKTD)
            causal = mask is None and T > 1
        out_BHTD = attention(q_BHTD, k_BKTD, v_BKTD, mask, causal, self.dropout if self.training else 0.0)
        return self.wo(out_BHTD.transpose(1, 2).reshape(B, T, -1))


def count_params(model: nn.Module, exclude_embeddings: bool = False) -> int:
    """Parameters (tied ones once); ``exclude_embeddings`` leaves out every nn.Embedding table (tokens,
    positions, token types) and so a head tied to one."""
    n = sum(p.numel() for p in model.parameters())
    if exclude_embeddings:
        n -= sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Embedding))
    return n


def linear_weights(module: nn.Module) -> int:
    """Number of weights that take part in matmuls (every nn.Linear weight, tied ones included)."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))
