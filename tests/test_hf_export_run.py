"""`lmforge hf export`: a trained run's checkpoint + tokenizer → an HF folder transformers loads."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmforge.config import build_config, save_config
from lmforge.data.tokenizer import train_tokenizer
from lmforge.models import build_model
from lmforge.models.hf.convert import main
from lmforge.checkpoint import CheckpointManager

torch.set_num_threads(1)


def make_run(tmp_path):
    texts = ["hello world, this is lmforge.", "the quick brown fox jumps over the lazy dog"] * 50
    tok = train_tokenizer(texts, vocab_size=300)
    run = tmp_path / "run"
    run.mkdir()
    tok.save(run / "tokenizer.json")
    cfg = build_config({"run_dir": str(run), "model": {"preset": "tiny", "vocab_size": tok.vocab_size}})
    save_config(cfg, run / "config.yaml")
    model = build_model(cfg.model, seed=1)
    CheckpointManager(run, model=model).save(1)
    return run, model, tok


def test_export_run_loads_in_transformers(tmp_path, capsys):
    run, model, tok = make_run(tmp_path)
    out = tmp_path / "hf"
    assert main(["export", str(run), str(out)]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "hello lazy fox"
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    x = torch.tensor([tok.encode(text)])
    with torch.no_grad():
        assert (hf(input_ids=x).logits - model.eval()(x)).abs().max().item() <= 1e-4
    assert main(["check", str(out)]) == 0
    assert '"arch": "llama"' in capsys.readouterr().out
    assert main(["export", str(run), str(out)]) == 2  # refuses to overwrite
    assert "not empty" in capsys.readouterr().err
