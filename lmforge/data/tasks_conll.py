"""CoNLL token classification: reading, IOB1 ↔ IOB2 conversion, label alignment to sub-word tokens."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from lmforge.errors import DataError
from lmforge.models.losses import IGNORE_INDEX


@dataclass
class Sentence:
    words: list[str]
    tags: list[str]
    extra: list[list[str]] = field(default_factory=list)  # other columns (POS, chunk), per word
    line: int = 0  # file line of the first word (word i is on line ``line + i``)


def read_conll(path: str | Path, tag_column: int = -1) -> list[Sentence]:
    """Whitespace-separated columns, blank line between sentences, ``-DOCSTART-`` lines skipped."""
    from lmforge.data.tasks import read_text_file

    path = Path(path)
    sents, words, tags, extra, start = [], [], [], [], 0
    for n, line in enumerate(read_text_file(path).split("\n"), 1):
        parts = line.split()
        if not parts or parts[0] == "-DOCSTART-":
            if words:
                sents.append(Sentence(words, tags, extra, start))
                words, tags, extra = [], [], []
            continue
        if len(parts) < 2:
            raise DataError(f"{path}:{n}: expected 'word ... tag' columns, got {line.strip()!r}")
        if not words:
            start = n
        words.append(parts[0])
        tags.append(parts[tag_column])
        extra.append(parts[1:tag_column] if tag_column == -1 else parts[1:])
    if words:
        sents.append(Sentence(words, tags, extra, start))
    return sents


def check_tags(path, sentences: list[Sentence], label2id: Optional[dict[str, int]] = None) -> None:
    """Every tag is O, B-TYPE or I-TYPE (and in ``label2id`` when given); else ``DataError`` at file:line."""
    for s in sentences:
        for i, t in enumerate(s.tags):
            try:
                _split(t)
            except DataError as e:
                raise DataError(f"{path}:{s.line + i}: {e}") from None
            if label2id is not None and t not in label2id:
                raise DataError(f"{path}:{s.line + i}: tag {t!r} does not occur in the training data (labels: "
                                f"{', '.join(label2id)})")


def _split(tag: str) -> tuple[str, Optional[str]]:
    if tag == "O":
        return "O", None
    prefix, _, typ = tag.partition("-")
    if prefix not in ("B", "I") or not typ:
        raise DataError(f"tag {tag!r} is not O, B-TYPE or I-TYPE")
    return prefix, typ


def iob1_to_iob2(tags: list[str]) -> list[str]:
    """IOB1 (B- only between adjacent same-type entities) → IOB2 (every entity starts with B-)."""
    out, prev = [], "O"
    for t in tags:
        p, typ = _split(t)
        if p == "I" and (prev == "O" or _split(prev)[1] != typ):
            t = f"B-{typ}"
        out.append(t)
        prev = t
    return out


def iob2_to_iob1(tags: list[str]) -> list[str]:
    """IOB2 → IOB1: B- kept only when the previous token is an entity of the same type."""
    out, prev = [], "O"
    for t in tags:
        p, typ = _split(t)
        if p == "B" and not (prev != "O" and _split(prev)[1] == typ):
            out.append(f"I-{typ}")
        else:
            out.append(t)
        prev = t
    return out


def detect_scheme(sentences: list[Sentence]) -> str:
    """'iob2' if every entity starts with B-, else 'iob1'."""
    for s in sentences:
        if iob1_to_iob2(s.tags) != s.tags:
            return "iob1"
    return "iob2"


def align_labels(tokenizer, words: list[str], tags: list[str], label2id: dict[str, int], max_len: Optional[int] = None,
                 label_all_subwords: bool = False) -> dict:
    """Tokenize ``" ".join(words)`` and give each word's tag to its first sub-word token (others -100, or
    the I- form of the tag with ``label_all_subwords``). Returns input_ids, labels, word_ids (-1: none)."""
    text_parts, spans, pos = [], [], 0
    for i, w in enumerate(words):
        if i:
            text_parts.append(" ")
            pos += 1
        spans.append((pos, pos + len(w)))
        text_parts.append(w)
        pos += len(w)
    hf = getattr(tokenizer, "hf", tokenizer)
    enc = hf.encode("".join(text_parts), add_special_tokens=False)
    starts = np.array([s for s, _ in spans])
    ids, labels, word_ids = [], [], []
    prev_word = -1
    for tid, (s, e) in zip(enc.ids, enc.offsets):
        # a byte-level token may carry the separating space: attribute it to the word it ends in
        w = int(np.searchsorted(starts, e - 1, side="right")) - 1 if e > s else -1
        if w >= 0 and not (spans[w][0] < e and s < spans[w][1]):
            w = -1
        ids.append(tid)
        word_ids.append(w)
        if w < 0:
            labels.append(IGNORE_INDEX)
        elif w != prev_word:
            labels.append(label2id[tags[w]])
        elif label_all_subwords:
            t = tags[w]
            labels.append(label2id.get("I-" + t[2:], label2id[t]) if t.startswith("B-") else label2id[t])
        else:
            labels.append(IGNORE_INDEX)
        if w >= 0:
            prev_word = w
    if max_len is not None:
        ids, labels, word_ids = ids[:max_len], labels[:max_len], word_ids[:max_len]
    return {"input_ids": ids, "labels": labels, "word_ids": word_ids}


def build_label_map(sentences: list[Sentence]) -> dict[str, int]:
    """O first, then entity tags sorted by type and prefix."""
    tags = {t for s in sentences for t in s.tags} - {"O"}
    return {"O": 0, **{t: i + 1 for i, t in enumerate(sorted(tags, key=lambda t: (t[2:], t[:1])))}}


def word_predictions(pred_labels: list[int], word_ids: list[int], n_words: int, id2label: dict[int, str]) -> list[str]:
    """Per-word tags from per-token predictions (first sub-word wins); words cut by truncation get 'O'."""
    out = ["O"] * n_words
    seen = set()
    for p, w in zip(pred_labels, word_ids):
        if w >= 0 and w not in seen:
            out[w] = id2label[int(p)]
            seen.add(w)
    return out
