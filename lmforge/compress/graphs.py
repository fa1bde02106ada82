"""Export-friendly forms of lmforge models and the runners that execute the exported graphs.

- ``LogitsGraph(lm)``: ``forward(tokens_BT) -> logits_BTV`` (KV-cache-free).
- ``DecodeGraph(lm)``: ``forward(tokens_BT, past_k_LBKSD, past_v_LBKSD) -> (logits_BTV, k_LBKSD', v_LBKSD')``:
  T new tokens after S cached positions (S = 0: the prefill), the cache returned grown by T. It drives the
  model's own cache protocol through ``TensorCache`` (``begin`` / ``attn_mask`` / ``update`` / ``advance`` /
  ``pos``: see ``models.common.KVCache``) with tensors instead of preallocated buffers, so the graph has no
  side effects.
- ``ClassifierGraph(task_model)``: ``forward(input_ids_BT, attention_mask_BT) -> logits_BK``.
- ``GraphDecoder``: an exported ``DecodeGraph`` (ONNX Runtime session or ``.pt2`` program) behind the interface
  ``models.generate`` uses (``new_cache`` + ``forward(tokens, cache=...)``), so the decode benchmark and
  generation run it; ``GraphClassifier`` likewise for classifiers.

Legend: B batch, T new tokens, S cached positions, L layers, K kv heads, Dh head dim, V vocab.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from lmforge.models.losses import IGNORE_INDEX


class LogitsGraph(nn.Module):
    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, tokens_BT: torch.Tensor) -> torch.Tensor:
        return self.lm(tokens_BT)


class TensorCache:
    """The cache protocol over past tensors (module doc): ``update`` concatenates, the new full keys/values are
    collected for the graph's outputs."""

    def __init__(self, past_k_LBKSD: torch.Tensor, past_v_LBKSD: torch.Tensor):
        self.past_k, self.past_v = past_k_LBKSD, past_v_LBKSD
        self.pos = past_k_LBKSD.shape[3]
        self.k: list = [None] * past_k_LBKSD.shape[0]
        self.v: list = [None] * past_k_LBKSD.shape[0]

    def begin(self, T: int, pad_mask_BT) -> None:
        if pad_mask_BT is not None:
            raise ValueError("the exported decode step takes unpadded rows")

    def attn_mask(self, T: int) -> torch.Tensor:
        """[1, 1, T, S+T]: query i (position S+i) sees keys 0..S+i."""
        q = torch.arange(T, device=self.past_k.device)[:, None] + self.pos
        k = torch.arange(self.pos + T, device=self.past_k.device)[None, :]
        return (k <= q)[None, None]

    def update(self, layer: int, k_BKTD: torch.Tensor, v_BKTD: torch.Tensor):
        self.k[layer] = torch.cat([self.past_k[layer], k_BKTD], dim=2)
        self.v[layer] = torch.cat([self.past_v[layer], v_BKTD], dim=2)
        return self.k[layer], self.v[layer]

    def advance(self, T: int) -> None:
        pass


class DecodeGraph(nn.Module):
    """Batch, new tokens T and cached positions S are dynamic (S = 0 is the prefill); the position tables bound
    them: S + T ≤ model.max_seq_len is the caller's to keep."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, tokens_BT, past_k_LBKSD, past_v_LBKSD):
        cache = TensorCache(past_k_LBKSD, past_v_LBKSD)
        logits_BTV = self.lm(tokens_BT, cache=cache)
        return logits_BTV, torch.stack(cache.k), torch.stack(cache.v)


class ClassifierGraph(nn.Module):
    def __init__(self, task_model: nn.Module):
        super().__init__()
        self.task_model = task_model

    def forward(self, input_ids_BT, attention_mask_BT):
        return self.task_model(input_ids_BT, attention_mask_BT)


def cache_shape(lm: nn.Module, B: int, S: int) -> tuple[int, ...]:
    c = lm.cfg
    return (c.n_layers, B, c.n_kv_heads or c.n_heads, S, c.dims_per_head)


def empty_past(lm: nn.Module, B: int, S: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    shape = cache_shape(lm, B, S)
    return torch.zeros(shape), torch.zeros(shape)


def session(path, threads: Optional[int] = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


class _GraphCache:
    def __init__(self, k, v):
        self.k, self.v = k, v


class GraphDecoder(nn.Module):
    """An exported ``DecodeGraph`` (``run(tokens_BT, k, v) -> (logits, k, v)``: an ONNX Runtime session or a
    loaded ``.pt2`` program) behind the interface ``models.generate`` uses (unpadded rows), and
    ``forward(tokens, labels_BT=...)`` for the perplexity (a prefill from an empty cache)."""

    def __init__(self, run, lm_cfg, numpy: bool, full=None):
        super().__init__()
        self.run, self.cfg, self.numpy, self.full = run, lm_cfg, numpy, full  # full: the cache-free graph
        self._anchor = nn.Parameter(torch.zeros(()), requires_grad=False)  # generate() asks for a device

    def new_cache(self, batch_size: int, max_len: int = 0, device=None) -> _GraphCache:
        c = self.cfg
        shape = (c.n_layers, batch_size, c.n_kv_heads or c.n_heads, 0, c.dims_per_head)
        k, v = torch.zeros(shape), torch.zeros(shape)
        return _GraphCache(k.numpy(), v.numpy()) if self.numpy else _GraphCache(k, v)

    def forward(self, tokens_BT: torch.Tensor, doc_ids_BT=None, *, cache: Optional[_GraphCache] = None,
                positions_BT=None, pad_mask_BT=None, labels_BT=None, reduction: str = "mean") -> torch.Tensor:
        if positions_BT is not None or pad_mask_BT is not None or doc_ids_BT is not None:
            raise ValueError("the exported decode graph takes unpadded rows (one prompt, or prompts of one length)")
        x = tokens_BT.numpy() if self.numpy else tokens_BT
        if cache is None and self.full is not None:
            logits = self.full(x)
        else:
            cache = cache if cache is not None else self.new_cache(tokens_BT.shape[0])
            logits, cache.k, cache.v = self.run(x, cache.k, cache.v)
        logits = torch.from_numpy(logits) if self.numpy else logits
        if labels_BT is None:
            return logits
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels_BT.flatten(), ignore_index=IGNORE_INDEX,
                                                 reduction=reduction)


def ort_decoder(path, lm_cfg, threads: Optional[int] = None, forward_path=None) -> GraphDecoder:
    sess = session(path, threads)
    names = [i.name for i in sess.get_inputs()]
    full = None
    if forward_path is not None:
        fsess = session(forward_path, threads)
        full = lambda x: fsess.run(None, {"tokens_BT": x})[0]  # noqa: E731
    return GraphDecoder(lambda x, k, v: sess.run(None, dict(zip(names, (x, k, v)))), lm_cfg, numpy=True, full=full)


def load_pt2(path) -> nn.Module:
    """A saved ``.pt2`` program as a callable module, its shape guards not re-run: after a save/load round trip
    the generated guard function raised AttributeError on every input here (torch 2.13), while the program
    itself is correct (the command's parity check runs it); the bounds are the caller's (``DecodeGraph``)."""
    return torch.export.load(str(path)).module(check_guards=False)


def pt2_decoder(path, lm_cfg, forward_path=None) -> GraphDecoder:
    prog = load_pt2(path)
    fprog = load_pt2(forward_path) if forward_path is not None else None
    full = (lambda x: fprog(x)) if fprog is not None else None  # a closure: not a submodule (train() would fail)
    return GraphDecoder(lambda x, k, v: prog(x, k, v), lm_cfg, numpy=False, full=full)


class GraphClassifier(nn.Module):
    def __init__(self, run, numpy: bool):
        super().__init__()
        self.run, self.numpy = run, numpy
        self._anchor = nn.Parameter(torch.zeros(()), requires_grad=False)

    def forward(self, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor) -> torch.Tensor:
        ids, mask = input_ids_BT, attention_mask_BT.to(torch.int64)
        if self.numpy:
            return torch.from_numpy(self.run(ids.numpy(), mask.numpy()))
        return self.run(ids, mask)


def ort_classifier(path, threads: Optional[int] = None) -> GraphClassifier:
    sess = session(path, threads)
    names = [i.name for i in sess.get_inputs()]
    return GraphClassifier(lambda a, b: sess.run(None, dict(zip(names, (a, b))))[0], numpy=True)


def pt2_classifier(path) -> GraphClassifier:
    prog = load_pt2(path)
    return GraphClassifier(lambda a, b: prog(a, b), numpy=False)
