"""Document cleaning: Unicode normalisation, control characters, whitespace, quality filters, PII masking.

``Cleaner(cfg)(text)`` returns ``(cleaned_text, None)`` or ``(None, reason)`` for a dropped document;
``Cleaner.pii_counts`` counts masked items by kind. Works on any script (CJK has no spaces, so the
filters are character/line based, never word based).
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from typing import Optional

from lmforge.data.config import CleanConfig

# C0/C1 controls except \t and \n, plus format chars that are invisible noise (ZW space, BOM, bidi marks).
# ZWJ/ZWNJ (U+200C/D) are kept: they are meaningful in emoji and several scripts.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\u200e\u200f\u202a-\u202e\u2060-\u2064\ufeff]")
_TRAILING = re.compile(r"[ \t\u3000]+$", re.MULTILINE)
_BLANKS = re.compile(r"\n{4,}")
_SPACES = re.compile(r"[ \t\u3000]{2,}")

PII_PATTERNS = {
    "emails": (re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b"), "<EMAIL>"),
    "ips": (re.compile(r"\b(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)\b"), "<IP>"),
    "phones": (re.compile(r"(?<![\w.])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])\d{3,4}[ .-]?\d{3,4}(?![\w.])"
                          r"|(?<!\d)1[3-9]\d{9}(?!\d)"), "<PHONE>"),
    "long_digits": (re.compile(r"(?<!\d)\d{9,}(?!\d)"), "<NUM>"),
}


def repeated_line_fraction(text: str) -> float:
    lines = [ln.strip() for ln in text.split("\n") if ln.strip()]
    if len(lines) < 2:
        return 0.0
    return 1.0 - len(set(lines)) / len(lines)


def char_run_fraction(text: str, run: int) -> float:
    """Fraction of characters inside runs of ``run`` or more identical non-space characters."""
    if not text:
        return 0.0
    pattern = re.compile(r"(\S)\1{%d,}" % (run - 1))
    return sum(m.end() - m.start() for m in pattern.finditer(text)) / len(text)


class Cleaner:
    def __init__(self, cfg: CleanConfig):
        self.cfg = cfg
        self.pii_counts: Counter = Counter()
        self._pii = [(k, *PII_PATTERNS[k]) for k in PII_PATTERNS if cfg.pii is not None and getattr(cfg.pii, k)]
        self._run_re = re.compile(r"(\S)\1{%d,}" % (cfg.char_run - 1))

    def normalize(self, text: str) -> str:
        c = self.cfg
        if c.normalize != "none":
            text = unicodedata.normalize(c.normalize, text)
        if c.normalize_whitespace:
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        if c.remove_control:
            text = _CONTROL.sub("", text)
        if c.normalize_whitespace:
            text = _TRAILING.sub("", text)
            text = _BLANKS.sub("\n\n\n", text)
            if c.collapse_spaces:
                text = _SPACES.sub(" ", text)
            text = text.strip("\n")
        return text

    def mask_pii(self, text: str) -> str:
        for kind, pattern, token in self._pii:
            text, n = pattern.subn(token, text)
            if n:
                self.pii_counts[kind] += n
        return text

    def __call__(self, text: str) -> tuple[Optional[str], Optional[str]]:
        c = self.cfg
        if len(text) > c.max_chars:
            return None, "too_long"
        text = self.normalize(text)
        if len(text) < max(c.min_chars, 1) or not text.strip():
            return None, "too_short"
        if len(text) > c.max_chars:
            return None, "too_long"
        if repeated_line_fraction(text) > c.max_repeated_line_fraction:
            return None, "repeated_lines"
        if sum(m.end() - m.start() for m in self._run_re.finditer(text)) / len(text) > c.max_char_run_fraction:
            return None, "repeated_chars"
        if self._pii:
            text = self.mask_pii(text)
        return text, None
