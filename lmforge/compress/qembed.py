"""Int8 embedding tables: ``name.qweight`` int8 [V, D] and ``name.scale`` float32 [V] (symmetric per row, the
linears' quantizer ``qlinear.quantize_weight``). A lookup dequantizes only the rows it reads, so a table costs
a quarter of its float bytes on disk and in memory.

Only tables that no other module shares are quantized (``embedding_targets``): a tied output head (Llama or
GPT-2 with ``tie_embeddings``) keeps its table in float, since the head is a matmul over every row. The one
exception is BERT's MLM head, tied to the token table: a compressed classifier's backbone never runs it, so
the loader leaves it out once the table is int8 (``swap_in_embeddings``).
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn


class QuantizedEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, device=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.register_buffer("qweight", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.ones(num_embeddings, dtype=torch.float32, device=device))

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized float table (for exports; lookups do not build it)."""
        return self.qweight.float() * self.scale[:, None]

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 rows"

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.qweight[ids].float() * self.scale[ids].unsqueeze(-1)


def embedding_targets(model: nn.Module) -> list[str]:
    """The ``nn.Embedding`` modules whose table no other module holds (not tied to a head)."""
    holders = Counter(id(p) for m in model.modules() for p in m.parameters(recurse=False))
    return [n for n, m in model.named_modules() if type(m) is nn.Embedding and holders[id(m.weight)] == 1]


def swap_in_embeddings(model: nn.Module, names: list[str], fill: bool) -> None:
    """Replace each named ``nn.Embedding`` by a ``QuantizedEmbedding``; ``fill``: quantize its table (else the
    buffers stay empty for a checkpoint to fill)."""
    from lmforge.compress.qlinear import quantize_weight

    for name in names:
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        emb = getattr(owner, leaf)
        dev = emb.weight.device if emb.weight.device.type != "meta" else "cpu"
        q = QuantizedEmbedding(emb.num_embeddings, emb.embedding_dim, device=dev)
        if fill:
            qweight, scale = quantize_weight(emb.weight)
            q.qweight.copy_(qweight)
            q.scale.copy_(scale)
        setattr(owner, leaf, q)
        head = getattr(model, "mlm_head", None)
        if head is not None and head.decoder.weight is emb.weight:
            model.mlm_head = None  # BERT's MLM head shares the table; a classifier's backbone never runs it


def dequantized_embeddings(model: nn.Module) -> None:
    """Every ``QuantizedEmbedding`` back to a float ``nn.Embedding`` (in place; formats with no int8 form)."""
    for name, m in list(model.named_modules()):
        if isinstance(m, QuantizedEmbedding):
            emb = nn.Embedding(m.num_embeddings, m.embedding_dim)
            with torch.no_grad():
                emb.weight.copy_(m.weight)
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, emb)
