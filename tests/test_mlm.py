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


@pytest.mark.skipif(not (DATA / "tinyshakespeare" / "input.txt").exists(),
                    reason=f"shared data not found at {DATA} (set LMFORGE_DATA)")
def test_bert_mlm_pretraining_beats_unigram_baseline(tmp_path):
    """`lmforge train` with objective mlm on tinyshakespeare: masked-token accuracy well above the unigram guess."""
    import numpy as np

    from lmforge.config import build_config
    from lmforge.inference import load_run
    from lmforge.training.trainer import train

    text = (DATA / "tinyshakespeare" / "input.txt").read_text()
    docs = [p for p in text.split("\n\n") if p.strip()]
    tok = train_tokenizer(docs, vocab_size=512, special_tokens=SPECIALS)
    packed = tmp_path / "packed"
    pack_documents(docs, tok, packed, val_fraction=0.05, seed=0, num_workers=0)
    tok.save(packed / "tokenizer.json")
    cfg = build_config({
        "run_dir": str(tmp_path / "run"),
        "model": {"arch": "bert", "d_model": 128, "n_layers": 2, "n_heads": 4, "ffn_hidden": 256, "max_seq_len": 64},
        "data": {"path": str(packed), "seq_len": 64},
        "optimizer": {"lr": 2e-3, "weight_decay": 0.01},
        "scheduler": {"warmup_steps": 20},
        "training": {"max_steps": 600, "micro_batch_size": 16, "eval_every": 0, "eval_batches": 4,
                     "precision": "fp32"},
        "checkpoint": {"every_steps": 0}, "logging": {"tensorboard": False, "progress": False, "report": False},
    })
    assert cfg.training.objective == "mlm"
    summary = train(cfg)
    assert summary["steps"] == 600 and np.isfinite(summary["val_loss"])

    model, _, _, _ = load_run(tmp_path / "run")
    train_ids = np.asarray(TokenShards(packed, "train").read(0, len(TokenShards(packed, "train"))))
    counts = np.bincount(train_ids, minlength=tok.vocab_size)
    counts[[tok.eos_id, tok.pad_id, find_mask_id(tok)]] = 0
    unigram = int(counts.argmax())
    base = SequentialEvalLoader(TokenShards(packed, "val"), seq_len=64, batch_size=16)  # every window: less noise
    hits = unigram_hits = n = 0
    with torch.no_grad():  # every validation window under three mask draws: the estimate's noise is ~0.01 per draw
        for b in (b for seed in (123, 124, 125) for b in MLMEvalLoader(base, tok, find_mask_id(tok), 0.15,
                                                                         tok.vocab_size, seed=seed)):
            sel = b["labels"] != -100
            pred = model(b["input_ids"]).argmax(-1)
            hits += int((pred[sel] == b["labels"][sel]).sum())
            unigram_hits += int((b["labels"][sel] == unigram).sum())
            n += int(sel.sum())
    acc, base_acc = hits / n, unigram_hits / n
    print(f"masked-token accuracy {acc:.3f} vs unigram baseline {base_acc:.3f}")
    assert acc > base_acc + 0.08 and acc > 2 * base_acc, (acc, base_acc)
