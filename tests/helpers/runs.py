"""Shared helpers for the training tests (no tests here): a tiny packed corpus and tiny run configs."""

from __future__ import annotations

import random
from pathlib import Path

from lmforge.config import build_config, deep_merge

WORDS = ["the", "king", "said", "to", "his", "son", "and", "then", "went", "home", "def", "return", "x", "=",
         "(", ")", ":", "\n", "of", "a", "in", "it", "was"]


def make_docs(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 80))) for _ in range(n)]


def pack_tiny(out_dir: Path, mask: bool = False) -> Path:
    """~15k tokens of synthetic text, vocab 300, 10% validation; ``mask``: the tokenizer has a mask token (MLM)."""
    from lmforge.data.pack import pack_documents
    from lmforge.data.tokenizer import train_tokenizer

    docs = make_docs()
    specials = {"special_tokens": ["<|endoftext|>", "<|pad|>", "<|mask|>"]} if mask else {}
    tok = train_tokenizer(docs, vocab_size=300, **specials)
    pack_documents(docs, tok, out_dir, val_fraction=0.1, seed=0, num_workers=0)
    return out_dir


def tiny_cfg(run_dir: Path, data_dir: Path, **sections):
    tree = {
        "run_dir": str(run_dir),
        "model": {"preset": "tiny", "max_seq_len": 32},
        "data": {"path": str(data_dir), "seq_len": 32},
        "optimizer": {"name": "adamw", "lr": 3e-3, "weight_decay": 0.1},
        "scheduler": {"name": "cosine", "warmup_steps": 2, "min_lr_ratio": 0.1},
        "training": {"max_steps": 6, "micro_batch_size": 2, "grad_accum_steps": 2, "device": "cpu",
                     "eval_every": 3, "eval_batches": 2, "seed": 7, "precision": "fp32"},
        "checkpoint": {"every_steps": 2, "keep_last": 10},
        "logging": {"log_every": 1, "tensorboard": False, "progress": False, "report": False},
    }
    return build_config(deep_merge(tree, sections))
