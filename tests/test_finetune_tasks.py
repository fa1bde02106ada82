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
