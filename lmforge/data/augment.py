"""Text augmentation (EDA, back-translation) and class balancing for classification data."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from typing import Optional, Sequence

import torch

from lmforge.errors import DataError


def load_synonyms(path: str | Path) -> dict[str, list[str]]:
    """One entry per line: ``word<TAB>syn1,syn2`` or ``word syn1 syn2``; ``#`` starts a comment."""
    path = Path(path)
    table: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            if "\t" in line:
                word, rest = line.split("\t", 1)
                syns = [s.strip() for s in rest.split(",") if s.strip()]
            else:
                word, *syns = line.split()
            if not syns:
                raise DataError(f"{path}:{n}: '{word}' has no synonyms")
            table.setdefault(word, []).extend(s for s in syns if s != word)
    return table


class EDA:
    """Easy Data Augmentation (Wei & Zou 2019) over whitespace words: synonym replacement, random
    insertion (of a synonym), random swap, random deletion; ``alpha`` scales how many words change."""

    def __init__(self, synonyms: dict[str, list[str]], alpha: float = 0.1, seed: int = 0):
        self.synonyms = synonyms
        self.alpha = alpha
        self.rng = random.Random(seed)

    def _n(self, words: list[str]) -> int:
        return max(1, round(self.alpha * len(words)))

    def synonym_replace(self, words: list[str]) -> list[str]:
        out = list(words)
        cands = [i for i, w in enumerate(out) if self.synonyms.get(w)]
        for i in self.rng.sample(cands, min(self._n(words), len(cands))):
            out[i] = self.rng.choice(self.synonyms[out[i]])
        return out

    def random_insert(self, words: list[str]) -> list[str]:
        out = list(words)
        cands = [w for w in words if self.synonyms.get(w)]
        for _ in range(self._n(words) if cands else 0):
            out.insert(self.rng.randrange(len(out) + 1), self.rng.choice(self.synonyms[self.rng.choice(cands)]))
        return out

    def random_swap(self, words: list[str]) -> list[str]:
        out = list(words)
        for _ in range(self._n(words) if len(out) > 1 else 0):
            i, j = self.rng.sample(range(len(out)), 2)
            out[i], out[j] = out[j], out[i]
        return out

    def random_delete(self, words: list[str]) -> list[str]:
        if len(words) <= 1:
            return list(words)
        out = [w for w in words if self.rng.random() >= self.alpha]
        return out or [self.rng.choice(words)]

    def augment(self, text: str, n: int = 4) -> list[str]:
        """``n`` variants, cycling through the four operations."""
        words = text.split()
        ops = [self.synonym_replace, self.random_insert, self.random_swap, self.random_delete]
        return [" ".join(ops[i % 4](words)) for i in range(n)] if words else [text] * n


def back_translate(texts: Sequence[str], forward_model: str | Path, backward_model: Optional[str | Path] = None,
                   max_new_tokens: int = 128, num_beams: int = 1, batch_size: int = 16, seed: int = 0,
                   device: str = "cpu") -> list[str]:
    """Paraphrase through a pivot language with local transformers seq2seq checkpoints (e.g. MarianMT
    en→de then de→en). ``backward_model`` None: a single model is applied twice. A text whose round
    trip comes back empty is returned unchanged."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    torch.manual_seed(seed)

    def run(path, batch: list[str]) -> list[str]:
        tok = AutoTokenizer.from_pretrained(str(path))
        model = AutoModelForSeq2SeqLM.from_pretrained(str(path)).to(device).eval()
        out = [""] * len(batch)
        todo = [i for i, t in enumerate(batch) if t.strip()]  # an empty input has nothing to translate
        for k in range(0, len(todo), batch_size):
            idx = todo[k:k + batch_size]
            enc = tok([batch[i] for i in idx], return_tensors="pt", padding=True, truncation=True).to(device)
            with torch.no_grad():
                gen = model.generate(**enc, max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False)
            for i, text in zip(idx, tok.batch_decode(gen, skip_special_tokens=True)):
                out[i] = text
        return out

    back = run(backward_model or forward_model, run(forward_model, list(texts)))
    return [b if b.strip() else t for b, t in zip(back, texts)]  # failed round trips keep the original


def oversample(texts: Sequence[str], labels: Sequence[int], seed: int = 0) -> tuple[list[str], list[int]]:
    """Repeat randomly drawn minority-class examples (seeded) until every class matches the largest."""
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    target = max(len(v) for v in by_class.values())
    idx = []
    for y in sorted(by_class):
        members = by_class[y]
        idx += members + rng.choices(members, k=target - len(members))
    rng.shuffle(idx)
    return [texts[i] for i in idx], [labels[i] for i in idx]


def class_weights(labels: Sequence[int], num_classes: Optional[int] = None) -> torch.Tensor:
    """Inverse-frequency weights for cross_entropy(weight=...), normalised to mean 1 over present classes."""
    counts = Counter(labels)
    k = num_classes or (max(counts) + 1)
    freq = torch.tensor([counts.get(c, 0) for c in range(k)], dtype=torch.float)
    w = torch.where(freq > 0, freq.sum() / (freq.clamp(min=1) * (freq > 0).sum()), torch.zeros_like(freq))
    return w
