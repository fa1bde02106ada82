"""How a compressed run folder loads as any run: ``compression.json`` says what was done, and the one loader
(``inference.load_run``) applies it with no flag from the caller.

``compression.json``: ``{"format_version": 1, "steps": [{"method": ..., ...}, ...]}`` in the order applied. Only
``quantize`` steps change how a model is built: their ``modules`` become ``QuantizedLinear`` (int8 buffers the
checkpoint fills) before the weights load, and their kernel is prepared after (``kernel_requested`` ``auto``:
the recorded kernel on the same machine, chosen again by the probe on another). Pruning, distillation and export steps leave an ordinary model (a
smaller config, zeros in its weights) and are recorded for the report only.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

FILE = "compression.json"


def recorded_steps(run_dir: str | Path) -> list[dict]:
    f = Path(run_dir) / FILE
    if not f.is_file():
        return []
    from lmforge.errors import CheckpointError

    try:
        return list(json.loads(f.read_text())["steps"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{f}: unreadable ({e})") from None


def before_weights(model: nn.Module, steps: list[dict]) -> None:
    """Give the freshly built ``model`` the modules the checkpoint's tensors belong to."""
    from lmforge.compress.qembed import swap_in_embeddings
    from lmforge.compress.qlinear import swap_in

    for step in steps:
        if step.get("method") == "quantize":
            runtime = dict.fromkeys(step.get("smooth_runtime", []))  # layers whose smooth buffer the checkpoint fills
            swap_in(model, step["modules"], step["scheme"], fill=False, smooth=runtime)
            swap_in_embeddings(model, step.get("embeddings", []), fill=False)


def after_weights(model: nn.Module, steps: list[dict]) -> None:
    """Prepare each quantized layer's kernel: the recorded one on the machine that chose it (same CPU, flags
    and quantized engine), chosen again by the probe elsewhere when the folder asked for ``auto``."""
    from lmforge.compress.qlinear import choose_kernel, machine_key, prepare_all

    for step in steps:
        if step.get("method") == "quantize":
            want = step.get("kernel_requested", "auto")
            if want == "auto" and step.get("machine") == machine_key() and step.get("kernel"):
                want = step["kernel"]
            kernel, _ = choose_kernel(model, want)
            prepare_all(model, kernel)


RUNTIMES = ("torch", "onnxruntime")


def exported_graph(run_dir: str | Path, kind: str) -> Path:
    """The ONNX graph an ``export`` step wrote into a run folder (``kind``: decode | classifier), its
    ONNX-Runtime-quantized version when there is one."""
    from lmforge.errors import ConfigError

    for step in reversed(recorded_steps(run_dir)):
        if step.get("method") == "export" and step.get("format") == "onnx":
            files = {**step.get("files", {}), **step.get("quantized_files", {})}
            if kind in files:
                return Path(run_dir) / files[kind]
    raise ConfigError(f"--runtime onnxruntime: {run_dir} holds no exported ONNX {kind} graph",
                      hint=f"write one with `lmforge compress export {run_dir} --out OUT` and use OUT")


def onnx_model(run_dir: str | Path, kind: str, lm_cfg=None) -> nn.Module:
    """The run's exported graph run by ONNX Runtime behind the model interface its callers use
    (``models.generate`` for decoders, ``finetune.evaluation`` for classifiers)."""
    from lmforge.compress import graphs

    path = exported_graph(run_dir, kind)
    if kind == "decode":
        forward = path.with_name(path.name.replace("decode", "forward", 1))
        return graphs.ort_decoder(path, lm_cfg, forward_path=forward if forward.is_file() else None)
    return graphs.ort_classifier(path)
