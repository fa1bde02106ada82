"""Masked-LM objective: batch masking is deterministic per loader state; BERT pretraining learns."""

import os
from pathlib import Path

import pytest
import torch

from lmforge.data.loader import RandomWindowLoader, SequentialEvalLoader, TokenShards
from lmforge.data.mlm import MLMEvalLoader, MLMLoader, find_mask_id
from lmforge.data.pack import pack_documents
from lmforge.data.tokenizer import train_tokenizer

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("LMFORGE_DATA", REPO.parent / "shared" / "data"))
SPECIALS = ["<|endoftext|>", "<|pad|>", "<|mask|>"]


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    docs = [f"line {i}: the quick brown fox jumps over the lazy dog number {i % 17}" for i in range(400)]
    tok = train_tokenizer(docs, vocab_size=300, special_tokens=SPECIALS)
    out = tmp_path_factory.mktemp("mlm") / "packed"
    pack_documents(docs, tok, out, val_fraction=0.05, seed=0, num_workers=0)
    tok.save(out / "tokenizer.json")
    return out, tok


def _loader(out, tok, seed=0):
    base = RandomWindowLoader(TokenShards(out, "train"), seq_len=32, batch_size=8, seed=seed)
    return MLMLoader(base, tok, find_mask_id(tok), 0.15, tok.vocab_size, seed=seed)


def test_masking_statistics_and_labels(packed):
    out, tok = packed
    mask_id = find_mask_id(tok)
    loader = _loader(out, tok)
    picked = masked = kept = total = 0
    for _ in range(40):
        raw = loader.base.__class__(loader.base.shards, 32, 8, seed=0)
        raw.load_state_dict(loader.state_dict())
        orig = raw.next_batch()["input_ids"]
        b = loader.next_batch()
        sel = b["labels"] != -100
        assert torch.equal(b["labels"][sel], orig[sel])  # labels are the original tokens
        assert torch.equal(b["input_ids"][~sel], orig[~sel])  # unpicked positions untouched
        assert not torch.isin(orig[sel], torch.tensor([tok.eos_id, tok.pad_id])).any()  # specials never picked
        picked += int(sel.sum())
        masked += int((b["input_ids"][sel] == mask_id).sum())
        kept += int((b["input_ids"][sel] == orig[sel]).sum())
        total += orig.numel()
    assert 0.12 < picked / total < 0.18
    assert 0.75 < masked / picked < 0.85
    assert 0.07 < kept / picked < 0.16  # 10% unchanged + random draws that hit the same id


def test_resume_reproduces_batches(packed):
    out, tok = packed
    a = _loader(out, tok)
    for _ in range(3):
        a.next_batch()
    state = a.state_dict()
    want = [a.next_batch() for _ in range(2)]
    b = _loader(out, tok)
    b.load_state_dict(state)
    got = [b.next_batch() for _ in range(2)]
    for x, y in zip(want, got):
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"])


def test_eval_masks_fixed(packed):
    out, tok = packed
    base = SequentialEvalLoader(TokenShards(out, "val"), seq_len=16, batch_size=2, max_batches=3)
    ev = MLMEvalLoader(base, tok, find_mask_id(tok), 0.15, tok.vocab_size, seed=0)
    one, two = list(ev), list(ev)
    assert len(one) == len(base) > 0
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(one, two))


def test_missing_mask_token_is_a_clear_error():
    from lmforge.config import ConfigError

    tok = train_tokenizer(["abc def"] * 20, vocab_size=270)
    with pytest.raises(ConfigError, match="tokenizer.special_tokens"):
        find_mask_id(tok)
