"""Byte-level BPE tokenizer: train with HF ``tokenizers``, load from tokenizer.json or an HF folder.

Byte-level means every UTF-8 string (code, Chinese, emoji, control bytes) round-trips exactly through
``encode``/``decode``; there is no unknown token.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Optional

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from lmforge.errors import ConfigError, DataError

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
DEFAULT_SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN)
# Names other tokenizers use for end-of-text / padding, tried in order when loading a foreign one.
_EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<eos>", "<|end_of_text|>", "[SEP]")
_PAD_CANDIDATES = (PAD_TOKEN, "<pad>", "[PAD]")


class Tokenizer:
    """Thin wrapper over ``tokenizers.Tokenizer`` with the ids lmforge needs (eos, pad) resolved."""

    def __init__(self, hf: _HFTokenizer, eos_token: Optional[str] = None, pad_token: Optional[str] = None):
        self.hf = hf
        self.eos_token = eos_token or _first_present(hf, _EOS_CANDIDATES)
        self.pad_token = pad_token or _first_present(hf, _PAD_CANDIDATES)
        self.eos_id: Optional[int] = hf.token_to_id(self.eos_token) if self.eos_token else None
        self.pad_id: Optional[int] = hf.token_to_id(self.pad_token) if self.pad_token else None
        if self.eos_token and self.eos_id is None:
            raise DataError(f"eos token {self.eos_token!r} is not in the tokenizer vocabulary")
        if self.pad_token and self.pad_id is None:
            raise DataError(f"pad token {self.pad_token!r} is not in the tokenizer vocabulary")

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> Optional[int]:
        return self.hf.token_to_id(token)

    def id_to_token(self, i: int) -> Optional[str]:
        return self.hf.id_to_token(int(i))

    def to_json(self) -> str:
        return self.hf.to_str()

    def save(self, path: str | Path) -> Path:
        """Write tokenizer.json (``path`` may be a folder or a file name). Returns the file path."""
        path = Path(path)
        if path.suffix != ".json":
            path.mkdir(parents=True, exist_ok=True)
            path = path / "tokenizer.json"
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.to_json(), encoding="utf-8")
        tmp.replace(path)
        return path

    def sha256(self) -> str:
        """Hash of the canonical JSON serialisation: equal hashes mean identical tokenization."""
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id}, pad_id={self.pad_id})"


def _first_present(hf: _HFTokenizer, candidates: Iterable[str]) -> Optional[str]:
    for tok in candidates:
        if hf.token_to_id(tok) is not None:
            return tok
    return None


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    special_tokens: list[str] | tuple[str, ...] = DEFAULT_SPECIAL_TOKENS,
    min_frequency: int = 2,
    show_progress: bool = False,
) -> Tokenizer:
    """Train a byte-level BPE tokenizer on ``texts`` (streamed; never materialised as a list)."""
    special_tokens = list(special_tokens)
    n_base = len(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < n_base + len(special_tokens):
        raise ConfigError(f"vocab_size={vocab_size} is too small: byte-level BPE needs at least "
                         f"{n_base} byte tokens + {len(special_tokens)} special tokens")
    hf = _HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    hf.train_from_iterator(texts, trainer=trainer)
    eos = EOS_TOKEN if EOS_TOKEN in special_tokens else (special_tokens[0] if special_tokens else None)
    pad = PAD_TOKEN if PAD_TOKEN in special_tokens else None
    return Tokenizer(hf, eos_token=eos, pad_token=pad)


def _special_from_hf_config(folder: Path) -> tuple[Optional[str], Optional[str]]:
    """eos/pad token strings from an HF folder's tokenizer_config.json / special_tokens_map.json."""
    eos = pad = None
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        f = folder / name
        if not f.is_file():
            continue
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"{f}: not valid JSON ({e})") from None

        def tok(v):
            return v.get("content") if isinstance(v, dict) else v

        eos = eos or tok(data.get("eos_token"))
        pad = pad or tok(data.get("pad_token"))
    return eos, pad


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer.json file, a folder holding one (e.g. packed data), or an HF tokenizer folder."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no tokenizer found at {path} (expected a tokenizer.json file or a folder "
                                f"containing one)")
    try:
        hf = _HFTokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise DataError(f"{file}: not a valid tokenizer.json ({e})") from None
    hf.no_padding()  # HF folders may ship fixed-length padding/truncation (e.g. sentence-transformers);
    hf.no_truncation()  # encode() must return exactly the text's tokens
    eos, pad = _special_from_hf_config(folder) if path.is_dir() else (None, None)
    if eos is not None and hf.token_to_id(eos) is None:
        eos = None
    if pad is not None and hf.token_to_id(pad) is None:
        pad = None
    return Tokenizer(hf, eos_token=eos, pad_token=pad)
