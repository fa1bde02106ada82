import json
import os
from pathlib import Path

import pytest

from lmforge.data.tokenizer import EOS_TOKEN, PAD_TOKEN, Tokenizer, load_tokenizer, train_tokenizer

DATA = Path(os.environ.get("LMFORGE_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))

SAMPLES = [
    "def f(x):\n    return x * 2  # comment\n",
    "三国演义，第一回：宴桃园豪杰三结义。",
    "混合 text with 中文 and émojis 🤖🚀 and tabs\tand\r\nCRLF",
    "\x00\x01 control bytes \x7f and a lone combining mark e\u0301",
    "",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    corpus = SAMPLES * 5 + ["the quick brown fox jumps over the lazy dog"] * 20
    return train_tokenizer(corpus, vocab_size=400)


def test_special_tokens_and_vocab(tok):
    assert tok.eos_id == tok.token_to_id(EOS_TOKEN) == 0
    assert tok.pad_id == tok.token_to_id(PAD_TOKEN) == 1
    assert 256 + 2 <= tok.vocab_size <= 400
    # learned merges: a frequent word is shorter than its byte count
    assert len(tok.encode(" quick")) < len(" quick".encode())


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip_inline(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_encode_batch_matches_encode(tok):
    assert tok.encode_batch(SAMPLES) == [tok.encode(s) for s in SAMPLES]


def test_special_token_text_is_encoded_as_special(tok):
    ids = tok.encode("a" + EOS_TOKEN + "b")
    assert tok.eos_id in ids
    assert tok.decode(ids, skip_special_tokens=True) == "ab"


def test_round_trip_real_chinese():
    zh = DATA / "zh"
    if not zh.is_dir():
        pytest.skip(f"shared data not found at {zh} (set LMFORGE_DATA)")
    text = (zh / "classics" / "sanguoyanyi.txt").read_text(encoding="utf-8")[:60_000]
    reviews = (zh / "chnsenticorp" / "dev.tsv").read_text(encoding="utf-8").splitlines()[1:200]
    tok = train_tokenizer([text, *reviews], vocab_size=1000)
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(ids) < len(text.encode("utf-8")) / 2  # merges learned for Chinese
    for line in reviews:
        assert tok.decode(tok.encode(line)) == line


def test_save_load_file_and_folder(tok, tmp_path):
    f = tok.save(tmp_path / "dir")
    assert f.name == "tokenizer.json"
    for path in (f, tmp_path / "dir"):
        t2 = load_tokenizer(path)
        assert t2.sha256() == tok.sha256()
        assert (t2.eos_id, t2.pad_id, t2.vocab_size) == (tok.eos_id, tok.pad_id, tok.vocab_size)
        assert t2.encode(SAMPLES[2]) == tok.encode(SAMPLES[2])


def test_hf_folder_special_tokens(tmp_path):
    tok = train_tokenizer(["hello world"] * 5, vocab_size=300, special_tokens=["<s>", "</s>", "<pad>"])
    tok.save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "</s>"}, "pad_token": "<pad>"}))
    t2 = load_tokenizer(tmp_path)
    assert t2.eos_id == t2.token_to_id("</s>") == 1
    assert t2.pad_id == 2


def test_sha256_differs_for_different_tokenizers(tok):
    other = train_tokenizer(["something else entirely"] * 10, vocab_size=300)
    assert other.sha256() != tok.sha256()


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer found"):
        load_tokenizer(tmp_path / "missing")
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        load_tokenizer(bad)
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer(["x"], vocab_size=100)
