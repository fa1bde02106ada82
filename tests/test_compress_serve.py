"""Compressed outputs serve: ``lmforge serve`` on a quantized, a structurally pruned, a distilled and an
exported folder (no flag saying it is compressed), with greedy completions over HTTP equal to the same
folder's model run in-process through the normal loader.

Both sides run each prompt alone, and the server decodes unpadded (``--batch-invariant off``), so they do
the same arithmetic: a dynamic int8 kernel quantizes activations per tensor, so a row's logits depend on the
rows beside it, and a tiny briefly-trained model has near-ties (top-2 logits 5e-4 apart) that such a
difference flips (seen on AMD EPYC with fbgemm)."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.compress.config import load_compress_config
from lmforge.compress.run import compress
from lmforge.inference import load_run
from lmforge.models.generate import generate
from tests.helpers.runs import pack_tiny, tiny_cfg
from tests.helpers.serve import LiveServer

pytest.importorskip("fastapi")
FAST = ["--eval.batches=2", "--eval.batch_size=4", "--bench.enabled=false", "--train.batch_size=2",
        "--train.precision=fp32", "--prune.calib_batches=2"]
VARIANTS = {
    "quantize": ["--quantize.scheme=int8_dynamic"],
    "prune": ["--prune.method=structured", "--prune.ffn_fraction=0.3", "--prune.recover_steps=0"],
    "distill": ["--distill.n_layers=1", "--train.steps=2"],
    "export": ["--export.format=onnx"],
}
PROMPTS = ["the king", "to be or"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from lmforge.training.trainer import train

    root = tmp_path_factory.mktemp("lm")
    cfg = tiny_cfg(root / "run", pack_tiny(root / "data"), training={"max_steps": 6, "eval_every": 0})
    train(cfg)
    return root / "run"


@torch.inference_mode()
def _local_greedy(folder, n_new: int) -> list[str]:
    model, tok, _, _ = load_run(folder)
    return [tok.decode(generate(model, [tok.encode(p)], max_new_tokens=n_new, temperature=0.0, eos_id=tok.eos_id,
                                seed=0)[0]) for p in PROMPTS]


@pytest.mark.parametrize("method", list(VARIANTS))
def test_compressed_folder_serves(run, tmp_path, monkeypatch, method):
    monkeypatch.setenv("LMFORGE_PEAK_FLOPS", "1e11")
    out = tmp_path / method
    compress(method, load_compress_config(None, [f"--source={run}", f"--out={out}", *FAST, *VARIANTS[method]]))
    assert (out / "compression.json").is_file()
    want = _local_greedy(out, 6)
    server = LiveServer(out, tmp_path, extra=["--batch-invariant", "off"])
    try:
        server.wait_ready(90)
        got = []
        for prompt in PROMPTS:
            status, body, _ = server.post("/v1/completions", {"model": out.name, "prompt": prompt, "max_tokens": 6,
                                                               "temperature": 0})
            assert status == 200, body
            got.append(json.loads(body)["choices"][0]["text"])
        assert got == want
        assert server.get("/health", auth=False)[0] == 200
    finally:
        assert server.stop() == 0, server.log()
