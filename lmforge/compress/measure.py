"""The numbers every compress report compares, measured for source and result in one process on this machine.

- ``size``: bytes of the weight files the folder holds (its checkpoint, or an exported graph), and the stored
  parameter count (int8 elements count once, like the floats they replace).
- ``decode_tokens_per_s``: batch-1 greedy decoding with the KV cache (``models.generate``): new tokens / wall
  seconds, prefill of ``bench.prompt_len`` tokens included. Classifiers: batch-1 examples/s.
- ``throughput_*``: batch-N forward of N × ``bench.seq_len`` tokens without a cache, tokens/s (classifiers:
  examples/s at batch N).
Timings run under ``torch.inference_mode`` with ``bench.threads`` torch threads (the machine's default when
unset): a warm-up call each, then ``bench.repeats`` rounds timing source and results in turn; the best round
counts (a shared machine's load then slows every column alike instead of whichever ran last).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import torch
from torch import nn


def weights_bytes(folder: Path) -> int:
    """Bytes of the weights file(s) a run needs: ``model.safetensors`` when the run has one (a training run's
    final weights), else its newest checkpoint's tensor files (compress outputs hold no optimizer state), else
    the ``.safetensors`` / ``.onnx`` / ``.pt2`` files of the folder (an HF folder, an export)."""
    from lmforge.checkpoint import newest_valid

    folder = Path(folder)
    if folder.is_file():  # an exported graph (and its external data, if any)
        extra = folder.with_name(folder.name + ".data")
        return folder.stat().st_size + (extra.stat().st_size if extra.is_file() else 0)
    if (folder / "model.safetensors").is_file():
        return (folder / "model.safetensors").stat().st_size
    ckpt = newest_valid(folder) if (folder / "checkpoints").is_dir() else None
    if ckpt is not None:
        return sum(p.stat().st_size for p in ckpt.rglob("*.distcp"))
    return sum(p.stat().st_size for pat in ("*.safetensors", "*.onnx", "*.onnx.data", "*.pt2") for p in folder.glob(pat))


def stored_params(model: nn.Module) -> int:
    """Parameters and quantized-weight elements, each tied tensor once (quantization scales not counted)."""
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n + sum(m.qweight.numel() for m in _int8(model))


def nonzero_params(model: nn.Module) -> int:
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += int((p != 0).sum())
    return n + sum(int((m.qweight != 0).sum()) for m in _int8(model))


def _int8(model: nn.Module) -> list[nn.Module]:
    """The int8 layers and tables (their ``qweight`` elements count like the floats they replace)."""
    from lmforge.compress.qembed import QuantizedEmbedding
    from lmforge.compress.qlinear import QuantizedLinear

    return [m for m in model.modules() if isinstance(m, (QuantizedLinear, QuantizedEmbedding))]


class Threads:
    def __init__(self, n: Optional[int]):
        self.n, self.prev = n, torch.get_num_threads()

    def __enter__(self):
        if self.n:
            torch.set_num_threads(self.n)
        return self

    def __exit__(self, *exc) -> None:
        torch.set_num_threads(self.prev)


def lm_timers(model: nn.Module, vocab: int, bc) -> dict[str, tuple]:
    """name → (callable, units per call) for a decoder: batch-1 greedy decode, batch-N forward."""
    from lmforge.models.generate import generate

    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (bc.prompt_len,), generator=gen).tolist()
    limit = model.cfg.max_seq_len
    n_new = min(bc.new_tokens, limit - bc.prompt_len)
    seq = min(bc.seq_len, limit - 2)  # an exported decode graph bounds tokens by max_seq_len − 2
    x_BT = torch.randint(0, vocab, (bc.batch, seq), generator=gen)
    return {"decode_tokens_per_s": (lambda: generate(model, [prompt], n_new, temperature=0.0), n_new),
            "throughput_tokens_per_s": (lambda: model(x_BT), bc.batch * seq)}


def classifier_timers(model: nn.Module, examples: list[dict], pad_id: int, bc) -> dict[str, tuple]:
    """Batch-1 (8 examples one by one) and batch-N examples/s of a classifier."""
    from lmforge.finetune.data import collate

    ones = [collate([e], pad_id) for e in examples[:8]]
    batch = collate(examples[:bc.batch], pad_id)
    return {"batch1_examples_per_s": (lambda: [model(b["input_ids"], b["attention_mask"]) for b in ones], len(ones)),
            "throughput_examples_per_s": (lambda: model(batch["input_ids"], batch["attention_mask"]),
                                          batch["input_ids"].shape[0])}


@torch.inference_mode()
def speeds(runners: dict[str, nn.Module], src, bc) -> dict[str, dict]:
    """Units per second of every timer of every runner: one warm-up call each, then ``bench.repeats`` rounds
    that time each runner in turn (interleaved, so load from other processes hits all alike); best round."""
    timers = {}
    for name, model in runners.items():
        if src.kind == "lm":
            timers[name] = lm_timers(model, src.cfg.model.vocab_size, bc)
        else:
            timers[name] = classifier_timers(model, src.data.val, src.tok.pad_id or 0, bc)
    best = {name: {k: float("inf") for k in t} for name, t in timers.items()}
    with Threads(bc.threads):
        for rnd in range(bc.repeats + 1):
            for name, t in timers.items():
                for key, (fn, _) in t.items():
                    t0 = time.perf_counter()
                    fn()
                    if rnd:
                        best[name][key] = min(best[name][key], time.perf_counter() - t0)
        threads = torch.get_num_threads()
    return {name: {**{k: t[k][1] / best[name][k] for k in t}, "threads": threads, "repeats": bc.repeats}
            for name, t in timers.items()}


def measure(model: nn.Module, folder: Optional[Path], quality: dict) -> dict:
    """One report column without the speed: size, params, quality (computed by the caller on shared batches)."""
    return {"file_bytes": weights_bytes(folder) if folder is not None else None, "params": stored_params(model),
            "nonzero_params": nonzero_params(model), **quality}
