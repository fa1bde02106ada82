"""lmforge compress on a tiny decoder run: every method's output loads through the normal loaders with its
quality computed; structured pruning shrinks shapes; the distillation loss equals a hand computation; export
parity; bad inputs; a failed compression leaves no output folder. (Serving compressed folders:
``test_compress_serve.py``.)"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmforge.cli import main
from lmforge.compress.config import load_compress_config
from lmforge.compress.run import compress
from lmforge.errors import ConfigError
from lmforge.inference import load_run
from tests.helpers.runs import pack_tiny, tiny_cfg

torch.set_num_threads(1)
FAST = ["--eval.batches=2", "--eval.batch_size=4", "--bench.repeats=1", "--bench.new_tokens=4", "--bench.seq_len=16",
        "--bench.batch=2", "--train.batch_size=2", "--train.precision=fp32", "--prune.calib_batches=2",
        "--quantize.calib_batches=2"]


@pytest.fixture(autouse=True)
def _fixed_peak(monkeypatch):
    monkeypatch.setenv("LMFORGE_PEAK_FLOPS", "1e11")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny Llama (2 layers) trained 12 steps on a packed corpus with a validation split."""
    from lmforge.training.trainer import train

    root = tmp_path_factory.mktemp("lm")
    data = pack_tiny(root / "data")
    cfg = tiny_cfg(root / "run", data, training={"max_steps": 12, "eval_every": 0})
    train(cfg)
    return root / "run"


def _compress(method: str, run: Path, out: Path, *over: str) -> dict:
    cfg = load_compress_config(None, [f"--source={run}", f"--out={out}", *FAST, *over])
    return compress(method, cfg)


@pytest.mark.parametrize("scheme", ["int8_dynamic", "int8_weight"])
def test_quantize_loads_as_a_run(run, tmp_path, scheme):
    from lmforge.compress.qlinear import QuantizedLinear

    rep = _compress("quantize", run, tmp_path / "q", f"--quantize.scheme={scheme}")
    src, out = rep["columns"]["source"], rep["columns"]["quantize"]
    assert out["val_ppl"] > 1 and abs(out["val_ppl"] / src["val_ppl"] - 1) < 0.02
    assert out["file_bytes"] < src["file_bytes"] and out["decode_tokens_per_s"] > 0
    assert rep["step"]["kernel"] in ("fbgemm", "torchao", "dequantized") and rep["step"]["kernel_name"]
    model, *_ = load_run(tmp_path / "q")  # no flag: compression.json is applied by the loader
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == 2 * 7 and all(m.qweight.dtype == torch.int8 for m in layers)
    dynamic = scheme == "int8_dynamic"  # SmoothQuant by default, folded into w3 (SwiGLU): no run-time scales
    assert rep["step"]["smooth_alpha"] == (0.5 if dynamic else 0.0) and rep["step"]["smooth_runtime"] == []
    assert rep["step"]["smooth_folded"] == (["layers.0.feed_forward.w2", "layers.1.feed_forward.w2"] if dynamic else [])
    assert all(m.smooth is None for m in layers)
    assert rep["step"]["embeddings"] == []  # the token table is tied to the float head: it stays float
    assert type(model.output) is torch.nn.Linear  # the tied head stays float
    for name in ("report.json", "report.md", "report.html"):
        assert (tmp_path / "q" / name).is_file()
    assert main(["generate", "--run", str(tmp_path / "q"), "--prompt", "the king", "--max-new-tokens", "3"]) == 0
    assert main(["hf", "export", str(tmp_path / "q"), str(tmp_path / "hf")]) == 0  # written dequantized


def test_quantize_gpt2_scales_at_run_time_and_keeps_int8_positions(tmp_path):
    """GPT-2's GELU FFN cannot take the SmoothQuant fold: its down projections keep run-time scales; its
    untied position table becomes int8 rows; the folder generates and exports to HF like any run."""
    from lmforge.compress.qembed import QuantizedEmbedding
    from lmforge.training.trainer import train

    data = pack_tiny(tmp_path / "data")
    train(tiny_cfg(tmp_path / "run", data, model={"arch": "gpt2"}, training={"max_steps": 4, "eval_every": 0}))
    rep = _compress("quantize", tmp_path / "run", tmp_path / "q")
    step = rep["step"]
    assert step["embeddings"] == ["pos_embeddings"] and step["smooth_folded"] == []
    assert step["smooth_runtime"] == ["layers.0.feed_forward.proj", "layers.1.feed_forward.proj"]
    assert abs(rep["columns"]["quantize"]["val_ppl"] / rep["columns"]["source"]["val_ppl"] - 1) < 0.02
    model, *_ = load_run(tmp_path / "q")
    assert isinstance(model.pos_embeddings, QuantizedEmbedding) and model.layers[0].feed_forward.proj.smooth is not None
    assert main(["generate", "--run", str(tmp_path / "q"), "--prompt", "the king", "--max-new-tokens", "3"]) == 0
    assert main(["hf", "export", str(tmp_path / "q"), str(tmp_path / "hf")]) == 0  # dequantized, positions too


def test_hf_folder_source(run, tmp_path):
    """An HF folder compresses like a run (its perplexity on --eval.data) and the output is an lmforge run."""
    assert main(["hf", "export", str(run), str(tmp_path / "hf")]) == 0
    data = load_run(run)[2].data.path
    rep = _compress("quantize", tmp_path / "hf", tmp_path / "q", f"--eval.data={data}", "--bench.enabled=false")
    assert rep["columns"]["quantize"]["val_ppl"] == pytest.approx(rep["columns"]["source"]["val_ppl"], rel=0.02)
    assert (tmp_path / "q" / "config.yaml").is_file() and load_run(tmp_path / "q")[0] is not None


def test_quantize_kernels_compute_the_stored_weights():
    """Every kernel computes x·(qweight·scale)ᵀ + b (fbgemm quantizes activations too: a looser bound), or,
    where one does not on this CPU (torchao's int8 matmul on an AVX2-only CPU), the accuracy check names it:
    auto never picks it and asking for it is an error naming quantize.kernel."""
    from lmforge.compress.qlinear import MAX_KERNEL_ERROR, QuantizedLinear, choose_kernel, kernel_error, swap_in

    torch.manual_seed(0)
    owner = torch.nn.Sequential(torch.nn.Linear(64, 48))
    swap_in(owner, ["0"], "int8_dynamic", fill=True)
    ql: QuantizedLinear = owner[0]
    x = torch.randn(5, 64)
    ref = F.linear(x, ql.weight, ql.bias)
    assert kernel_error(ql, "dequantized") < 1e-6
    picked, numbers = choose_kernel(owner, "auto")
    assert numbers[f"{picked}:err"] <= MAX_KERNEL_ERROR
    for kernel, tol in (("dequantized", 1e-5), ("torchao", 0.05), ("fbgemm", 0.05)):
        err = kernel_error(ql, kernel)
        if err is not None and err > MAX_KERNEL_ERROR:
            assert picked != kernel
            with pytest.raises(ConfigError, match=f"quantize.kernel={kernel}"):
                choose_kernel(owner, kernel)
            continue
        ql.prepare(kernel)
        assert (ql(x) - ref).abs().max() < tol, kernel
        assert choose_kernel(owner, kernel)[0] == kernel


def test_smoothquant_scales_tame_outlier_input_channels():
    """A few input channels 50× larger than the rest (the SwiGLU output of a trained decoder looks like this):
    with one activation range per call (fbgemm) int8 keeps little of the other channels; SmoothQuant's scales
    move the outliers into the weights, the layer still computes x·Wᵀ, and its buffers reload exactly."""
    from lmforge.compress.qlinear import QuantizedLinear, swap_in
    from lmforge.compress.smooth import inverse_scale

    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    x = torch.randn(256, 64, generator=g)
    x[:, :4] *= 50.0
    ref = lin(x).detach()
    err = {}
    for smooth in (None, {"0": inverse_scale(lin.weight, x.abs().amax(0), 0.5)}):
        owner = torch.nn.Sequential(copy.deepcopy(lin))
        if smooth:
            owner[0].weight.data.div_(smooth["0"][None, :])  # the weight carries s (smooth.smooth_ffn does this)
        swap_in(owner, ["0"], "int8_dynamic", fill=True, smooth=smooth)
        ql: QuantizedLinear = owner[0]
        torch.testing.assert_close(ql.weight, lin.weight.detach(), atol=0.02, rtol=0.0)  # W, scales folded back
        ql.prepare("fbgemm")
        err[smooth is not None] = float((ql(x) - ref).norm() / ref.norm())
    assert err[True] < 0.5 * err[False], err
    again = torch.nn.Sequential(torch.nn.Linear(64, 48))
    swap_in(again, ["0"], "int8_dynamic", fill=False, smooth={"0": None})  # how a checkpoint's layers are rebuilt
    again.load_state_dict(owner.state_dict())
    again[0].prepare("fbgemm")
    torch.testing.assert_close(again[0](x), owner[0](x), atol=0.0, rtol=0.0)


def test_smoothing_keeps_the_function_folded_or_at_run_time(monkeypatch):
    """Folding 1/s into w3's rows (SwiGLU) and the run-time form (``SmoothedLinear``) both leave the model's
    logits unchanged in float, while w2's weights now carry s."""
    from types import SimpleNamespace

    from lmforge.compress import calib
    from lmforge.compress.qlinear import targets
    from lmforge.compress.smooth import SmoothedLinear, smooth_ffn
    from lmforge.config import ModelConfig
    from lmforge.models import build_model

    lm = build_model(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=16), seed=0)
    x = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(calib, "calibration_batches", lambda _ctx, n: [{"input_ids": x}])
    ctx = SimpleNamespace(src=SimpleNamespace(kind="lm"),
                          cfg=SimpleNamespace(quantize=SimpleNamespace(calib_batches=1)))
    with torch.no_grad():
        ref, w2 = lm(x), lm.layers[0].feed_forward.w2.weight.clone()
        folded, runtime = smooth_ffn(ctx, lm, lm, targets(lm, ["output"]), 0.5)
        torch.testing.assert_close(lm(x), ref, rtol=1e-4, atol=1e-5)
        assert len(folded) == 2 and runtime == {} and not torch.equal(lm.layers[0].feed_forward.w2.weight, w2)
        ff = lm.layers[1].feed_forward
        wrapped = SmoothedLinear(ff.w2, torch.rand(ff.w2.in_features) + 0.5)
        ff.w2.weight.div_(wrapped.m[None, :])
        ff.w2 = wrapped
        torch.testing.assert_close(lm(x), ref, rtol=1e-4, atol=1e-5)


def test_int8_embedding_tables():
    """Untied tables become int8 rows (a lookup within int8 error of the float one; the state reloads exactly
    and dequantizes back); a table tied to a head is left alone; BERT's tied MLM head is dropped with it."""
    from lmforge.compress.qembed import (QuantizedEmbedding, dequantized_embeddings, embedding_targets,
                                         swap_in_embeddings)
    from lmforge.config import ModelConfig
    from lmforge.models import build_model

    tied = build_model(ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, max_seq_len=8), seed=0)
    assert embedding_targets(tied) == []
    bert = build_model(ModelConfig(arch="bert", vocab_size=64, d_model=16, n_layers=1, n_heads=2, max_seq_len=8),
                       seed=0)
    assert embedding_targets(bert) == ["pos_embeddings", "type_embeddings"]  # tok_embeddings: the MLM head's
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    ref = bert.tok_embeddings(ids).detach()
    swap_in_embeddings(bert, ["tok_embeddings", "pos_embeddings"], fill=True)
    assert bert.mlm_head is None and isinstance(bert.tok_embeddings, QuantizedEmbedding)
    assert bert.tok_embeddings.qweight.dtype == torch.int8
    torch.testing.assert_close(bert.tok_embeddings(ids), ref, atol=float(ref.abs().max()) / 100, rtol=0.0)
    again = build_model(ModelConfig(arch="bert", vocab_size=64, d_model=16, n_layers=1, n_heads=2, max_seq_len=8),
                        seed=1)
    swap_in_embeddings(again, ["tok_embeddings", "pos_embeddings"], fill=False)  # as the loader rebuilds them
    again.load_state_dict(bert.state_dict())
    assert torch.equal(again.tok_embeddings(ids), bert.tok_embeddings(ids))
    dequantized_embeddings(again)
    assert type(again.tok_embeddings) is torch.nn.Embedding
    assert torch.equal(again.tok_embeddings(ids), bert.tok_embeddings(ids))


def test_an_inaccurate_kernel_is_never_chosen(monkeypatch):
    """Whatever this CPU measures: a kernel whose output is off the stored weights is left out by auto."""
    from lmforge.compress import qlinear

    owner = torch.nn.Sequential(torch.nn.Linear(64, 48))
    qlinear.swap_in(owner, ["0"], "int8_dynamic", fill=True)
    monkeypatch.setattr(qlinear, "kernel_error", lambda layer, k, rows=32: 0.2 if k == "fbgemm" else 0.01)
    picked, numbers = qlinear.choose_kernel(owner, "auto")
    assert picked == "torchao" and numbers["fbgemm:err"] == 0.2
    monkeypatch.setattr(qlinear, "kernel_error", lambda layer, k, rows=32: 0.2 if k != "dequantized" else 0.0)
    assert qlinear.choose_kernel(owner, "auto")[0] == "dequantized"  # exact, when no int8 kernel is right here


def test_qat_then_quantize(run, tmp_path):
    rep = _compress("quantize", run, tmp_path / "qat", "--quantize.qat_steps=2")
    assert rep["step"]["qat_steps"] == 2 and rep["columns"]["quantize"]["val_ppl"] > 1
    assert load_run(tmp_path / "qat")[0] is not None


@pytest.mark.parametrize("method", ["magnitude", "wanda", "2:4"])
def test_unstructured_pruning(run, tmp_path, method):
    rep = _compress("prune", run, tmp_path / "p", f"--prune.method={method}", "--prune.sparsity=0.5")
    layers = rep["step"]["layers_report"]
    assert abs(layers["(all block linears)"] - 0.5) < 0.02
    model, *_ = load_run(tmp_path / "p")
    w = model.layers[0].feed_forward.w1.weight
    assert abs(float((w == 0).float().mean()) - 0.5) < 0.02
    if method == "2:4":
        assert int((w.reshape(w.shape[0], -1, 4) != 0).sum(-1).max()) <= 2
    assert rep["columns"]["prune"]["val_ppl"] > 1
    assert "layers.0.attention.wq" in (tmp_path / "p" / "report.md").read_text()


def test_wanda_beats_magnitude_where_inputs_have_outlier_features():
    """The Wanda paper's setting: a few input features with large activations. Scoring |W|·‖x‖ keeps their
    weights, so the layer's output error at 50% sparsity is far below magnitude pruning's, and per output row
    exactly half the weights go. (At the reference table's 26M-parameter scale there are no such features.)"""
    from lmforge.compress.prune import keep_mask

    g = torch.Generator().manual_seed(0)
    W = torch.randn(64, 128, generator=g)
    x = torch.randn(512, 128, generator=g)
    x[:, :6] *= 30.0  # outlier features
    norm = x.norm(dim=0)
    err = {}
    for method in ("magnitude", "wanda"):
        keep = keep_mask(W, method, 0.5, norm)
        assert abs(float(keep.float().mean()) - 0.5) < 0.01
        err[method] = float(((x @ (W * keep).T) - x @ W.T).norm() / (x @ W.T).norm())
    assert bool((keep_mask(W, "wanda", 0.5, norm).sum(1) == 64).all())
    assert err["wanda"] < 0.7 * err["magnitude"], err


def test_structured_pruning_shrinks_and_recovers(run, tmp_path):
    rep = _compress("prune", run, tmp_path / "s", "--prune.method=structured", "--prune.ffn_fraction=0.25",
                    "--prune.recover_steps=3")
    model, _, cfg, _ = load_run(tmp_path / "s")
    assert cfg.model.ffn_hidden == 96 and model.layers[0].feed_forward.w1.weight.shape == (96, 64)
    assert model.layers[1].feed_forward.w2.weight.shape == (64, 96)
    assert rep["columns"]["prune"]["params"] < rep["columns"]["source"]["params"]
    assert "pruned, no recovery" in rep["columns"] and rep["step"]["recovery"]["steps"] == 3
    assert not (tmp_path / "s" / ".work").exists()


def test_structured_head_pruning_keeps_kv_groups(run, tmp_path):
    _compress("prune", run, tmp_path / "h", "--prune.method=structured", "--prune.ffn_fraction=0",
              "--prune.heads_fraction=0.5", "--bench.enabled=false")
    model, _, cfg, _ = load_run(tmp_path / "h")  # tiny: 4 query heads over 2 key/value heads of 16 dims
    assert (cfg.model.n_heads, cfg.model.n_kv_heads, cfg.model.head_dim) == (2, 1, 16)
    att = model.layers[0].attention
    assert att.wq.weight.shape == (32, 64) and att.wk.weight.shape == (16, 64) and att.wo.weight.shape == (64, 32)
    assert torch.isfinite(model(torch.tensor([[5, 9, 12]]))).all()


def test_distill_student_and_baseline(run, tmp_path):
    rep = _compress("distill", run, tmp_path / "d", "--distill.n_layers=1", "--train.steps=3", "--distill.baseline=true",
                    "--distill.hidden_weight=0.5")
    model, _, cfg, _ = load_run(tmp_path / "d")
    assert cfg.model.n_layers == 1 and len(model.layers) == 1 and rep["step"]["student_layers"] == [1]
    assert {"source", "student, no KD", "distill"} <= set(rep["columns"])
    assert all(rep["columns"][c]["val_ppl"] > 1 for c in rep["columns"])


def test_distill_loss_equals_hand_computation(tmp_path):
    from lmforge.compress.kd import DistillObjective

    torch.manual_seed(0)
    V, T_, alpha, temp = 7, 5, 0.3, 2.0
    teacher, student = torch.nn.Embedding(V, V), torch.nn.Embedding(V, V)

    class LM(torch.nn.Module):
        def __init__(self, emb):
            super().__init__()
            self.emb, self.layers = emb, torch.nn.ModuleList()

        def forward(self, tokens):
            return self.emb(tokens)

    ids = torch.randint(0, V, (2, T_))
    labels = torch.randint(0, V, (2, T_))
    labels[0, :2] = -100
    obj = DistillObjective(LM(teacher), "lm", alpha, temp, [])
    got = obj.loss_sum(LM(student), {"input_ids": ids, "labels": labels}, torch.device("cpu"))
    zs, zt = student(ids), teacher(ids)
    keep = labels != -100
    hand = 0.0
    for b in range(2):
        for t in range(T_):
            if not keep[b, t]:
                continue
            p_t = torch.softmax(zt[b, t] / temp, -1)
            kl = (p_t * (p_t.log() - torch.log_softmax(zs[b, t] / temp, -1))).sum()
            ce = -torch.log_softmax(zs[b, t], -1)[labels[b, t]]
            hand = hand + alpha * temp ** 2 * kl + (1 - alpha) * ce
    assert torch.allclose(got, hand, atol=1e-5)
    assert obj.weight({"labels": labels}) == float(keep.sum())
    got.backward()
    assert student.weight.grad is not None and teacher.weight.grad is None
    cached = DistillObjective(LM(teacher), "lm", alpha, temp, [], cache_dir=tmp_path / "cache")
    batch = {"input_ids": ids, "labels": labels}
    first = cached.loss_sum(LM(student), batch, torch.device("cpu"))
    again = cached.loss_sum(LM(student), batch, torch.device("cpu"))  # the same batch: teacher logits from disk
    assert (cached.hits, cached.misses) == (1, 1) and torch.allclose(first, got) and torch.allclose(again, got)
    swapped = {"input_ids": ids.flip(0), "labels": labels.flip(0)}  # the same rows reshuffled: still cached
    assert torch.allclose(cached.loss_sum(LM(student), swapped, torch.device("cpu")), got, atol=1e-5)
    assert cached.hits == 2


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_export_parity_and_decode(run, tmp_path, fmt):
    from lmforge.compress import graphs
    from lmforge.models.generate import generate

    rep = _compress("export", run, tmp_path / "e", f"--export.format={fmt}")
    assert max(rep["step"]["parity_max_abs"].values()) <= 1e-4
    model, *_ = load_run(tmp_path / "e")  # the folder still loads as a run
    path = tmp_path / "e" / "export" / f"decode.{fmt}"
    runner = graphs.ort_decoder(path, model.cfg) if fmt == "onnx" else graphs.pt2_decoder(path, model.cfg)
    prompt = [[5, 9, 12, 40]]
    assert generate(runner, prompt, 6, temperature=0.0) == generate(model, prompt, 6, temperature=0.0)
    assert rep["columns"]["export"]["val_ppl"] == pytest.approx(rep["columns"]["source"]["val_ppl"], rel=1e-4)
    if fmt == "onnx":  # generate's ONNX Runtime option runs the exported graph
        from lmforge.inference import generate_from_run

        kw = dict(max_new_tokens=5, temperature=0.0)
        assert generate_from_run(str(tmp_path / "e"), ["the king"], runtime="onnxruntime", **kw) == \
            generate_from_run(str(tmp_path / "e"), ["the king"], **kw)
        text = tmp_path / "held_out.txt"  # evaluate's ONNX Runtime option: the same perplexity as eager torch
        text.write_text("the king said to the queen that the night was long and the day was short\n" * 4)
        args = ["evaluate", str(tmp_path / "e"), "--text", str(text), "--window", "32"]
        assert main(args + ["--name", "eager"]) == 0 and main(args + ["--runtime", "onnxruntime", "--name", "ort"]) == 0
        reports = [json.loads((tmp_path / "e" / "reports" / f"{n}.json").read_text()) for n in ("eager", "ort")]
        assert reports[1]["runtime"] == "onnxruntime"
        assert reports[1]["text"]["perplexity"] == pytest.approx(reports[0]["text"]["perplexity"], rel=1e-4)


def test_export_onnx_int8(run, tmp_path):
    rep = _compress("export", run, tmp_path / "e8", "--export.quantize=int8_dynamic")
    assert (tmp_path / "e8" / "export" / "decode.int8_dynamic.onnx").is_file()
    assert rep["step"]["smooth_alpha"] == 0.5 and not (tmp_path / "e8" / "export" / "smoothed").exists()
    assert rep["columns"]["export"]["val_ppl"] == pytest.approx(rep["columns"]["source"]["val_ppl"], rel=0.05)


@pytest.mark.parametrize("args, key", [
    (["prune", "--prune.sparsity=1.5"], "prune.sparsity"),
    (["prune", "--prune.sparsity=0"], "prune.sparsity"),
    (["quantize", "--quantize.scheme=int4_weight"], "quantize.scheme"),
    (["distill", "--distill.n_layers=3"], "distill.n_layers"),
    (["distill", "--distill.layers=[1, 0]"], "distill.layers"),
    (["export", "--export.format=pt2", "--export.quantize=int8_dynamic"], "export.quantize"),
    (["quantize", "--quantize.schem=int8_dynamic"], "quantize.scheme"),
    (["quantize", "--quantize.smooth_alpha=1.5"], "quantize.smooth_alpha"),
    (["quantize", "--quantize.scheme=int8_weight", "--quantize.smooth_alpha=0.5"], "quantize.smooth_alpha"),
])
def test_bad_input_names_the_key(run, tmp_path, capsys, args, key):
    assert main(["compress", args[0], str(run), "--out", str(tmp_path / "o"), *args[1:], *FAST]) == 2
    assert key in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob("o.tmp-*"))


def test_bad_source_and_existing_out(run, tmp_path, capsys):
    assert main(["compress", "quantize", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "o").mkdir()
    assert main(["compress", "quantize", str(run), "--out", str(tmp_path / "o"), *FAST]) == 2
    assert "exists already" in capsys.readouterr().err


def test_interrupted_fine_tune_publishes_nothing(run, tmp_path, monkeypatch):
    """A signal during the recovery fine-tune stops the loop gracefully; compress then refuses to publish."""
    from lmforge.training import loop

    real = loop.stop_reason
    monkeypatch.setattr(loop, "stop_reason", lambda st, lim, out, early, sig, *ext: real(st, lim, out, early, "SIGTERM", *ext))
    with pytest.raises(Exception, match="stopped early"):
        _compress("prune", run, tmp_path / "o", "--prune.method=structured", "--prune.recover_steps=3")
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob("o.tmp-*"))


def test_failed_compression_leaves_no_output(run, tmp_path, monkeypatch):
    """A failure after the weights were written (here: the reload check) publishes nothing; a stale staging
    folder of a dead process (a kill) never loads as the output and is swept by the next run."""
    from lmforge.compress import output

    def broken(*a, **k):
        raise RuntimeError("simulated crash before publishing")

    monkeypatch.setattr(output, "check_same", broken)
    with pytest.raises(RuntimeError, match="simulated"):
        _compress("quantize", run, tmp_path / "o")
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob("o.tmp-*"))
    monkeypatch.undo()
    stale = tmp_path / "o.tmp-999999999"
    (stale / "checkpoints").mkdir(parents=True)
    with pytest.raises(ConfigError):
        load_run(tmp_path / "o")
    _compress("quantize", run, tmp_path / "o")
    assert not stale.exists() and json.loads((tmp_path / "o" / "compression.json").read_text())["steps"]
