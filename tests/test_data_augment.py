import pytest
import torch

from lmforge.data.augment import EDA, back_translate, class_weights, load_synonyms, oversample


@pytest.fixture
def syn_file(tmp_path):
    f = tmp_path / "syn.txt"
    f.write_text("# synonyms\ngood\tfine,great\nmovie film picture\n好\t棒\n")
    return f


def test_synonyms_and_eda(syn_file, tmp_path):
    syn = load_synonyms(syn_file)
    assert syn == {"good": ["fine", "great"], "movie": ["film", "picture"], "好": ["棒"]}
    text = "a good movie with a good plot and 好 acting"
    eda = EDA(syn, alpha=0.2, seed=1)
    out = eda.augment(text, n=8)
    assert out == EDA(syn, alpha=0.2, seed=1).augment(text, n=8)  # seeded
    words = text.split()
    rep = eda.synonym_replace(words)
    assert len(rep) == len(words) and rep != words
    assert all(a == b or a in syn[b] for a, b in zip(rep, words))
    ins = eda.random_insert(words)
    assert len(ins) > len(words) and all(w in ins for w in words)
    sw = eda.random_swap(words)
    assert sorted(sw) == sorted(words) and sw != words
    de = eda.random_delete(words)
    assert 0 < len(de) <= len(words) and all(w in words for w in de)
    bad = tmp_path / "bad.txt"
    bad.write_text("lonely\n")
    with pytest.raises(ValueError, match="bad.txt:1: 'lonely' has no synonyms"):
        load_synonyms(bad)


def test_balancing():
    texts = [f"t{i}" for i in range(13)]
    labels = [0] * 10 + [1] * 3
    t2, y2 = oversample(texts, labels, seed=0)
    assert y2.count(0) == y2.count(1) == 10
    assert set(t for t, y in zip(t2, y2) if y == 1) == {"t10", "t11", "t12"}
    w = class_weights(labels)
    assert torch.allclose(w, torch.tensor([13 / 20, 13 / 6]))
    assert w[1] / w[0] == pytest.approx(10 / 3)
    assert class_weights([0, 0, 2], num_classes=3)[1] == 0


def test_back_translation_with_tiny_local_model(tmp_path):
    from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

    from lmforge.data.tokenizer import train_tokenizer

    tok = train_tokenizer(["the cat sat on the mat", "a dog ran"] * 10, vocab_size=300,
                          special_tokens=["<|endoftext|>", "<|pad|>"])
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok.hf, eos_token="<|endoftext|>", pad_token="<|pad|>")
    cfg = T5Config(vocab_size=tok.vocab_size, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                   pad_token_id=tok.pad_id, eos_token_id=tok.eos_id, decoder_start_token_id=tok.pad_id)
    torch.manual_seed(0)
    model_dir = tmp_path / "tiny_t5"
    T5ForConditionalGeneration(cfg).save_pretrained(model_dir)
    hf_tok.save_pretrained(model_dir)
    src = ["the cat sat", "a dog ran on the mat"]
    out = back_translate(src, model_dir, max_new_tokens=6)
    assert len(out) == 2 and all(isinstance(s, str) for s in out)
    assert out == back_translate(src, model_dir, max_new_tokens=6)  # greedy: deterministic
