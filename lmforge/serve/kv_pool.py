"""Paged KV-cache pool for the server: fixed-size blocks shared by every running sequence.

The pool preallocates, per layer, keys and values of shape [N_blocks, bs, K, Dh]. A sequence owns a
*block table* (list of block ids); token ``p`` of a sequence lives in block ``table[p // bs]`` at offset
``p % bs``. Memory therefore grows with the tokens a sequence really holds, not with the model's context
length, and a block returns to the free list the moment its last owner finishes (refcounts let the n
choices of one prompt share the prompt's full blocks).

Attention in the models wants [B, K, S, Dh] keys. ``StepCache`` is the per-forward object the model sees
(the same duck-typed interface as ``lmforge.models.common.KVCache``: ``pos``, ``begin``, ``attn_mask``,
``update``, ``advance``): ``update`` scatters the step's new keys into their slots, then gathers the batch's
block tables into one transient per-layer view. The token-major block layout makes that gather one
``index_select`` of whole contiguous blocks along dim 0, and the gathered [B, N·bs, K, Dh] is already the
[B, K, S, Dh] view after a transpose (no second copy). Block 0 is a scratch block owned by nobody:
padding rows and table padding point at it, and the mask hides it.

Legend: B rows in the step, T new tokens per row, S key slots in the view (a multiple of bs), N blocks
per row in the view, K kv heads, Dh head dim, bs block size.
"""

from __future__ import annotations

from collections import deque
from typing import Optional, Sequence

import torch

SCRATCH_BLOCK = 0


class BlockPool:
    """Free list + refcounts + reservations over block ids 1..num_blocks-1 (0 is the scratch block).

    A sequence *reserves* the blocks it may ever need when it is admitted and *allocates* them lazily as
    it grows, so a running sequence never waits for memory and nothing is ever preempted."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 2:
            raise ValueError(f"KV pool needs at least 2 blocks, got {num_blocks}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free: deque[int] = deque(range(1, num_blocks))
        self._refs = [0] * num_blocks
        self.reserved = 0  # blocks promised to admitted sequences but not yet allocated
        self.pinned = 0  # blocks taken for the server's own use (the health probe), outside capacity

    @property
    def capacity(self) -> int:
        return self.num_blocks - 1 - self.pinned

    @property
    def num_free(self) -> int:
        return len(self._free)

    def usage(self) -> float:
        """Fraction of usable blocks held by sequences (vllm:kv_cache_usage_perc)."""
        return 1.0 - len(self._free) / self.capacity

    def pin(self) -> int:
        """A block for the server itself, never handed out and not counted in capacity or usage."""
        self.reserve(1)
        block = self.allocate_reserved()
        self.pinned += 1
        return block

    def can_reserve(self, n: int) -> bool:
        return len(self._free) - self.reserved >= n

    def reserve(self, n: int) -> None:
        if not self.can_reserve(n):
            raise RuntimeError(f"KV pool: cannot reserve {n} blocks ({self.num_free} free, {self.reserved} promised)")
        self.reserved += n

    def unreserve(self, n: int) -> None:
        self.reserved -= n
        assert self.reserved >= 0, "KV pool: reservation accounting went negative"

    def allocate_reserved(self) -> int:
        """Take one block out of an existing reservation."""
        self.unreserve(1)
        block = self._free.popleft()
        self._refs[block] = 1
        return block

    def share(self, block: int) -> int:
        self._refs[block] += 1
        return block

    def release(self, blocks: Sequence[int]) -> None:
        for b in blocks:
            self._refs[b] -= 1
            if self._refs[b] == 0:
                self._free.append(b)
            assert self._refs[b] >= 0, f"KV pool: block {b} released twice"


def blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


class PagedKV:
    """The preallocated key/value storage: per layer [num_blocks, bs, K, Dh] (zero-filled, so the scratch
    block and unwritten slots are finite and masked-out keys cannot produce NaN)."""

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        shape = (num_blocks, block_size, n_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.block_size, self.num_blocks, self.device = block_size, num_blocks, torch.device(device)

    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def copy_block(self, src: int, dst: int) -> None:
        for t in self.k + self.v:
            t[dst].copy_(t[src])


class StepCache:
    """The cache one forward pass sees: rows with ``ctx_lens[b]`` tokens already cached each add ``T``.

    ``attn_mask``: key slot ``j`` of row ``b`` is visible to new token ``t`` iff ``j <= ctx_lens[b] + t``
    (causal within the row; slots past the row's length and the scratch block are hidden).
    ``update``: writes k/v of token t at slot table[b][(c+t)//bs]*bs + (c+t)%bs, then returns the gathered
    views [B, K, S, Dh] with S = N·bs, N = the most blocks any row of this step needs."""

    pos = 0  # the models read it only when no positions_BT are passed; the server always passes them

    def __init__(self, kv: PagedKV, tables: Sequence[Sequence[int]], ctx_lens: Sequence[int], T: int,
                 min_blocks: int = 1):
        bs, dev = kv.block_size, kv.device
        self.kv, self.T = kv, T
        B = len(tables)
        N = max([min_blocks] + [blocks_for(c + T, bs) for c in ctx_lens])
        table_BN = torch.full((B, N), SCRATCH_BLOCK, dtype=torch.long)
        for b, tab in enumerate(tables):
            need = blocks_for(ctx_lens[b] + T, bs)
            if len(tab) < need:
                raise RuntimeError(f"StepCache: row {b} has {len(tab)} blocks, needs {need}")
            table_BN[b, :need] = torch.as_tensor(list(tab[:need]), dtype=torch.long)
        ctx_B = torch.as_tensor(list(ctx_lens), dtype=torch.long)
        pos_BT = ctx_B[:, None] + torch.arange(T)[None, :]
        self.positions_BT = pos_BT.to(dev)
        blk_BT = table_BN.gather(1, pos_BT // bs)
        self._slots = (blk_BT * bs + pos_BT % bs).reshape(-1).to(dev)  # [B*T] flat slot ids
        self._blocks = table_BN.reshape(-1).to(dev)  # [B*N]
        self.B, self.N, self.S = B, N, N * bs
        k_pos_S = torch.arange(self.S)
        self._mask = (k_pos_S[None, None, :] <= pos_BT[:, :, None])[:, None].to(dev)  # [B, 1, T, S]

    def begin(self, T: int, pad_mask_BT: Optional[torch.Tensor]) -> None:
        if T != self.T:
            raise RuntimeError(f"StepCache built for {self.T} new tokens, the model fed {T}")
        if pad_mask_BT is not None:
            raise RuntimeError("StepCache rows carry their own lengths; pad_mask_BT is not used")

    def attn_mask(self, T: int) -> torch.Tensor:
        return self._mask

    def update(self, layer: int, k_BKTD: torch.Tensor, v_BKTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kp, vp = self.kv.k[layer], self.kv.v[layer]
        nb, bs, K, Dh = kp.shape
        flat = (nb * bs, K, Dh)
        kp.view(flat).index_copy_(0, self._slots, k_BKTD.transpose(1, 2).reshape(-1, K, Dh).to(kp.dtype))
        vp.view(flat).index_copy_(0, self._slots, v_BKTD.transpose(1, 2).reshape(-1, K, Dh).to(vp.dtype))
        k_BSKD = kp.index_select(0, self._blocks).view(self.B, self.S, K, Dh)
        v_BSKD = vp.index_select(0, self._blocks).view(self.B, self.S, K, Dh)
        return k_BSKD.transpose(1, 2), v_BSKD.transpose(1, 2)

    def advance(self, T: int) -> None:
        """Lengths are the scheduler's bookkeeping; nothing to do here."""
