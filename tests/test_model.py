"""Llama model: shapes, masking, init determinism, parameter/FLOP accounting."""

import math

import pytest
import torch

from lmforge.config import ConfigError, ModelConfig, build_config
from lmforge.models import build_model

torch.set_num_threads(1)


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=64)
    base.update(kw)
    return ModelConfig(**base)


def test_shapes_and_dtype():
    m = build_model(tiny(), seed=0)
    x = torch.randint(0, 97, (3, 17))
    logits = m(x)
    assert logits.shape == (3, 17, 97) and logits.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert m(x).dtype == torch.float32


def test_module_names_match_contract():
    m = build_model(tiny(tie_embeddings=False), seed=0)
    names = set(dict(m.named_parameters()))
    for n in ["tok_embeddings.weight", "layers.0.attention.wq.weight", "layers.0.attention.wk.weight",
              "layers.0.attention.wv.weight", "layers.0.attention.wo.weight", "layers.0.attention_norm.weight",
              "layers.1.feed_forward.w1.weight", "layers.1.feed_forward.w2.weight",
              "layers.1.feed_forward.w3.weight", "layers.1.ffn_norm.weight", "norm.weight", "output.weight"]:
        assert n in names, n
    assert not any(isinstance(mod, torch.nn.Linear) and mod.bias is not None for mod in m.modules())


def test_causal_future_tokens_do_not_change_past_logits():
    m = build_model(tiny(), seed=1).eval()
    x = torch.randint(0, 97, (2, 20))
    y = x.clone()
    y[:, 12:] = (y[:, 12:] + 5) % 97
    a, b = m(x), m(y)
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=1e-5)
    assert (a[:, 12:] - b[:, 12:]).abs().max() > 1e-3


def test_doc_mask_isolates_documents():
    m = build_model(tiny(), seed=2).eval()
    x = torch.randint(0, 97, (2, 16))
    doc = torch.tensor([[0] * 6 + [1] * 10, [0] * 16])
    # doc 1 of row 0 must equal running that document alone; but positions continue (RoPE is relative)
    full = m(x, doc)
    alone = m(x[:1, 6:])
    torch.testing.assert_close(full[0, 6:], alone[0], rtol=1e-4, atol=1e-4)
    # changing doc 0 leaves doc 1 untouched; without the mask it would not
    x2 = x.clone()
    x2[0, :6] = (x2[0, :6] + 1) % 97
    torch.testing.assert_close(m(x2, doc)[0, 6:], full[0, 6:], rtol=0, atol=1e-5)
    assert (m(x2)[0, 6:] - m(x)[0, 6:]).abs().max() > 1e-3
    # a single-document row equals plain causal attention
    torch.testing.assert_close(full[1], m(x)[1], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="doc_ids_BT shape"):
        m(x, doc[:, :5])


@pytest.mark.parametrize("tie", [True, False])
def test_meta_build_then_init_equals_cpu_build(tie):
    cfg = tiny(tie_embeddings=tie)
    ref = build_model(cfg, seed=123)
    meta = build_model(cfg, device="meta")
    assert all(p.device.type == "meta" for p in meta.parameters())
    meta.to_empty(device="cpu")
    meta.init_weights(seed=123)
    sd_ref, sd_meta = ref.state_dict(), meta.state_dict()
    assert sd_ref.keys() == sd_meta.keys()
    for k in sd_ref:
        assert torch.equal(sd_ref[k], sd_meta[k]), k
    assert (meta.output.weight is meta.tok_embeddings.weight) == tie
    x = torch.randint(0, 97, (1, 9))
    torch.testing.assert_close(ref(x), meta(x), rtol=0, atol=0)
    other = build_model(cfg, seed=124)
    assert not torch.equal(other.layers[0].attention.wq.weight, ref.layers[0].attention.wq.weight)


def test_init_statistics():
    cfg = tiny(d_model=64, n_layers=4, ffn_hidden=256, init_std=0.02)
    m = build_model(cfg, seed=0)
    assert abs(m.layers[0].attention.wq.weight.std().item() - 0.02) < 0.002
    assert abs(m.layers[0].feed_forward.w2.weight.std().item() - 0.02 / math.sqrt(8)) < 0.001
    assert torch.all(m.norm.weight == 1)


def test_num_params_matches_numel_and_formula():
    cfg = tiny(tie_embeddings=False)
    m = build_model(cfg, seed=0)
    assert m.num_params() == sum(p.numel() for p in m.parameters())
    d, f, V, L, kv = 32, 64, 97, 2, 2 * 8
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * f + 2 * d
    assert m.num_params() == L * per_layer + d + 2 * V * d
    assert m.num_params(exclude_embeddings=True) == m.num_params() - V * d
    tied = build_model(tiny(tie_embeddings=True), seed=0)
    assert tied.num_params() == m.num_params() - V * d


@pytest.mark.parametrize("name", ["tiny", "bench-6l", "llama-125m"])
def test_preset_param_counts(name):
    cfg = build_config({"model": {"preset": name, "vocab_size": 32000}}).model
    m = build_model(cfg, device="meta")
    d, L, H, f = cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.ffn_hidden
    kv_dim = (cfg.n_kv_heads or H) * (d // H)
    expected = L * (2 * d * d + 2 * d * kv_dim + 3 * d * f + 2 * d) + d + 32000 * d
    assert m.num_params() == expected
    if name == "llama-125m":  # the well-known ~125M-class size (tied, 32k vocab)
        assert 100e6 < m.num_params() < 140e6


def test_flops_per_token():
    cfg = tiny(n_kv_heads=4)
    m = build_model(cfg, device="meta")
    T = 64
    # tied: the embedding matrix is the head matmul; norm weights are not matmul weights
    n_linear = m.num_params() - 2 * 2 * 32 - 32
    expected = 6 * n_linear + 12 * 2 * 4 * 8 * T
    assert m.flops_per_token(T) == pytest.approx(expected)
    assert m.flops_per_token(2 * T) - m.flops_per_token(T) == pytest.approx(12 * 2 * 4 * 8 * T)


def test_backward_and_sequence_too_long():
    m = build_model(tiny(max_seq_len=16), seed=0)
    x = torch.randint(0, 97, (2, 16))
    y = torch.randint(0, 97, (2, 16))
    loss = torch.nn.functional.cross_entropy(m(x).flatten(0, 1), y.flatten())
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    assert abs(loss.item() - math.log(97)) < 0.5
    with pytest.raises(ValueError, match="max_seq_len"):
        m(torch.zeros(1, 17, dtype=torch.long))


def test_build_model_requires_vocab():
    with pytest.raises(ConfigError, match="model.vocab_size"):
        build_model(ModelConfig())
