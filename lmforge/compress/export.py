"""``lmforge compress export``: ``torch.export`` (``.pt2``) or ONNX graphs of a decoder (KV-cache-free forward and
the cached decode step) or a classifier, parity-checked against eager fp32 by the command itself.

The output is the source as an ordinary run folder (so every loader still works on it) plus ``export/``:
``forward.{onnx,pt2}`` and ``decode.{onnx,pt2}`` (decoders) or ``classifier.{onnx,pt2}``. Shapes are dynamic
(batch, tokens, cached positions: ``torch.export.Dim.AUTO``). Parity: max |logit difference| on a sample
(decoders: a 2-row prefill and one cached decode step) must be ≤ ``export.parity_atol``, else nothing is
published. ``export.quantize`` runs ONNX Runtime's quantizer on the exported graphs (int8_dynamic:
``quantize_dynamic`` → MatMulInteger; int4_weight: ``MatMulNBitsQuantizer`` → MatMulNBits); a quantized graph's
difference is reported, not enforced. The speed and quality numbers of the result are those of the exported
graph run by ONNX Runtime (or the loaded ``.pt2`` program).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch

from lmforge.compress import graphs
from lmforge.errors import CheckpointError, ConfigError, SetupError


def _quiet():
    """The exporters print progress lines and warnings at every call."""
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"torch\.onnx.*|onnxscript.*|torch\.export.*")


DYNAMIC = {"tokens_BT": (0, 1), "past_k_LBKSD": (1, 3), "past_v_LBKSD": (1, 3), "input_ids_BT": (0, 1),
           "attention_mask_BT": (0, 1)}  # batch, tokens, cached positions; the model's own sizes stay static


def _write(graph: torch.nn.Module, args: tuple, names: tuple[list, list], path: Path, fmt: str, opset: int) -> None:
    """The ``DYNAMIC`` dimensions as ``Dim.AUTO`` (torch.export bounds tokens and cached positions by the
    position tables and checks them in the ``.pt2`` program)."""
    dyn = {n: {d: torch.export.Dim.AUTO for d in DYNAMIC[n]} for n in names[0]}
    with torch.no_grad():
        if fmt == "pt2":
            torch.export.save(torch.export.export(graph, args, dynamic_shapes=dyn), str(path))
            return
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):
            torch.onnx.export(graph, args, str(path), dynamo=True, input_names=names[0], output_names=names[1],
                              dynamic_shapes=dyn, opset_version=opset, external_data=False)


def _max_diff(a, b) -> float:
    return float((torch.as_tensor(a).float() - torch.as_tensor(b).float()).abs().max())


def export_lm(lm, folder: Path, ec, sample_BT: torch.Tensor) -> dict:
    """forward + decode graphs of ``lm``; returns their parity numbers (and paths)."""
    fmt, files, parity = ec.format, {}, {}
    x = sample_BT[:2, :16]
    _write(graphs.LogitsGraph(lm).eval(), (x,), (["tokens_BT"], ["logits_BTV"]), folder / f"forward.{fmt}", fmt,
           ec.opset)
    files["forward"] = folder / f"forward.{fmt}"
    with torch.no_grad():
        ref = lm(x)
    got = _run_forward(files["forward"], fmt, x)
    parity["forward"] = _max_diff(ref, got)
    if ec.cached_decode:
        dec = graphs.DecodeGraph(lm).eval()
        names = (["tokens_BT", "past_k_LBKSD", "past_v_LBKSD"], ["logits_BTV", "k_LBKSD", "v_LBKSD"])
        _write(dec, (x[:, :7], *graphs.empty_past(lm, 2, 5)), names, folder / f"decode.{fmt}", fmt, ec.opset)
        files["decode"] = folder / f"decode.{fmt}"
        parity["decode"] = _decode_parity(lm, dec, files["decode"], fmt, x)
    return {"files": files, "parity": parity}


def _run_forward(path: Path, fmt: str, x: torch.Tensor):
    if fmt == "pt2":
        return graphs.load_pt2(path)(x)
    return graphs.session(path).run(None, {"tokens_BT": x.numpy()})[0]


def _decode_parity(lm, dec, path: Path, fmt: str, x: torch.Tensor) -> float:
    """Prefill 8 tokens from an empty cache, then one cached step: the graph against eager on both."""
    runner = graphs.pt2_decoder(path, lm.cfg) if fmt == "pt2" else graphs.ort_decoder(path, lm.cfg)
    with torch.no_grad():
        ref_p, k, v = dec(x[:, :8], *graphs.empty_past(lm, x.shape[0], 0))
        ref_d, _, _ = dec(x[:, 8:9], k, v)
    cache = runner.new_cache(x.shape[0])
    got_p = runner(x[:, :8], cache=cache)
    got_d = runner(x[:, 8:9], cache=cache)
    return max(_max_diff(ref_p, got_p), _max_diff(ref_d, got_d))


def export_classifier(model, folder: Path, ec, batch: dict) -> dict:
    fmt = ec.format
    ids, mask = batch["input_ids"][:2], batch["attention_mask"][:2].to(torch.int64)
    path = folder / f"classifier.{fmt}"
    _write(graphs.ClassifierGraph(model).eval(), (ids, mask), (["input_ids_BT", "attention_mask_BT"], ["logits_BK"]),
           path, fmt, ec.opset)
    runner = graphs.pt2_classifier(path) if fmt == "pt2" else graphs.ort_classifier(path)
    with torch.no_grad():
        ref = model(ids, mask)
    return {"files": {"classifier": path}, "parity": {"classifier": _max_diff(ref, runner(ids, mask))}}


def ort_quantize(path: Path, scheme: str, out_dir: Path) -> Path:
    """ONNX Runtime's quantizer on an exported graph (module doc) → ``out_dir/<name>.<scheme>.onnx``."""
    out = out_dir / f"{path.stem}.{scheme}.onnx"
    if scheme == "int8_dynamic":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(path), str(out), weight_type=QuantType.QInt8)
        return out
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    q = MatMulNBitsQuantizer(onnx.load(str(path)), block_size=32, is_symmetric=True)
    q.process()
    q.model.save_model_to_file(str(out), use_external_data_format=False)
    return out


def export(ctx):
    from lmforge.compress.output import sample_inputs
    from lmforge.compress.run import Result

    ec, src = ctx.cfg.export, ctx.src
    _check_input(ec, src)
    model = src.copy_model().eval()
    folder = ctx.stage.tmp / "export"
    folder.mkdir()
    sample = sample_inputs(src, ctx.batches)
    got = _export_graphs(model, folder, ctx, sample)
    files = got["files"]
    step = {"method": "export", "format": ec.format, "files": {k: f"export/{p.name}" for k, p in files.items()},
            "parity_max_abs": got["parity"], "opset": ec.opset if ec.format == "onnx" else None}
    notes = [f"parity vs eager fp32 (max |logit difference|): {got['parity']} ≤ {ec.parity_atol:g}"]
    if ec.quantize != "none":
        files = _quantized_graphs(ctx, model, folder, files, sample, step, notes)
    main = files.get("decode") or files.get("classifier") or files["forward"]
    runner = _runner(main, src, ec, ctx.cfg.bench.threads, files.get("forward"))
    if ec.quantize != "none":
        step["quantized_max_abs"] = _max_diff(_eager(model, src, sample), _eager(runner, src, sample))
    engine = f"ONNX Runtime {_ort_version()} CPUExecutionProvider" if ec.format == "onnx" else "torch.export program"
    step["runner"] = f"{engine}: {main.name}"
    notes.append(f"speed and quality of the result: {step['runner']}")
    return Result(model, step, notes, runner=runner, files_folder=main, quality_runner=True)


def _export_graphs(model, folder: Path, ctx, sample) -> dict:
    """The graphs of ``model`` in ``folder``, parity-checked (nothing is published past a failed check)."""
    ec, src = ctx.cfg.export, ctx.src
    if src.kind == "lm":
        got = export_lm(model, folder, ec, sample["input_ids"] if ctx.batches else _tokens(src))
    else:
        got = export_classifier(model, folder, ec, sample)
    bad = {k: v for k, v in got["parity"].items() if v > ec.parity_atol}
    if bad:
        raise CheckpointError(f"export parity: max |logit difference| {bad} exceeds export.parity_atol="
                              f"{ec.parity_atol:g}; nothing was published")
    return got


def _quantized_graphs(ctx, model, folder: Path, files: dict, sample, step: dict, notes: list) -> dict:
    """ONNX Runtime's quantizer on the graphs; for int8_dynamic on those of the SmoothQuant-scaled model
    (``quantize.smooth_alpha``, default 0.5 here: ``compress/quantize.py``), exported and checked the same way."""
    import shutil

    ec, qc = ctx.cfg.export, ctx.cfg.quantize
    alpha = qc.alpha(export_scheme=ec.quantize)
    if alpha:
        from lmforge.compress.calib import calibration_note
        from lmforge.compress.smooth import smoothed_copy

        (folder / "smoothed").mkdir()
        files = _export_graphs(smoothed_copy(ctx, model, alpha), folder / "smoothed", ctx, sample)["files"]
        notes.append(f"SmoothQuant (alpha {alpha:g}) on the FFN down projections of the graphs that were quantized; "
                     + calibration_note(ctx.src.kind, qc.calib_batches))
    out = {k: ort_quantize(p, ec.quantize, folder) for k, p in files.items()}
    shutil.rmtree(folder / "smoothed", ignore_errors=True)
    step.update(quantize=ec.quantize, quantized_files={k: f"export/{p.name}" for k, p in out.items()},
                smooth_alpha=alpha)
    kernel = "MatMulInteger" if ec.quantize == "int8_dynamic" else "MatMulNBits, 4-bit, block 32"
    notes.append(f"ONNX Runtime quantizer: {ec.quantize} ({kernel})")
    return out


def _check_input(ec, src) -> None:
    if ec.quantize != "none" and ec.format != "onnx":
        raise ConfigError(f"export.quantize={ec.quantize} runs ONNX Runtime's quantizer: it needs export.format=onnx")
    _check_packages(ec.format)
    _quiet()
    if any(s.get("method") == "quantize" for s in src.compression):
        raise ConfigError(f"source: {src.path} holds torch int8 layers (compression.json); export its float source "
                          "and quantize the graph with export.quantize")


def _tokens(src) -> torch.Tensor:
    return torch.randint(0, src.cfg.model.vocab_size, (3, 16), generator=torch.Generator().manual_seed(0))


def _eager(model, src, sample):
    with torch.no_grad():
        if src.kind == "lm":
            return model(sample["input_ids"][:2, :16])
        return model(sample["input_ids"][:2], sample["attention_mask"][:2])


def _runner(path: Path, src, ec, threads, forward_path=None):
    """What runs the result: the decode graph (decoders; the forward graph scores the perplexity)."""
    if src.kind == "lm":
        if path.stem.startswith("forward"):
            raise ConfigError("export.cached_decode=false: the result is timed through the decode graph; keep it "
                              "on (or time the forward graph yourself)")
        return graphs.pt2_decoder(path, src.cfg.model, forward_path) if ec.format == "pt2" else \
            graphs.ort_decoder(path, src.cfg.model, threads, forward_path)
    return graphs.pt2_classifier(path) if ec.format == "pt2" else graphs.ort_classifier(path, threads)


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def _check_packages(fmt: str) -> None:
    if fmt != "onnx":
        return
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise SetupError(f"export.format=onnx needs onnx, onnxscript and onnxruntime ({e})",
                         hint="pip install 'lmforge[compress]'") from None
