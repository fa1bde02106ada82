import os
import random
from pathlib import Path

import pytest

from lmforge.data.clean import Cleaner, char_run_fraction, repeated_line_fraction
from lmforge.data.config import CleanConfig, DedupConfig, PiiConfig
from lmforge.data.dedup import Deduplicator, exact_key, jaccard_estimate

DATA = Path(os.environ.get("LMFORGE_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


def test_normalisation_and_control_chars():
    c = Cleaner(CleanConfig(normalize="NFKC"))
    text, reason = c("ｆｕｌｌ\u200bwidth\x00 e\u0301\r\nline  \t\r\n\n\n\n\n\nend\ufeff")
    assert reason is None
    assert text == "fullwidth é\nline\n\n\nend"
    nfc = Cleaner(CleanConfig(normalize="NFC"))("ｆｕｌｌ e\u0301")[0]
    assert nfc == "ｆｕｌｌ é"  # NFC keeps compatibility characters
    code = "def f():\n    if x:\n        return 1\n"
    assert Cleaner(CleanConfig())(code)[0] == code.rstrip("\n")  # indentation survives
    assert Cleaner(CleanConfig(collapse_spaces=True))("a    b")[0] == "a b"


def test_length_and_repetition_filters():
    c = Cleaner(CleanConfig(min_chars=5, max_chars=100, max_repeated_line_fraction=0.5, char_run=5,
                            max_char_run_fraction=0.3))
    assert c("abc") == (None, "too_short")
    assert c("x" * 101)[1] == "too_long"
    assert c("\n".join(["same line"] * 5 + ["other"]))[1] == "repeated_lines"
    assert c("hello !!!!!!!!!!!!!!!!!!!!")[1] == "repeated_chars"
    assert c("a normal sentence.")[1] is None
    assert repeated_line_fraction("a\nb\na\na") == 0.5
    assert char_run_fraction("aaaab", 4) == 0.8


def test_pii_masking_counts():
    c = Cleaner(CleanConfig(pii=PiiConfig()))
    text, _ = c("mail bob.smith@example.com or call +1 415-555-0132, 手机 13812345678, "
                "host 192.168.1.20, card 4111111111111111, year 2024")
    assert "<EMAIL>" in text and "bob.smith" not in text
    assert text.count("<PHONE>") == 2 and "<IP>" in text and "<NUM>" in text
    assert "2024" in text
    assert dict(c.pii_counts) == {"emails": 1, "phones": 2, "ips": 1, "long_digits": 1}
    off = Cleaner(CleanConfig(pii=PiiConfig(emails=False, phones=False, ips=False)))
    assert "a@b.org" in off("a@b.org 1234567890")[0]


def test_chinese_text_survives_cleaning():
    zh = DATA / "zh" / "classics" / "shuihuzhuan.txt"
    if not zh.is_file():
        pytest.skip(f"shared data not found at {zh} (set LMFORGE_DATA)")
    raw = zh.read_text(encoding="utf-8")[:20000]
    text, reason = Cleaner(CleanConfig(normalize="NFKC", pii=PiiConfig()))(raw)
    assert reason is None and "\r" not in text
    han = sum("\u4e00" <= ch <= "\u9fff" for ch in raw)
    assert sum("\u4e00" <= ch <= "\u9fff" for ch in text) == han


def _docs(n, rng, vocab):
    return [" ".join(rng.choice(vocab) for _ in range(rng.randint(250, 400))) for _ in range(n)]


def _perturb(doc, rng, k):
    words = doc.split()
    for _ in range(k):
        words[rng.randrange(len(words))] = rng.choice(["foo", "bar", "baz"])
    return " ".join(words)


def test_near_dedup_recall_and_precision():
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(2000)]
    originals = _docs(150, rng, vocab)
    planted = [_perturb(d, rng, 2) for d in originals[:50]]  # true Jaccard ~0.95
    distinct = _docs(100, rng, vocab)
    d = Deduplicator(DedupConfig(exact=True, near=True, threshold=0.8))
    assert all(d.is_duplicate(x) is None for x in originals)
    recall = sum(d.is_duplicate(x) == "near_duplicate" for x in planted) / len(planted)
    false_pos = sum(d.is_duplicate(x) is not None for x in distinct) / len(distinct)
    assert recall >= 0.95
    assert false_pos == 0.0


def test_exact_dedup_and_cjk_shingles():
    d = Deduplicator(DedupConfig(near=False))
    assert d.is_duplicate("Hello   World") is None
    assert d.is_duplicate("hello world\n") == "exact_duplicate"
    assert exact_key("a b") != exact_key("ab")
    zh = "滚滚长江东逝水，浪花淘尽英雄。是非成败转头空，青山依旧在，几度夕阳红。白发渔樵江渚上，惯看秋月春风。" * 2
    assert jaccard_estimate(zh, zh.replace("英雄", "豪杰")) > 0.6
    assert jaccard_estimate(zh, "天下大势，分久必合，合久必分。周末七国分争，并入于秦。") < 0.2
