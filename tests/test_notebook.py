"""examples/quickstart.ipynb runs top to bottom (nbclient, a fresh kernel in a temporary folder) and its
outputs show each stage worked: data packed, loss falling below a uniform guess, a sample, an HF export whose
greedy output equals lmforge's."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="nbformat is in the test extra: pip install -e '.[test]'")
nbclient = pytest.importorskip("nbclient", reason="nbclient is in the test extra: pip install -e '.[test]'")
pytest.importorskip("ipykernel", reason="ipykernel is in the test extra: pip install -e '.[test]'")
pytest.importorskip("transformers", reason="the notebook's HF export step loads the folder with transformers")

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "quickstart.ipynb"


def _stream(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")


def test_quickstart_notebook_runs_and_each_stage_works(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.delenv("LMFORGE_PEAK_FLOPS", raising=False)
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit the notebook without outputs"
    nbclient.NotebookClient(nb, timeout=240, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "\n".join(_stream(c) for c in nb.cells if c.cell_type == "code")
    line = next(ln for ln in text.splitlines() if ln.startswith("RESULT "))
    r = json.loads(line[len("RESULT "):])
    assert r["corpus_files"] > 0 and r["train_tokens"] > 50_000
    assert r["steps"] == 60 and r["last_loss"] < r["first_loss"] - 0.5
    assert math.isfinite(r["val_loss"]) and r["val_loss"] < r["uniform_loss"] - 0.5
    assert len(r["sample"]) > 0 and "step     60/60" in text
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(r["hf_files"])
    assert r["hf_class"] == "LlamaForCausalLM" and r["hf_matches"] is True
    assert (tmp_path / "runs" / "notebook" / "hf" / "config.json").is_file()
    print(f"notebook: {r['seconds']} s, val loss {r['val_loss']:.3f} (uniform {r['uniform_loss']:.3f})")
