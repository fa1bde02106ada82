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

    ``k[i]``/``v[i]``: [B, K, S_max, Dh], allocated lazily at the first write (dtype follows the keys, so
    bf16 autocast gives a bf16 cache). ``valid_BS`` marks real (non-padding) slots; ``pos`` is the number
    of slots filled so far.
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


def doc_causal_mask(doc_ids_BT: torch.Tensor) -> torch.Tensor:
    """Block-diagonal causal mask [B, 1, T, T]: a token attends to earlier tokens of its own document."""
    T = doc_ids_BT.shape[1]
    causal_TT = torch.ones(T, T, dtype=torch.bool, device=doc_ids_BT.device).tril()
    same_BTT = doc_ids_BT[:, :, None] == doc_ids_BT[:, None, :]
    return (same_BTT & causal_TT)[:, None]


def pad_causal_mask(pad_mask_BT: torch.Tensor, doc_ids_BT: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Causal mask [B, 1, T, T] that also hides padding keys (True = real token) and, if given, other
    documents; every query still sees itself so padding rows stay finite."""
    T = pad_mask_BT.shape[1]
    mask = doc_causal_mask(doc_ids_BT) if doc_ids_BT is not None else \
        torch.ones(T, T, dtype=torch.bool, device=pad_mask_BT.device).tril()[None, None]
    eye = torch.eye(T, dtype=torch.bool, device=pad_mask_BT.device)
    return (mask & pad_mask_BT.to(torch.bool)[:, None, None, :]) | eye


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


def linear_weights(module: nn.Module) -> int:
    """Number of weights that take part in matmuls (every nn.Linear weight, tied ones included)."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))
