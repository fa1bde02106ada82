"""lmforge compress on a fine-tuned classifier (a tiny BERT run, full fine-tuning on a synthetic sentiment task):
each output is a fine-tuning run folder that ``lmforge evaluate`` scores as any other."""

from __future__ import annotations

import random

import pytest
import torch

from lmforge.cli import main
from lmforge.compress.config import load_compress_config
from lmforge.compress.run import compress

torch.set_num_threads(1)
WORDS = ["the", "movie", "plot", "actor", "scene", "story", "film", "music", "ending", "cast"]
FAST = ["--bench.repeats=1", "--bench.batch=4", "--train.batch_size=8", "--train.precision=fp32",
        "--prune.calib_batches=1", "--quantize.calib_batches=1"]


def _sentence(rng, label):
    words = rng.choices(WORDS, k=rng.randint(3, 8))
    words.insert(rng.randrange(len(words) + 1), "great" if label else "awful")
    return " ".join(words)


@pytest.fixture(scope="module")
def ft_run(tmp_path_factory):
    """A 4-layer BERT base run and a 2-epoch full fine-tune of it."""
    from lmforge.checkpoint import CheckpointManager
    from lmforge.config import Config, DataConfig, ModelConfig, save_config
    from lmforge.data.tokenizer import train_tokenizer
    from lmforge.finetune.config import load_finetune_config
    from lmforge.finetune.trainer import finetune
    from lmforge.models import build_model

    root, rng = tmp_path_factory.mktemp("cls"), random.Random(0)
    tok = train_tokenizer([_sentence(rng, rng.random() < 0.5) for _ in range(300)], vocab_size=300)
    base = root / "base"
    base.mkdir()
    tok.save(base / "tokenizer.json")
    mc = ModelConfig(arch="bert", vocab_size=tok.vocab_size, d_model=32, n_layers=4, n_heads=4, max_seq_len=64)
    save_config(Config(run_dir=str(base), model=mc, data=DataConfig(path=None)), base / "config.yaml")
    CheckpointManager(base, model=build_model(mc, seed=0)).save(1)
    for name, n in (("train.tsv", 240), ("dev.tsv", 64)):
        rows = ["sentence\tlabel"] + [f"{_sentence(rng, y)}\t{y}" for y in (int(rng.random() < 0.5) for _ in range(n))]
        (root / name).write_text("\n".join(rows) + "\n")
    cfg = load_finetune_config(None, [f"--base.path={base}", f"--data.train={root / 'train.tsv'}",
                                      f"--data.validation={root / 'dev.tsv'}", f"--run_dir={root / 'ft'}",
                                      "--train.batch_size=16", "--data.max_len=32", "--train.precision=fp32",
                                      "--train.epochs=2", "--optimizer.lr=1e-3"])
    finetune(cfg)
    return root


def _compress(method, root, out, *over):
    cfg = load_compress_config(None, [f"--source={root / 'ft'}", f"--out={out}", *FAST, *over])
    return compress(method, cfg)


def _evaluate(out, root, capsys) -> None:
    capsys.readouterr()
    assert main(["evaluate", "--run", str(out), "--data", str(root / "dev.tsv"), "--name", "dev"]) == 0
    assert "accuracy" in capsys.readouterr().out


def test_quantize_classifier_evaluates(ft_run, tmp_path, capsys):
    rep = _compress("quantize", ft_run, tmp_path / "q")
    src, out = rep["columns"]["source"], rep["columns"]["quantize"]
    assert 0 <= out["val_accuracy"] <= 1 and abs(out["val_accuracy"] - src["val_accuracy"]) <= 0.05
    assert out["batch1_examples_per_s"] > 0 and out["throughput_examples_per_s"] > 0
    assert rep["step"]["smooth_alpha"] == 0.5 and rep["step"]["smooth_folded"] == []  # BERT's GELU FFN:
    assert len(rep["step"]["smooth_runtime"]) == 4  # run-time scales, rebuilt by the loader `evaluate` uses
    from safetensors import safe_open

    with safe_open(str(tmp_path / "q" / "best" / "adapter.safetensors"), "pt") as f:
        head = list(f.keys())
    assert head and not any(k.startswith("backbone.") for k in head)  # the backbone lives in base/ only
    assert rep["step"]["embeddings"] == ["tok_embeddings", "pos_embeddings", "type_embeddings"]
    from lmforge.compress.qembed import QuantizedEmbedding
    from lmforge.inference import load_run

    base = load_run(tmp_path / "q" / "base")[0]
    assert isinstance(base.tok_embeddings, QuantizedEmbedding) and base.mlm_head is None
    floats = _compress("quantize", ft_run, tmp_path / "q_float_tables", "--quantize.embeddings=false",
                       "--bench.enabled=false")
    c = base.cfg
    table_bytes = 4 * (c.vocab_size + c.max_seq_len + c.type_vocab_size) * c.d_model  # the three tables in fp32
    assert floats["step"]["embeddings"] == []
    assert floats["columns"]["quantize"]["file_bytes"] - out["file_bytes"] > 0.7 * table_bytes  # int8: 1/4 left
    _evaluate(tmp_path / "q", ft_run, capsys)


def test_structured_prune_and_distill_classifier(ft_run, tmp_path, capsys):
    rep = _compress("prune", ft_run, tmp_path / "s", "--prune.method=structured", "--prune.ffn_fraction=0.5",
                    "--prune.recover_steps=2")
    from lmforge.inference import load_run

    assert load_run(tmp_path / "s" / "base")[2].model.ffn_hidden == 64
    assert rep["columns"]["prune"]["val_accuracy"] >= 0
    _evaluate(tmp_path / "s", ft_run, capsys)
    rep = _compress("distill", ft_run, tmp_path / "d", "--distill.n_layers=2", "--train.steps=3")
    assert rep["step"]["student_layers"] == [0, 3]
    assert load_run(tmp_path / "d" / "base")[2].model.n_layers == 2
    _evaluate(tmp_path / "d", ft_run, capsys)


def test_export_classifier_parity(ft_run, tmp_path):
    from lmforge.finetune.evaluation import evaluate_run

    rep = _compress("export", ft_run, tmp_path / "e")
    assert rep["step"]["parity_max_abs"]["classifier"] <= 1e-4
    assert rep["columns"]["export"]["val_accuracy"] == rep["columns"]["source"]["val_accuracy"]
    dev = str(ft_run / "dev.tsv")
    ort = evaluate_run(str(tmp_path / "e"), dev, show=False, runtime="onnxruntime")
    assert ort["accuracy"] == evaluate_run(str(tmp_path / "e"), dev, show=False)["accuracy"]
