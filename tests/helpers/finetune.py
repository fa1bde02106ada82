"""Tiny fine-tuning configs over the ``tiny_run`` / ``cls_files`` / ``chat_file`` fixtures (``tests/conftest.py``)."""

from __future__ import annotations

from lmforge.finetune.config import load_finetune_config

WORDS = ["the", "movie", "plot", "actor", "scene", "story", "film", "music", "ending", "cast"]


def sentence(rng, label):
    words = rng.choices(WORDS, k=rng.randint(3, 8))
    words.insert(rng.randrange(len(words) + 1), "great" if label else "awful")
    return " ".join(words)


def ft_cfg(run, tmp_path, train, **over):
    """A FinetuneConfig over the tiny base run, fp32 (tests compare numerics), ``over``: dotted overrides."""
    ov = [f"--base.path={run}", f"--data.train={train}", f"--run_dir={tmp_path / 'ft'}", "--train.batch_size=16",
          "--data.max_len=32", "--train.eval_batch_size=32", "--train.precision=fp32"] + [f"--{k}={v}" for k, v in over.items()]
    return load_finetune_config(None, ov)
