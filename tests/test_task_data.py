import json
import os
from pathlib import Path

import pytest
import torch

from lmforge.models.losses import IGNORE_INDEX as IGNORE
from lmforge.data.tasks import (MLMCollator, chat_prompt, encode_chat, encode_classification, pad_collate,
                                read_chat_jsonl, read_classification)
from lmforge.data.tasks_conll import (align_labels, build_label_map, detect_scheme, iob1_to_iob2, iob2_to_iob1,
                                      read_conll, word_predictions)
from lmforge.data.tokenizer import train_tokenizer

DATA = Path(os.environ.get("LMFORGE_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


def need(p):
    if not p.exists():
        pytest.skip(f"shared data not found at {p} (set LMFORGE_DATA)")
    return p


@pytest.fixture(scope="module")
def tok():
    text = ["EU rejects German call to boycott British lamb .", "Peter Blackburn BRUSSELS 1996-08-22",
            "the hotel was great 酒店很好 服务不错", "Summarize: the cat sat on the mat"] * 20
    return train_tokenizer(text, vocab_size=400, special_tokens=["<|endoftext|>", "<|pad|>", "<|mask|>"])


def test_classification_formats(tmp_path):
    sst = read_classification(need(DATA / "sst2" / "dev.tsv"))
    assert len(sst.texts) == 872 and sst.labels.count(1) == 444 and sst.label_names == ["0", "1"]
    zh = read_classification(need(DATA / "zh" / "chnsenticorp" / "dev.tsv"))
    assert len(zh.texts) == 1200 and zh.labels.count(0) == 607 and any("酒店" in t for t in zh.texts)
    j = tmp_path / "x.jsonl"
    j.write_text('{"text": "good", "label": "pos"}\n{"text": "bad", "label": "neg"}\n')
    d = read_classification(j)
    assert d.label_names == ["neg", "pos"] and d.labels == [1, 0]
    c = tmp_path / "x.csv"
    c.write_text('review,class\n"fine, ok",pos\n')
    assert read_classification(c, label_names=["neg", "pos"]).labels == [1]
    with pytest.raises(ValueError, match="x.csv:2: label 'pos' not in"):
        read_classification(c, label_names=["a", "b"])
    with pytest.raises(ValueError, match="text column 'nope' not found"):
        read_classification(c, text_field="nope")


def test_classification_encoding_and_collate(tok, tmp_path):
    c = tmp_path / "x.tsv"
    c.write_text("sentence\tlabel\nthe hotel was great \t1\nbad\t0\n")
    ex = encode_classification(tok, read_classification(c), max_len=4)
    assert ex[0]["input_ids"][-1] == tok.eos_id and len(ex[0]["input_ids"]) <= 4
    b = pad_collate(ex, tok.pad_id)
    assert b["input_ids"].shape[0] == 2 and b["label"].tolist() == [1, 0]
    assert b["attention_mask"][1].sum() == len(ex[1]["input_ids"])


def test_iob_conversion_on_real_conll():
    iob1 = read_conll(need(DATA / "conll2003" / "iob1" / "eng.testa"))
    iob2 = read_conll(need(DATA / "conll2003" / "valid.txt"))
    assert len(iob1) == len(iob2) == 3250
    assert detect_scheme(iob1) == "iob1" and detect_scheme(iob2) == "iob2"
    assert all(iob1_to_iob2(a.tags) == b.tags for a, b in zip(iob1, iob2))
    assert all(iob2_to_iob1(b.tags) == a.tags for a, b in zip(iob1, iob2))
    assert iob1_to_iob2(["I-PER", "I-PER", "B-PER", "O", "I-LOC"]) == ["B-PER", "I-PER", "B-PER", "O", "B-LOC"]


def test_label_alignment(tok):
    words = ["EU", "rejects", "German", "call", "to", "boycott", "British", "lamb", "."]
    tags = ["B-ORG", "O", "B-MISC", "O", "O", "O", "B-MISC", "O", "O"]
    sents = [type("S", (), {"tags": tags})()]
    l2i = build_label_map(sents)
    assert l2i["O"] == 0
    out = align_labels(tok, words, tags, l2i)
    assert tok.decode(out["input_ids"]) == " ".join(words)
    firsts = [i for i, w in enumerate(out["word_ids"]) if w >= 0 and (i == 0 or out["word_ids"][i - 1] != w)]
    assert [out["word_ids"][i] for i in firsts] == list(range(len(words)))
    assert [out["labels"][i] for i in firsts] == [l2i[t] for t in tags]
    assert sum(lab != IGNORE for lab in out["labels"]) == len(words)
    # every token belongs to the word whose text it contains
    for i, w in enumerate(out["word_ids"]):
        assert tok.decode([out["input_ids"][i]]).strip() in words[w]
    id2l = {v: k for k, v in l2i.items()}
    assert word_predictions(out["labels"], out["word_ids"], len(words), id2l) == tags
    rare = align_labels(tok, ["Blackburnization"], ["B-PER"], {"O": 0, "B-PER": 1, "I-PER": 2}, label_all_subwords=True)
    assert len(rare["input_ids"]) > 1 and rare["labels"][0] == 1 and set(rare["labels"][1:]) == {2}


def test_chat_masking(tok, tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text(json.dumps({"prompt": "Summarize: the cat", "response": "cat sat"}) + "\n" + json.dumps(
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "hello"}, {"role": "user", "content": "again"},
                      {"role": "assistant", "content": "the mat"}]}) + "\n")
    convs = read_chat_jsonl(f)
    ex = encode_chat(tok, convs[0], max_len=512)
    kept = [t for t in ex["labels"] if t != IGNORE]
    assert tok.decode(kept) == "cat sat<|endoftext|>"
    assert len(ex["input_ids"]) == len(ex["labels"])
    prompt = chat_prompt(tok, convs[0][:1])
    assert ex["input_ids"][: len(prompt)] == prompt  # training and generation agree on the prefix
    ex2 = encode_chat(tok, convs[1], max_len=512)
    assert tok.decode([t for t in ex2["labels"] if t != IGNORE]) == "hello<|endoftext|>the mat<|endoftext|>"
    assert len(encode_chat(tok, convs[1], max_len=5)["input_ids"]) == 5
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    with pytest.raises(ValueError, match="b.jsonl:1: expected 'messages' or"):
        read_chat_jsonl(bad)


def test_mlm_masking_statistics():
    mask_id, pad, vocab = 2, 1, 1000
    col = MLMCollator(mask_id, vocab, pad, special_ids=[0], prob=0.15, seed=0)
    ids_BT = torch.randint(3, vocab, (64, 512))
    ids_BT[:, -10:] = pad
    inputs, labels = col.mask(ids_BT)
    chosen = labels != IGNORE
    assert not chosen[:, -10:].any()  # padding never chosen
    frac = chosen.float().sum() / (64 * 502)
    assert 0.14 < frac < 0.16
    assert torch.equal(labels[chosen], ids_BT[chosen])
    n = chosen.sum().item()
    masked = (inputs[chosen] == mask_id).sum().item() / n
    unchanged = (inputs[chosen] == ids_BT[chosen]).sum().item() / n
    assert 0.77 < masked < 0.83 and 0.08 < unchanged < 0.12  # random ids make up the rest (~10%)
    assert torch.equal(inputs[~chosen], ids_BT[~chosen])
    again = MLMCollator(mask_id, vocab, pad, special_ids=[0], seed=0).mask(ids_BT)
    assert torch.equal(again[0], inputs)
    batch = col([{"input_ids": [5, 6, 7]}, {"input_ids": [8]}])
    assert batch["input_ids"].shape == (2, 3) and batch["labels"][1, 1:].eq(IGNORE).all()
