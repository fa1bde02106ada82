"""Vocabulary extension: give a base the characters of the fine-tuning data that its tokenizer cannot encode.

An English WordPiece base (all-MiniLM-L6-v2) maps ~64% of ChnSentiCorp's characters to ``[UNK]``: the model
then cannot tell most reviews apart. ``base.add_unknown_chars: N`` adds every character of the training file
that the base tokenizer turns into its unknown token, seen at least N times, as a new token; the new embedding
rows start as seeded draws around the base's rows (their mean and spread) and are learnt in fine-tuning (train the embeddings: method full, or
``method.trainable: [".*tok_embeddings.*"]`` with LoRA). The extended tokenizer is saved as the run's
``tokenizer.json`` and ``lmforge evaluate`` rebuilds the same vocabulary from it.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from lmforge.config import ConfigError


def unknown_id(tok) -> int | None:
    """Id of the tokenizer model's unknown token (WordPiece / BPE / Unigram with one), else None."""
    name = getattr(tok.hf.model, "unk_token", None)
    if name is None and hasattr(tok.hf.model, "unk_id"):  # Unigram
        return tok.hf.model.unk_id
    return tok.token_to_id(name) if name else None


def unknown_chars(tok, texts: Iterable[str], min_count: int) -> list[str]:
    """Non-space characters of ``texts`` that ``tok`` encodes as its unknown token, seen ≥ ``min_count``
    times, most frequent first (ties by code point, so the order is reproducible)."""
    unk = unknown_id(tok)
    if unk is None:
        return []
    counts = Counter(ch for t in texts for ch in t if not ch.isspace())
    out = [(n, ch) for ch, n in counts.items() if n >= min_count and tok.encode(ch) == [unk]]
    return [ch for _, ch in sorted(out, key=lambda x: (-x[0], x[1]))]


def resize_vocab(backbone: nn.Module, vocab_size: int, seed: int = 0) -> int:
    """Grow the backbone's token embeddings (and an untied output head) to ``vocab_size`` rows; new rows are
    drawn (seeded) from a normal with the old rows' per-feature mean and spread, so they start distinct.
    Returns the number of rows added."""
    model = backbone.model
    if getattr(backbone, "naming", "") == "hf":  # transformers encoder
        old = model.get_input_embeddings().weight.shape[0]
        if vocab_size > old:
            model.resize_token_embeddings(vocab_size, mean_resizing=True)
        return max(0, vocab_size - old)
    emb: nn.Embedding = model.tok_embeddings
    old = emb.weight.shape[0]
    if vocab_size <= old:
        return 0
    out = getattr(model, "output", None)
    tied = out is not None and out.weight is emb.weight

    def grown(w: torch.Tensor) -> nn.Parameter:
        with torch.no_grad():  # distinct rows drawn around the old ones' mean with their per-feature spread
            wf = w.float()
            g = torch.Generator(device="cpu").manual_seed(seed)
            noise = torch.randn(vocab_size - old, w.shape[1], generator=g).to(w.device)
            rows = (wf.mean(0) + noise * wf.std(0)).to(w.dtype)
            return nn.Parameter(torch.cat([w, rows], 0), requires_grad=w.requires_grad)

    emb.weight = grown(emb.weight)
    emb.num_embeddings = vocab_size
    if out is not None:
        out.weight = emb.weight if tied else grown(out.weight)
        out.out_features = vocab_size
    model.cfg = model.cfg.model_copy(update={"vocab_size": vocab_size})
    return vocab_size - old


def training_texts(cfg) -> list[str]:
    """Raw texts of ``cfg.data.train`` (classification texts, or CoNLL words)."""
    from lmforge.data.tasks import read_classification
    from lmforge.data.tasks_conll import read_conll

    if cfg.task == "classification":
        return read_classification(cfg.data.train, cfg.data.text_field, cfg.data.label_field).texts
    if cfg.task == "token-classification":
        return [w for s in read_conll(cfg.data.train) for w in s.words]
    raise ConfigError("base.add_unknown_chars is supported for classification and token-classification "
                      f"(task={cfg.task}: an exported decoder would need its output head resized as well)")


def extend_vocab(cfg, backbone: nn.Module, tok) -> list[str]:
    """Apply ``base.add_unknown_chars`` to (backbone, tok) in place; returns the added characters."""
    new = unknown_chars(tok, training_texts(cfg), cfg.base.add_unknown_chars)
    if new:
        tok.hf.add_tokens(new)
        resize_vocab(backbone, tok.vocab_size)
    return new


def load_run_tokenizer(run_dir: Path, backbone: nn.Module, tok):
    """The run's own tokenizer (saved when the vocabulary was extended) with the backbone resized to it."""
    path = Path(run_dir) / "tokenizer.json"
    if not path.is_file():
        return tok
    from tokenizers import Tokenizer as HFTokenizer

    from lmforge.data.tokenizer import Tokenizer

    run_tok = Tokenizer(HFTokenizer.from_file(str(path)), eos_token=tok.eos_token, pad_token=tok.pad_token)
    resize_vocab(backbone, run_tok.vocab_size)
    return run_tok
