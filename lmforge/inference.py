"""Load a trained run folder (config + tokenizer + newest checkpoint) and generate text from it."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import torch

from lmforge.config import ConfigError, load_config


def find_tokenizer(run: Path, data_path: Optional[str]):
    from lmforge.data.tokenizer import load_tokenizer

    for cand in (run / "tokenizer.json", Path(data_path) / "tokenizer.json" if data_path else None):
        if cand is not None and cand.exists():
            return load_tokenizer(cand)
    raise ConfigError(f"no tokenizer.json in run folder {run} or in data.path={data_path}")


def load_run(run_dir: str | Path, checkpoint: Optional[str] = None, device: str = "cpu", runtime: str = "torch"):
    """→ (model in eval mode, tokenizer, config, checkpoint used): ``checkpoint`` when given, else the run's
    newest checkpoint that verifies (``lmforge.checkpoint.resolve_source``). A run written by ``lmforge compress``
    records what was done in ``compression.json``; its quantized layers are rebuilt here (``compress.restore``).
    ``runtime="onnxruntime"``: the model is the run's exported ONNX decode graph run by ONNX Runtime (CPU), with
    the interface ``models.generate`` uses."""
    from lmforge.checkpoint import load_model_weights, resolve_source
    from lmforge.compress.restore import after_weights, before_weights, recorded_steps
    from lmforge.models import build_model

    run = Path(run_dir)
    if not (run / "config.yaml").exists():
        raise ConfigError(f"{run} is not a run folder (no config.yaml)")
    cfg = load_config(run / "config.yaml")
    ckpt = resolve_source(run, checkpoint)
    model = build_model(cfg.model, device="meta")
    model.to_empty(device=device)
    model.init_weights(0)  # buffers (e.g. RoPE tables); parameters are overwritten below
    steps = recorded_steps(run)
    before_weights(model, steps)
    load_model_weights(model, ckpt)
    after_weights(model, steps)
    model.eval()
    if runtime == "onnxruntime":
        from lmforge.compress.restore import onnx_model

        model = onnx_model(run, "decode", cfg.model)
    return model, find_tokenizer(run, cfg.data.path), cfg, ckpt


@torch.inference_mode()
def generate_from_run(run_dir: str, prompts: list[str], checkpoint: Optional[str] = None, max_new_tokens: int = 128,
                      temperature: float = 0.8, top_k: Optional[int] = None, top_p: Optional[float] = None,
                      repetition_penalty: float = 1.0, seed: Optional[int] = 0,
                      stop: Optional[list[str]] = None, runtime: str = "torch") -> list[str]:
    """Generate a continuation for each prompt; returns the new text only (cut at the first stop string)."""
    from lmforge.models.generate import generate

    model, tok, cfg, _ = load_run(run_dir, checkpoint, runtime=runtime)
    ids = [tok.encode(p) for p in prompts]
    if any(len(x) == 0 for x in ids):
        raise ConfigError("generate: a prompt encodes to zero tokens; give at least one character")
    room = cfg.model.max_seq_len - max(len(x) for x in ids)
    if room <= 0:
        raise ConfigError(f"generate: the prompt is {max(len(x) for x in ids)} tokens, the model's "
                          f"model.max_seq_len is {cfg.model.max_seq_len}")
    if max_new_tokens > room:
        print(f"note: max_new_tokens {max_new_tokens} → {room} (model.max_seq_len={cfg.model.max_seq_len})",
              file=sys.stderr)
        max_new_tokens = room
    out = generate(model, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                   repetition_penalty=repetition_penalty, eos_id=tok.eos_id, seed=seed)
    texts = [tok.decode(o) for o in out]
    if stop:
        cut = []
        for t in texts:
            pos = [t.find(s) for s in stop if s and t.find(s) >= 0]
            cut.append(t[: min(pos)] if pos else t)
        texts = cut
    return texts
