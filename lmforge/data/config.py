"""Config for ``lmforge data prepare``: sources → clean → dedup → tokenizer → packed output.

Loaded by the one loader of lmforge/config_loader.py: YAML plus ``--section.key=value`` overrides, unknown
keys rejected with the closest valid key suggested, every error at its file:line:column.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, model_validator

from lmforge.config import Section, load_root, validate_root


class SourceConfig(Section):
    """One input: a file, folder or glob of files, or an HF ``save_to_disk`` folder."""

    path: str
    type: Literal["auto", "text", "jsonl", "parquet", "csv", "tsv", "hf"] = "auto"
    field: str = Field("text", description="JSONL key / Parquet, CSV, HF column holding the text")
    weight: float = Field(1.0, gt=0, description="expected copies of each kept document (0.5: half, 2: twice)")
    doc_mode: Literal["file", "paragraph", "line"] = Field("file", description="text files: what one document is")
    hf_split: Optional[str] = Field(None, description="split of an HF DatasetDict (default: 'train' or the only one)")
    name: Optional[str] = Field(None, description="label in the summary (default: the path)")

    @property
    def label(self) -> str:
        return self.name or self.path


class PiiConfig(Section):
    emails: bool = True
    phones: bool = True
    ips: bool = True
    long_digits: bool = Field(True, description="runs of 9+ digits (ids, card numbers)")


class CleanConfig(Section):
    normalize: Literal["NFC", "NFKC", "none"] = "NFC"
    remove_control: bool = Field(True, description="drop control/format characters except tab and newline")
    normalize_whitespace: bool = Field(True, description="CRLF→LF, strip trailing spaces, ≤2 blank lines in a row")
    collapse_spaces: bool = Field(False, description="also collapse runs of spaces (breaks code indentation)")
    min_chars: int = Field(1, ge=0)
    max_chars: int = Field(1_000_000, ge=1, description="longer documents (or source lines) are dropped")
    max_repeated_line_fraction: float = Field(0.5, gt=0, le=1, description="drop if this fraction of non-empty "
                                              "lines are repeats of earlier lines")
    char_run: int = Field(16, ge=2, description="a run of this many identical characters counts as repetition")
    max_char_run_fraction: float = Field(0.3, gt=0, le=1, description="drop if runs cover more of the text")
    pii: Optional[PiiConfig] = Field(None, description="mask emails/phones/IPs/digit runs when set")


class DedupConfig(Section):
    exact: bool = True
    near: bool = True
    threshold: float = Field(0.8, gt=0, lt=1, description="estimated Jaccard similarity that counts as duplicate")
    num_perm: int = Field(128, ge=16)
    ngram: int = Field(5, ge=1, description="shingle size in words (CJK: characters)")


class TokenizerSection(Section):
    path: Optional[str] = Field(None, description="load this tokenizer instead of training one")
    vocab_size: int = Field(8192, ge=260)
    special_tokens: list[str] = ["<|endoftext|>", "<|pad|>"]
    min_frequency: int = Field(2, ge=1)
    train_max_bytes: int = Field(200_000_000, ge=1, description="text sampled to train the tokenizer")


class OutputConfig(Section):
    dir: str
    val_fraction: float = Field(0.01, ge=0, lt=1)
    seed: int = 0
    shard_tokens: int = Field(1 << 24, ge=1)
    num_workers: Optional[int] = Field(None, ge=0, description="tokenizer processes (None: all CPUs)")
    keep_staging: bool = Field(False, description="keep the cleaned+deduplicated text after packing")


class PrepareConfig(Section):
    sources: list[SourceConfig]
    clean: CleanConfig = CleanConfig()
    dedup: DedupConfig = DedupConfig()
    tokenizer: TokenizerSection = TokenizerSection()
    output: OutputConfig
    strict: bool = Field(False, description="stop with file:line on bad input instead of skipping and counting")
    max_skipped_fraction: float = Field(0.5, ge=0, le=1, description="warn loudly when more of the input records "
                                        "are skipped as bad input (strict: any bad input is an error)")

    @model_validator(mode="after")
    def _check(self) -> "PrepareConfig":
        if not self.sources:
            raise ValueError("sources: at least one source is required")
        if self.clean.min_chars > self.clean.max_chars:
            raise ValueError(f"clean.min_chars={self.clean.min_chars} exceeds clean.max_chars={self.clean.max_chars}")
        return self


def build_prepare_config(tree: dict, source: str = "") -> PrepareConfig:
    return validate_root(PrepareConfig, tree, source)


def load_prepare_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> PrepareConfig:
    """The shared loader (``lmforge/config_loader.py``); a file may nest everything under ``prepare:``."""
    return load_root(PrepareConfig, path, overrides, unwrap="prepare")
