"""The numbers every compress report compares, measured for source and result in one process on this machine.

- ``size``: bytes of the weight files the folder holds (its checkpoint, or an exported graph), and the stored
  parameter count (int8 elements count once, like the floats they replace).
- ``decode_tps``: batch-1 greedy decoding with the KV cache (``models.generate``): new tokens / wall seconds,
  prefill of ``bench.prompt_len`` tokens included; best of ``bench.repeats``. Classifiers: batch-1 examples/s.
- ``throughput``: batch-N forward of N × ``bench.seq_len`` tokens without a cache, tokens/s (classifiers:
  examples/s at batch N).
Timings run under ``torch.inference_mode`` with ``bench.threads`` torch threads (the machine's default when
unset) after one warm-up call.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional

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
    from lmforge.compress.qlinear import QuantizedLinear

    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n + sum(m.qweight.numel() for m in model.modules() if isinstance(m, QuantizedLinear))


def nonzero_params(model: nn.Module) -> int:
    from lmforge.compress.qlinear import QuantizedLinear

    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += int((p != 0).sum())
    return n + sum(int((m.qweight != 0).sum()) for m in model.modules() if isinstance(m, QuantizedLinear))


def _best(fn: Callable[[], object], repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


class Threads:
    def __init__(self, n: Optional[int]):
        self.n, self.prev = n, torch.get_num_threads()

    def __enter__(self):
        if self.n:
            torch.set_num_threads(self.n)
        return self

    def __exit__(self, *exc) -> None:
        torch.set_num_threads(self.prev)


@torch.inference_mode()
def lm_speed(model: nn.Module, vocab: int, bc) -> dict:
    """Batch-1 decode tokens/s and batch-N forward tokens/s of a decoder (module doc)."""
    from lmforge.models.generate import generate

    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (bc.prompt_len,), generator=gen).tolist()
    n_new = min(bc.new_tokens, model.cfg.max_seq_len - bc.prompt_len) if hasattr(model, "cfg") else bc.new_tokens
    decode_s = _best(lambda: generate(model, [prompt], n_new, temperature=0.0), bc.repeats)
    seq = min(bc.seq_len, model.cfg.max_seq_len) if hasattr(model, "cfg") else bc.seq_len
    x_BT = torch.randint(0, vocab, (bc.batch, seq), generator=gen)
    fwd_s = _best(lambda: model(x_BT), bc.repeats)
    return {"decode_tokens_per_s": n_new / decode_s, "batch": bc.batch, "seq_len": seq,
            "throughput_tokens_per_s": bc.batch * seq / fwd_s}


@torch.inference_mode()
def classifier_speed(model: nn.Module, examples: list[dict], pad_id: int, bc) -> dict:
    """Batch-1 examples/s (first ``repeats``×8 examples one by one) and batch-N examples/s."""
    from lmforge.finetune.data import collate

    ones = [collate([e], pad_id) for e in examples[:8]]
    one_s = _best(lambda: [model(b["input_ids"], b["attention_mask"]) for b in ones], bc.repeats)
    batch = collate(examples[:bc.batch], pad_id)
    n = batch["input_ids"].shape[0]
    many_s = _best(lambda: model(batch["input_ids"], batch["attention_mask"]), bc.repeats)
    return {"batch1_examples_per_s": len(ones) / one_s, "batch": n, "throughput_examples_per_s": n / many_s}


def measure(model: nn.Module, src, folder: Optional[Path], quality: dict, bc, runner: Optional[nn.Module] = None
            ) -> dict:
    """One report column: size, params, speed (of ``runner`` when given, e.g. an ONNX Runtime session wrapper),
    quality (already computed, so every model is scored on the same batches)."""
    row = {"file_bytes": weights_bytes(folder) if folder is not None else None, "params": stored_params(model),
           "nonzero_params": nonzero_params(model), **quality}
    if not bc.enabled:
        return row
    run = runner if runner is not None else model
    with Threads(bc.threads):
        if src.kind == "lm":
            row.update(lm_speed(run, src.cfg.model.vocab_size, bc))
        else:
            pad = src.tok.pad_id if src.tok.pad_id is not None else 0
            row.update(classifier_speed(run, src.data.val, pad, bc))
    row["threads"] = bc.threads or torch.get_num_threads()
    return row
