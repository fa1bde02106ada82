"""Task data for fine-tuning: read, split, encode (with the base's special tokens), batch.

Readers come from ``lmforge.data.tasks`` / ``tasks_conll``; this module adds the splits, the encoder/decoder
special tokens ([CLS] ... [SEP] for BERT-style bases, a final EOS for lmforge decoders) and batching.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch

from lmforge.config import ConfigError
from lmforge.models.losses import IGNORE_INDEX
from lmforge.data.tasks import encode_chat, pad_collate, read_chat_jsonl, read_classification
from lmforge.data.tasks_conll import (Sentence, align_labels, build_label_map, check_tags, detect_scheme, iob1_to_iob2,
                                      read_conll)
from lmforge.errors import DataError


@dataclass
class TaskData:
    train: list[dict]
    val: list[dict]
    test: Optional[list[dict]]
    label_names: list[str] = field(default_factory=list)
    scheme: Optional[str] = None  # token-classification: scheme of the files (scored as IOB2 after conversion)
    class_weights: Optional[torch.Tensor] = None


def specials(tokenizer) -> tuple[list[int], list[int]]:
    """(ids before, ids after) a sequence: the tokenizer's own post-processor ([CLS]/[SEP]) or a final EOS."""
    hf = getattr(tokenizer, "hf", tokenizer)
    around = hf.encode("", add_special_tokens=True).ids
    if around:
        return around[:1], around[1:]
    if tokenizer.eos_id is None:
        raise ConfigError("the tokenizer has neither special-token templates nor an EOS token to mark the end")
    return [], [tokenizer.eos_id]


def _check_file(path: Optional[str], key: str) -> None:
    from pathlib import Path

    if path is not None and not Path(path).is_file():
        raise ConfigError(f"{key}: file not found: {path}")


# ----------------------------------------------------------------------------- per-task encoders


def _sample(n: int, k: Optional[int], seed: int) -> Optional[list[int]]:
    """Sorted seeded subset of range(n) of size k (None: keep all)."""
    return sorted(random.Random(seed).sample(range(n), k)) if k and n > k else None


def encode_classification_file(path: str, tokenizer, max_len: int, label_names: Optional[list[str]],
                               text_field=None, label_field=None, max_examples: Optional[int] = None,
                               seed: int = 0) -> tuple[list[dict], list[str], list[str]]:
    """→ (examples, label names, raw texts); ``max_examples``: a seeded subset, drawn before tokenizing."""
    d = read_classification(path, text_field, label_field, label_names)
    keep = _sample(len(d.texts), max_examples, seed)
    if keep is not None:
        d.texts, d.labels = [d.texts[i] for i in keep], [d.labels[i] for i in keep]
    pre, post = specials(tokenizer)
    room = max_len - len(pre) - len(post)
    ex = [{"input_ids": pre + ids[:room] + post, "label": y} for ids, y in zip(tokenizer.encode_batch(d.texts), d.labels)]
    return ex, d.label_names, d.texts


def encode_conll_file(path: str, tokenizer, max_len: int, label2id: Optional[dict[str, int]],
                      max_examples: Optional[int] = None, seed: int = 0) -> tuple[list[dict], dict, str]:
    """→ (examples with word_ids and gold IOB2 word tags, label map, scheme of the file)."""
    sents = read_conll(path)
    if not sents:
        raise DataError(f"{path}: no sentences (the file holds no 'word ... tag' lines)")
    check_tags(path, sents)
    scheme = detect_scheme(sents)  # on the whole file: a subset may hold no IOB1-revealing entity
    keep = _sample(len(sents), max_examples, seed)
    if keep is not None:
        sents = [sents[i] for i in keep]
    tags = [iob1_to_iob2(s.tags) if scheme == "iob1" else s.tags for s in sents]
    if label2id is None:
        label2id = build_label_map([Sentence(s.words, t) for s, t in zip(sents, tags)])
    check_tags(path, [Sentence(s.words, t, line=s.line) for s, t in zip(sents, tags)], label2id)
    pre, post = specials(tokenizer)
    room = max_len - len(pre) - len(post)
    out = []
    for s, t in zip(sents, tags):
        a = align_labels(tokenizer, s.words, t, label2id, max_len=room)
        out.append({"input_ids": pre + a["input_ids"] + post,
                    "labels": [IGNORE_INDEX] * len(pre) + a["labels"] + [IGNORE_INDEX] * len(post),
                    "word_ids": [-1] * len(pre) + a["word_ids"] + [-1] * len(post), "tags": t})
    return out, label2id, scheme


def encode_sft_file(path: str, tokenizer, max_len: int) -> list[dict]:
    return [encode_chat(tokenizer, conv, max_len) for conv in read_chat_jsonl(path)]


def require_targets(examples: list[dict], path: str, max_len: int) -> list[dict]:
    """``examples`` when something is left to learn or score; else ``DataError`` naming the file. (The readers
    refuse files without examples; this catches what truncation to ``data.max_len`` left without a target.)"""
    if not examples:
        raise DataError(f"{path}: no examples")
    if "labels" in examples[0] and not any(y != IGNORE_INDEX for e in examples for y in e["labels"]):
        raise DataError(f"{path}: none of the {len(examples)} examples has a target token left after truncation "
                        f"to data.max_len={max_len}", hint="raise data.max_len, or shorten the prompts")
    return examples


def read_eval_file(cfg, path: str, tokenizer, labels: list[str], max_examples: Optional[int] = None) -> list[dict]:
    """A file in the run's task format, encoded with the training label set, for ``lmforge evaluate``."""
    d = cfg.data
    if cfg.task == "classification":
        examples = encode_classification_file(path, tokenizer, d.max_len, labels, d.text_field, d.label_field)[0]
    elif cfg.task == "token-classification":
        examples = encode_conll_file(path, tokenizer, d.max_len, {t: i for i, t in enumerate(labels)})[0]
    else:
        examples = encode_sft_file(path, tokenizer, d.max_len)
    return require_targets(examples[:max_examples] if max_examples else examples, path, d.max_len)


# ----------------------------------------------------------------------------- splits


def _split(examples: list, frac: float, seed: int) -> tuple[list, list]:
    idx = list(range(len(examples)))
    random.Random(seed).shuffle(idx)
    n_val = max(1, int(round(frac * len(idx))))
    if n_val >= len(idx):
        raise ConfigError(f"data.val_fraction={frac} leaves no training examples out of {len(idx)}")
    val = set(idx[:n_val])
    return [e for i, e in enumerate(examples) if i not in val], [e for i, e in enumerate(examples) if i in val]


def load_task_data(cfg, tokenizer) -> TaskData:
    """Train/validation/test examples for ``cfg`` (a FinetuneConfig); a split with nothing to learn or score
    is a ``DataError`` naming its file (an empty validation set would report a meaningless best score)."""
    data, d = _read_task_data(cfg, tokenizer), cfg.data
    for examples, path in ((data.train, d.train), (data.val, d.validation or f"{d.train} (data.val_fraction part)"),
                           (data.test, d.test)):
        if examples is not None:
            require_targets(examples, path, d.max_len)
    return data


def _read_task_data(cfg, tokenizer) -> TaskData:
    d = cfg.data
    for key in ("train", "validation", "test"):
        _check_file(getattr(d, key), f"data.{key}")
    cap = (lambda ex: ex[: d.max_eval_examples]) if d.max_eval_examples else (lambda ex: ex)
    sub = {"max_examples": d.max_train_examples, "seed": d.seed}

    def subset(ex: list) -> list:
        keep = _sample(len(ex), d.max_train_examples, d.seed)
        return ex if keep is None else [ex[i] for i in keep]

    if cfg.task == "classification":
        kw = {"text_field": d.text_field, "label_field": d.label_field}
        train, names, _ = encode_classification_file(d.train, tokenizer, d.max_len, None, **kw, **sub)
        if d.validation:
            val = encode_classification_file(d.validation, tokenizer, d.max_len, names, **kw)[0]
        else:
            train, val = _split(train, d.val_fraction, d.seed)
        test = encode_classification_file(d.test, tokenizer, d.max_len, names, **kw)[0] if d.test else None
        labels = [e["label"] for e in train]
        if d.oversample:
            from lmforge.data.augment import oversample

            train, _ = oversample(train, labels, d.seed)
        cw = None
        if d.class_weights:
            from lmforge.data.augment import class_weights

            cw = class_weights(labels, len(names))
        return TaskData(train, cap(val), cap(test) if test else None, names, None, cw)
    if cfg.task == "token-classification":
        if d.oversample:
            raise ConfigError("data.oversample is for classification (sentences hold many labels); use "
                              "data.class_weights for token-classification")
        train, label2id, scheme = encode_conll_file(d.train, tokenizer, d.max_len, None, **sub)
        if d.scheme != "auto" and d.scheme != scheme:
            raise ConfigError(f"data.scheme={d.scheme} but {d.train} looks like {scheme}")
        if d.validation:
            val = encode_conll_file(d.validation, tokenizer, d.max_len, label2id)[0]
        else:
            train, val = _split(train, d.val_fraction, d.seed)
        test = encode_conll_file(d.test, tokenizer, d.max_len, label2id)[0] if d.test else None
        cw = None
        if d.class_weights:
            from lmforge.data.augment import class_weights

            cw = class_weights([y for e in train for y in e["labels"] if y != IGNORE_INDEX], len(label2id))
        return TaskData(train, cap(val), cap(test) if test else None, list(label2id), scheme, cw)
    train = subset(encode_sft_file(d.train, tokenizer, d.max_len))
    if d.validation:
        val = encode_sft_file(d.validation, tokenizer, d.max_len)
    else:
        train, val = _split(train, d.val_fraction, d.seed)
    test = encode_sft_file(d.test, tokenizer, d.max_len) if d.test else None
    return TaskData(train, cap(val), cap(test) if test else None)


# ----------------------------------------------------------------------------- batching


def steps_per_epoch(n: int, batch_size: int) -> int:
    return max(1, math.ceil(n / batch_size))


class TaskBatches:
    """The micro-batches of each optimizer step, for this rank. Step batches come in a seeded order per epoch
    (a pure function of seed and epoch; the last batch of an epoch may be short), the same on every rank and at
    every world size: the global batch's rows are split into ``accum`` contiguous micro-batches, each of them
    into ``world`` contiguous rank shares (``rank_rows``). Stateful (``loader`` in checkpoints): the position
    of the next batch, (epoch, index)."""

    def __init__(self, examples: list[dict], batch_size: int, pad_id: int, seed: int, accum: int = 1,
                 rank: int = 0, world: int = 1):
        self.examples, self.batch_size, self.pad_id, self.seed = examples, batch_size, pad_id, seed
        self.accum, self.rank, self.world = accum, rank, world
        self.per_epoch = steps_per_epoch(len(examples), batch_size)
        self.epoch, self.index, self._order = 0, 0, None

    def _epoch_order(self) -> list[int]:
        if self._order is None or self._order[0] != self.epoch:
            g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
            self._order = (self.epoch, torch.randperm(len(self.examples), generator=g).tolist())
        return self._order[1]

    def next_step(self) -> list[dict]:
        if self.index >= self.per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        rows = self._epoch_order()[self.index * self.batch_size:(self.index + 1) * self.batch_size]
        self.index += 1
        batch = collate([self.examples[j] for j in rows], self.pad_id)
        return [rank_rows(rank_rows(batch, i, self.accum), self.rank, self.world) for i in range(self.accum)]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, sd: dict) -> None:
        self.epoch, self.index = int(sd["epoch"]), int(sd["index"])


def rank_rows(batch: dict, rank: int, world: int) -> dict:
    """Share ``rank`` of ``world`` contiguous shares of a collated batch (sizes differ by at most one row),
    trimmed to its longest row; an empty share becomes one row whose targets are all ignored (so every rank
    runs the same forward/backward collectives)."""
    n = batch["input_ids"].shape[0]
    idx = torch.arange(n).tensor_split(world)[rank]
    if len(idx):
        part = {k: v[idx] for k, v in batch.items()}
    else:
        part = {k: v[:1].clone() for k, v in batch.items()}
        for k in ("label", "labels"):
            if k in part:
                part[k].fill_(IGNORE_INDEX)
    T = max(1, int(part["attention_mask"].sum(1).max()))
    return {k: v[:, :T] if v.dim() == 2 else v for k, v in part.items()}


def eval_batches(examples: list[dict], batch_size: int, pad_id: int) -> Iterator[tuple[list[dict], dict]]:
    """Length-sorted batches (less padding); yields (examples, batch)."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    for i in range(0, len(order), batch_size):
        chunk = [examples[j] for j in order[i:i + batch_size]]
        yield chunk, collate(chunk, pad_id)


def collate(examples: list[dict], pad_id: int) -> dict:
    return pad_collate([{k: e[k] for k in ("input_ids", "labels", "label") if k in e} for e in examples], pad_id)
