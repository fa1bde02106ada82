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


def fp32_reason(folder: Optional[str | Path], runtime: str = "torch") -> Optional[str]:
    """Why a folder must run in float32 under ``--dtype auto`` (None: the hardware decides)."""
    from lmforge.compress.restore import FILE

    if runtime == "onnxruntime":
        return "the exported ONNX graph runs in float32"
    if folder is not None and (Path(folder) / FILE).is_file():
        return f"compressed folder ({FILE}): its kernels expect float32 activations"
    return None


def inference_dtype(folder: Optional[str | Path], want: str = "auto", runtime: str = "torch", **inject):
    """``--dtype`` of a job that runs ``folder`` (generate, serve) → ``PrecisionChoice``: ``auto`` is the
    trainer's hardware rule (``hardware.precision.resolve_dtype``; ``inject``: its probe / facts), float32 for a
    compressed folder or the ONNX runtime; an explicit float32/bfloat16/float16 is honoured."""
    from lmforge.hardware.precision import resolve_dtype

    keep = fp32_reason(folder, runtime)
    choice = resolve_dtype(want, "cpu", keep_fp32=keep, **inject)
    if keep and choice.precision != "fp32":  # int8 scales, pruned masks, the ONNX graph: all float32
        raise ConfigError(f"--dtype {want}: {keep} (use --dtype auto or float32)")
    return choice


@torch.inference_mode()
def generate_from_run(run_dir: str, prompts: list[str], checkpoint: Optional[str] = None, max_new_tokens: int = 128,
                      temperature: float = 0.8, top_k: Optional[int] = None, top_p: Optional[float] = None,
                      repetition_penalty: float = 1.0, seed: Optional[int] = 0,
                      stop: Optional[list[str]] = None, runtime: str = "torch", dtype: str = "float32") -> list[str]:
    """Generate a continuation for each prompt; returns the new text only (cut at the first stop string).
    ``dtype``: ``auto`` (its choice and why go to stderr) or float32/bfloat16/float16 (``inference_dtype``)."""
    from lmforge.models.generate import generate

    choice = inference_dtype(run_dir, dtype, runtime)
    model, tok, cfg, _ = load_run(run_dir, checkpoint, runtime=runtime)
    if choice.dtype != torch.float32:
        model = model.to(choice.dtype)
    if dtype == "auto":
        print(choice.dtype_log_line(), file=sys.stderr)
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
