"""``lmforge compress quantize``: int8 weight-only / int8 dynamic post-training quantization, optionally after a
quantization-aware fine-tune (``quantize.qat_steps``, ``compress/qat.py``).

Every ``nn.Linear`` of the blocks (not the head tied to the embeddings, nor the classifier head: see
``quantize.skip``) becomes a ``QuantizedLinear`` whose int8 values torchao's quantizer computed; the kernel
that runs them is chosen per machine (``qlinear.choose_kernel``) and named in the report. Embedding tables
that no head shares become int8 rows (``qembed.py``, ``quantize.embeddings``).

int8_dynamic first applies SmoothQuant scales to the FFN down projections (``smooth.py``).
"""

from __future__ import annotations

from lmforge.compress.qembed import embedding_targets, swap_in_embeddings
from lmforge.compress.smooth import smooth_ffn
from lmforge.compress.qlinear import (check_scheme, choose_kernel, kernel_names, machine_key, prepare_all, swap_in,
                                      targets)
from lmforge.errors import ConfigError


def quantize(ctx):
    from lmforge.compress.run import Result

    qc, src = ctx.cfg.quantize, ctx.src
    check_scheme(qc.scheme)
    if qc.kernel == "fbgemm" and qc.scheme != "int8_dynamic":
        raise ConfigError(f"quantize.kernel=fbgemm runs int8_dynamic only (quantize.scheme={qc.scheme}); use "
                          "torchao, dequantized or auto")
    if any(s.get("method") == "quantize" for s in src.compression):
        raise ConfigError(f"source: {src.path} is quantized already (compression.json)")
    notes = []
    model = src.copy_model()
    if qc.qat_steps:
        from lmforge.compress.qat import qat_finetune

        model, summary = qat_finetune(ctx, model)
        notes.append(f"QAT: {qc.qat_steps} steps of fake-quantized fine-tuning through the training loop (torchao "
                     "QATConfig: int8 per-row weights" + (", int8 per-token activations" if qc.scheme == "int8_dynamic"
                                                         else "") + f"), stop reason {summary.get('stop_reason')}")
    lm = model if src.kind == "lm" else model.backbone.model
    names = targets(lm, qc.skip)
    if not names:
        raise ConfigError(f"quantize.skip={qc.skip} leaves no nn.Linear to quantize in {src.path}")
    alpha = qc.alpha()
    folded, runtime = smooth_ffn(ctx, model, lm, names, alpha) if alpha else ([], {})
    swap_in(lm, names, qc.scheme, fill=True, smooth=runtime)
    tables = embedding_targets(lm) if qc.embeddings else []
    swap_in_embeddings(lm, tables, fill=True)
    kernel, probe = choose_kernel(lm, qc.kernel)
    prepare_all(lm, kernel)
    step = {"method": "quantize", "scheme": qc.scheme, "quantizer": "torchao Int8WeightOnlyConfig (symmetric int8 "
            "per output row)", "kernel_requested": qc.kernel, "kernel": kernel, "kernel_name": kernel_names()[kernel],
            "probe_us": probe, "machine": machine_key(), "qat_steps": qc.qat_steps, "modules": names,
            "embeddings": tables, "smooth_alpha": alpha, "smooth_folded": folded, "smooth_runtime": sorted(runtime),
            "calib_batches": qc.calib_batches if alpha else 0}
    if probe:
        notes.append("kernel probe (µs per call on the largest layer, @rows; :err relative rms error): "
                     + ", ".join(f"{k} {v:g}" for k, v in probe.items()) + f" → {kernel}")
    if alpha:
        from lmforge.compress.calib import calibration_note

        notes.append(f"SmoothQuant (alpha {alpha:g}) on the FFN down projections: {len(folded)} folded into the "
                     f"up projection, {len(runtime)} applied at run time; "
                     + calibration_note(src.kind, qc.calib_batches))
    notes.append(f"{len(names)} linear layers quantized ({qc.scheme}) and {len(tables)} embedding tables (int8 "
                 f"rows); kept in float: norms, tables tied to a head, and modules matching {qc.skip}")
    return Result(model, step, notes)
