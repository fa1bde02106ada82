"""Fixtures shared across test files: a tiny lmforge base run and small fine-tuning data files (built once
per module that uses them; nothing from the shared data sets)."""

from __future__ import annotations

import json
import random

import pytest

from lmforge.config import Config, DataConfig, ModelConfig, save_config
from tests.helpers.finetune import sentence


def pytest_collection_modifyitems(config, items):
    import torch

    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """An lmforge run folder: config.yaml, tokenizer.json, one complete checkpoint of a random tiny Llama."""
    from lmforge.data.tokenizer import train_tokenizer
    from lmforge.models import build_model
    from lmforge.checkpoint import CheckpointManager

    root = tmp_path_factory.mktemp("base")
    rng = random.Random(0)
    texts = [sentence(rng, rng.random() < 0.5) for _ in range(300)] + ["add 1 2 = 3", "<|user|>\n<|assistant|>\n"] * 20
    tok = train_tokenizer(texts, vocab_size=300)
    tok.save(root / "tokenizer.json")
    mc = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=4, max_seq_len=96)
    save_config(Config(run_dir=str(root), model=mc, data=DataConfig(path=None)), root / "config.yaml")
    CheckpointManager(root, model=build_model(mc, seed=0)).save(1)
    return root


@pytest.fixture(scope="module")
def cls_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cls")
    rng = random.Random(1)
    for name, n in (("train.tsv", 240), ("dev.tsv", 80)):
        rows = ["sentence\tlabel"]
        for _ in range(n):
            y = int(rng.random() < 0.5)
            rows.append(f"{sentence(rng, y)}\t{y}")
        (d / name).write_text("\n".join(rows) + "\n")
    return d


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    import random

    rng = random.Random(2)
    lines = []
    for _ in range(60):
        a, b = rng.randint(0, 4), rng.randint(0, 4)
        lines.append(json.dumps({"prompt": f"add {a} {b}" + " please" * rng.randint(0, 3), "response": f"{a + b}"}))
    f = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    f.write_text("\n".join(lines) + "\n")
    return f
