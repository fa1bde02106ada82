"""MiniLM fine-tuned on small slices of the shared SST-2 / CoNLL-2003 data beats the majority baseline,
for full fine-tuning and LoRA. Data is located via LMFORGE_DATA (default <repo>/../shared/data)."""

import os
from pathlib import Path

import pytest
import torch

from lmforge.finetune.config import load_finetune_config
from lmforge.finetune.trainer import finetune

DATA = Path(os.environ.get("LMFORGE_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


def _need(*parts) -> Path:
    p = DATA.joinpath(*parts)
    if not p.is_file():
        pytest.skip(f"{p} not found (set LMFORGE_DATA to the shared data folder)")
    return p


@pytest.fixture(scope="module")
def minilm():
    from lmforge.finetune.model import minilm_path

    try:
        return minilm_path()
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"all-MiniLM-L6-v2 unavailable: {e}")


def _run(tmp_path, minilm, task, train, dev, method, n_train, epochs, lr):
    torch.manual_seed(0)
    ov = [f"--base.path={minilm}", f"--task={task}", f"--data.train={train}", f"--data.validation={dev}",
          f"--data.max_train_examples={n_train}", "--data.max_eval_examples=120", "--data.max_len=48",
          f"--method.name={method}", f"--train.epochs={epochs}", "--train.batch_size=16", f"--optimizer.lr={lr}",
          "--train.threads=2", f"--run_dir={tmp_path / 'run'}"]
    return finetune(load_finetune_config(None, ov))


@pytest.mark.parametrize("method,lr", [("full", 1e-4), ("lora", 2e-3)])
def test_sst2_slice_beats_majority(tmp_path, minilm, method, lr):
    train, dev = _need("sst2", "train.tsv"), _need("sst2", "dev.tsv")
    s = _run(tmp_path, minilm, "classification", train, dev, method, 240, 2, lr)
    acc, base = s["validation"]["val_accuracy"], s["majority_baseline_accuracy"]
    assert acc > base + 0.08, (acc, base)
    if method == "lora":
        assert (tmp_path / "run" / "merged" / "model.safetensors").is_file()
        assert s["params"]["trainable_pct"] < 2.0


@pytest.mark.parametrize("method,lr", [("full", 2e-4), ("lora", 3e-3)])
def test_conll_slice_beats_majority(tmp_path, minilm, method, lr):
    train, dev = _need("conll2003", "train.txt"), _need("conll2003", "valid.txt")
    s = _run(tmp_path, minilm, "token-classification", train, dev, method, 200, 3, lr)
    v = s["validation"]
    # majority baseline: every word 'O' → token accuracy = share of O, entity F1 = 0
    assert v["val_accuracy"] > s["majority_baseline_accuracy"] + 0.02, (v, s["majority_baseline_accuracy"])
    assert v["val_micro_f1"] > 0.15, v


def test_conll_iob1_files_scored_as_iob2(tmp_path, minilm):
    """The IOB1 copy is detected, converted, and yields the same gold entities as the IOB2 copy."""
    from lmforge.data.tokenizer import load_tokenizer
    from lmforge.finetune.data import encode_conll_file

    iob1, iob2 = _need("conll2003", "iob1", "eng.testa"), _need("conll2003", "valid.txt")
    tok = load_tokenizer(minilm)
    a, label2id, scheme = encode_conll_file(str(iob1), tok, 64, None, max_examples=300, seed=0)
    b, _, scheme2 = encode_conll_file(str(iob2), tok, 64, label2id, max_examples=300, seed=0)
    assert (scheme, scheme2) == ("iob1", "iob2")
    assert [e["tags"] for e in a] == [e["tags"] for e in b]
    assert [e["labels"] for e in a] == [e["labels"] for e in b]


# ----------------------------------------------------------------------------- vocabulary extension
FILLER = "的一是在不了有和人这中大为上个我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说"
POS, NEG = "好棒赞爽", "差烂糟坑"


def _zh_files(root: Path) -> Path:
    import random

    rng = random.Random(0)
    for name, n in (("train.tsv", 240), ("dev.tsv", 80)):
        rows = ["sentence\tlabel"]
        for _ in range(n):
            y = int(rng.random() < 0.5)
            chars = rng.choices(FILLER, k=rng.randint(4, 10))
            chars.insert(rng.randrange(len(chars) + 1), rng.choice(POS if y else NEG))
            rows.append("".join(chars) + f"\t{y}")
        (root / name).write_text("\n".join(rows) + "\n", encoding="utf-8")
    return root


def test_add_unknown_chars_lets_an_english_base_read_chinese(tmp_path, minilm):
    """MiniLM's WordPiece maps the sentiment characters to [UNK]: without the extension the classes are
    indistinguishable; with it they are learnt, and ``lmforge evaluate`` rebuilds the same vocabulary."""
    from lmforge.finetune.evaluation import evaluate_run
    from lmforge.finetune.model import load_base
    from lmforge.finetune.vocab import unknown_chars

    _, tok, _ = load_base(minilm)
    d = _zh_files(tmp_path)
    found = unknown_chars(tok, [FILLER * 3 + POS + NEG], 1)
    assert set(POS + NEG) <= set(found), found
    assert unknown_chars(tok, ["plain english text"], 1) == []

    def run(name, extra):
        torch.manual_seed(0)
        ov = [f"--base.path={minilm}", f"--data.train={d / 'train.tsv'}", f"--data.validation={d / 'dev.tsv'}",
              "--data.max_len=24", "--train.epochs=3", "--train.batch_size=16", "--optimizer.lr=2e-4",
              "--train.threads=2", f"--run_dir={tmp_path / name}"] + extra
        return finetune(load_finetune_config(None, ov))

    plain = run("plain", [])
    ext = run("ext", ["--base.add_unknown_chars=1"])
    base = ext["majority_baseline_accuracy"]
    assert plain["validation"]["val_accuracy"] < base + 0.15, plain["validation"]
    assert ext["validation"]["val_accuracy"] > 0.9, ext["validation"]
    assert (tmp_path / "ext" / "tokenizer.json").is_file() and not (tmp_path / "plain" / "tokenizer.json").exists()
    rep = evaluate_run(str(tmp_path / "ext"), str(d / "dev.tsv"), show=False)
    assert rep["accuracy"] == pytest.approx(ext["validation"]["val_accuracy"])


def test_resize_vocab_keeps_rows_and_ties(tmp_path):
    from lmforge.config import ModelConfig
    from lmforge.finetune.model import LmforgeBackbone
    from lmforge.finetune.vocab import resize_vocab
    from lmforge.models import build_model

    for tie in (True, False):
        m = build_model(ModelConfig(vocab_size=50, d_model=16, n_layers=1, n_heads=2, max_seq_len=16,
                                    tie_embeddings=tie), seed=0)
        old_emb, old_out = m.tok_embeddings.weight.detach().clone(), m.output.weight.detach().clone()
        assert resize_vocab(LmforgeBackbone(m), 53) == 3
        assert m.tok_embeddings.weight.shape == (53, 16) and m.output.weight.shape == (53, 16)
        assert m.cfg.vocab_size == 53 and (m.output.weight is m.tok_embeddings.weight) == tie
        torch.testing.assert_close(m.tok_embeddings.weight[:50], old_emb)
        torch.testing.assert_close(m.output.weight[:50], old_out)
        new = m.tok_embeddings.weight[50:].detach()
        assert not torch.equal(new[0], new[1])  # distinct rows, on the scale of the old ones
        assert 0.5 < new.std().item() / old_emb.std().item() < 2.0
        assert m(torch.tensor([[0, 52]])).shape == (1, 2, 53)
        assert resize_vocab(LmforgeBackbone(m), 40) == 0  # never shrinks
