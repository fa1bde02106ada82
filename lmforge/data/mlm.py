"""Masked-language-model batches from packed token windows (``training.objective: mlm``).

Wraps the causal window loaders: each window's tokens become the encoder input, and the data pipeline's
``MLMCollator`` masks them (15% of non-special tokens; 80% mask token / 10% random / 10% unchanged).
Each window is masked by its own generator, seeded from (seed, the window's global sample index), so a batch
is a pure function of the loader state (resume stays exact with no extra RNG state) and a window gets the same
mask whatever the number of ranks or the micro-batch split (2 ranks reproduce 1 process).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from lmforge.config import ConfigError
from lmforge.data.tasks import MLMCollator

MASK_TOKENS = ("<|mask|>", "[MASK]", "<mask>")


def find_mask_id(tokenizer, wanted: str | None = None) -> int:
    names = (wanted,) if wanted else MASK_TOKENS
    for name in names:
        tid = tokenizer.token_to_id(name)
        if tid is not None:
            return tid
    raise ConfigError(
        f"training.objective=mlm needs a mask token in the tokenizer (looked for {', '.join(names)}); "
        f"add it to the prepare config's tokenizer.special_tokens, e.g. [\"<|endoftext|>\", \"<|pad|>\", \"<|mask|>\"]")


def _collator(tokenizer, mask_id: int, prob: float, vocab_size: int) -> MLMCollator:
    specials = [i for i in (tokenizer.eos_id, tokenizer.pad_id) if i is not None]
    return MLMCollator(mask_id=mask_id, vocab_size=vocab_size, pad_id=tokenizer.pad_id if tokenizer.pad_id
                       is not None else mask_id, special_ids=specials, prob=prob)


def _masked(batch: dict, collator: MLMCollator, seeds: list[list[int]]) -> dict:
    """Mask row ``b`` of ``batch`` with a generator seeded from ``seeds[b]``."""
    rows_in, rows_lab = [], []
    for b, seed in enumerate(seeds):
        collator.gen = torch.Generator().manual_seed(int(np.random.SeedSequence(seed).generate_state(1, np.uint64)[0]))
        inputs_1T, labels_1T = collator.mask(batch["input_ids"][b:b + 1])
        rows_in.append(inputs_1T)
        rows_lab.append(labels_1T)
    out = {"input_ids": torch.cat(rows_in), "labels": torch.cat(rows_lab)}
    if "doc_ids" in batch:
        out["doc_ids"] = batch["doc_ids"]
    return out


class MLMLoader:
    """Train loader: ``RandomWindowLoader`` windows, masked; ``state_dict`` is the wrapped loader's."""

    def __init__(self, base, tokenizer, mask_id: int, prob: float, vocab_size: int, seed: int, rank: int = 0):
        self.base, self.seed, self.rank = base, seed, rank
        self.collator = _collator(tokenizer, mask_id, prob, vocab_size)

    def next_batch(self) -> dict:
        b = self.base
        js = [b.samples + i * b.world_size + b.rank for i in range(b.batch_size)]  # global sample indices
        return _masked(b.next_batch(), self.collator, [[self.seed, j] for j in js])

    def __iter__(self) -> Iterator[dict]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return self.base.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.base.load_state_dict(state)

    def __getattr__(self, name):  # step, samples, ... of the wrapped loader
        return getattr(self.base, name)


class MLMEvalLoader:
    """Eval loader: the same fixed windows as ``SequentialEvalLoader`` with the same masks every time."""

    def __init__(self, base, tokenizer, mask_id: int, prob: float, vocab_size: int, seed: int, rank: int = 0):
        self.base, self.seed, self.rank = base, seed, rank
        self.collator = _collator(tokenizer, mask_id, prob, vocab_size)

    def __len__(self) -> int:
        return len(self.base)

    def __iter__(self) -> Iterator[dict]:
        for windows, batch in zip(self.base.batch_windows, self.base):
            yield _masked(batch, self.collator, [[self.seed, 1 << 40, w] for w in windows])


def mlm_loaders_for(cfg, train_loader=None, eval_batches=None, rank: int = 0):
    """Wrap the trainer's window loaders when ``training.objective == "mlm"`` (otherwise return them as is)."""
    if cfg.training.objective != "mlm":
        return train_loader if eval_batches is None else eval_batches
    from pathlib import Path

    from lmforge.data.tokenizer import load_tokenizer

    tok = load_tokenizer(Path(cfg.data.path) / "tokenizer.json")
    args = (tok, find_mask_id(tok, cfg.data.mask_token), cfg.data.mlm_probability, cfg.model.vocab_size)
    if eval_batches is not None:
        return MLMEvalLoader(eval_batches, *args, seed=cfg.training.seed, rank=rank)
    return MLMLoader(train_loader, *args, seed=cfg.training.seed, rank=rank)
