"""GPT-2 and BERT architectures and the classification heads."""

import pytest
import torch

from lmforge.config import ConfigError, ModelConfig, build_config
from lmforge.models import build_model
from lmforge.models.generate import generate
from lmforge.models.heads import SequenceClassifier, TokenClassifier, pool

torch.set_num_threads(1)


def cfg(arch, **kw):
    base = dict(arch=arch, vocab_size=71, d_model=32, n_layers=2, n_heads=4, ffn_hidden=64, max_seq_len=48)
    base.update(kw)
    return ModelConfig(**base)


def test_config_arch_choices():
    assert build_config({"model": {"arch": "bert", "d_model": 36, "n_heads": 4}}).model.arch == "bert"
    with pytest.raises(ConfigError, match="model.arch"):
        build_config({"model": {"arch": "t5"}})
    with pytest.raises(ConfigError, match="must be even for RoPE"):  # llama only
        build_config({"model": {"arch": "llama", "d_model": 36, "n_heads": 4}})


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_meta_init_equals_cpu_init(arch):
    ref = build_model(cfg(arch), seed=5)
    meta = build_model(cfg(arch), device="meta")
    meta.to_empty(device="cpu")
    meta.init_weights(5)
    a, b = ref.state_dict(), meta.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert ref.num_params() == sum(p.numel() for p in ref.parameters())
    assert ref.flops_per_token(32) > 6 * ref.num_params(exclude_embeddings=True)


def test_gpt2_causal_doc_mask_and_cached_generation():
    m = build_model(cfg("gpt2", init_std=0.2), seed=1).eval()
    x = torch.randint(0, 71, (2, 20))
    y = x.clone()
    y[:, 10:] = (y[:, 10:] + 1) % 71
    torch.testing.assert_close(m(x)[:, :10], m(y)[:, :10], rtol=0, atol=1e-5)
    doc = torch.tensor([[0] * 10 + [1] * 10] * 2)
    z = x.clone()
    z[:, :10] = (z[:, :10] + 3) % 71
    torch.testing.assert_close(m(x, doc)[:, 10:], m(z, doc)[:, 10:], rtol=0, atol=1e-5)
    prompt = [4, 8, 15, 16]
    ids = list(prompt)
    for _ in range(10):
        ids.append(int(m(torch.tensor([ids]))[0, -1].argmax()))
    assert generate(m, [prompt, [1, 2]], 10, temperature=0)[0] == ids[len(prompt):]
    assert generate(m, [[1, 2]], 10, temperature=0)[0] == generate(m, [prompt, [1, 2]], 10, temperature=0)[1]


def test_gpt2_loss_matches_logits():
    m = build_model(cfg("gpt2"), seed=2)
    x, y = torch.randint(0, 71, (2, 12)), torch.randint(0, 71, (2, 12))
    torch.testing.assert_close(m.loss(x, y), torch.nn.functional.cross_entropy(m(x).flatten(0, 1), y.flatten()))


def test_bert_bidirectional_padding_and_mlm_loss():
    m = build_model(cfg("bert"), seed=3).eval()
    x = torch.randint(0, 71, (2, 16))
    y = x.clone()
    y[:, 12] = (y[:, 12] + 1) % 71
    assert (m(x)[:, 0] - m(y)[:, 0]).abs().max() > 1e-4  # earlier tokens see later ones
    pad = torch.ones(2, 16, dtype=torch.bool)
    pad[0, 10:] = False
    junk = x.clone()
    junk[0, 10:] = 5
    torch.testing.assert_close(m(x, pad_mask_BT=pad)[0, :10], m(junk, pad_mask_BT=pad)[0, :10], rtol=0, atol=1e-5)
    torch.testing.assert_close(m(x, pad_mask_BT=pad)[0, :10], m(x[:1, :10])[0], rtol=1e-4, atol=1e-5)
    labels = torch.full_like(x, -100)
    labels[:, 3] = x[:, 3]
    ref = torch.nn.functional.cross_entropy(m(x)[:, 3], x[:, 3])
    torch.testing.assert_close(m.loss(x, labels), ref)
    with pytest.raises(ValueError, match="NSP head"):
        m.nsp_logits(x)
    from lmforge.models.bert import Bert
    assert Bert(cfg("bert"), nsp_head=True).nsp_logits(x).shape == (2, 2)


@pytest.mark.parametrize("arch,pooling", [("bert", "cls"), ("bert", "mean"), ("llama", "last"), ("gpt2", "mean")])
def test_sequence_classifier_ignores_padding(arch, pooling):
    torch.manual_seed(0)
    clf = SequenceClassifier(build_model(cfg(arch), seed=4), num_classes=3, pooling=pooling).eval()
    x = torch.randint(1, 71, (1, 9))
    padded = torch.cat([x, torch.zeros(1, 5, dtype=torch.long)], 1)
    pad = torch.cat([torch.ones(1, 9), torch.zeros(1, 5)], 1).bool()
    torch.testing.assert_close(clf(padded, pad), clf(x), rtol=1e-4, atol=1e-5)
    loss = clf.loss(padded, torch.tensor([2]), pad)
    loss.backward()
    assert clf.classifier.weight.grad.abs().sum() > 0


def test_token_classifier_and_pool_errors():
    tc = TokenClassifier(build_model(cfg("bert"), seed=6), num_labels=5)
    x = torch.randint(0, 71, (2, 7))
    assert tc(x).shape == (2, 7, 5)
    labels = torch.randint(0, 5, (2, 7))
    pad = torch.ones(2, 7, dtype=torch.bool)
    pad[1, 4:] = False
    full = tc.loss(x, labels, pad)
    manual = labels.clone()
    manual[1, 4:] = -100
    torch.testing.assert_close(full, torch.nn.functional.cross_entropy(tc(x, pad).flatten(0, 1), manual.flatten(),
                                                                       ignore_index=-100))
    with pytest.raises(ValueError, match="pooling"):
        pool(torch.zeros(1, 2, 3), None, "max")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_decoder_pad_mask_left_padding(arch):
    m = build_model(cfg(arch), seed=8).eval()
    x = torch.randint(1, 71, (1, 8))
    left = torch.cat([torch.zeros(1, 3, dtype=torch.long), x], 1)
    pad = torch.cat([torch.zeros(1, 3), torch.ones(1, 8)], 1).bool()
    pos = (pad.long().cumsum(1) - 1).clamp(min=0)
    got = m.hidden_states(left, pad_mask_BT=pad, positions_BT=pos)[:, 3:] if arch == "gpt2" else \
        m.hidden_states(left, pad_mask_BT=pad)[:, 3:]
    torch.testing.assert_close(got, m.hidden_states(x), rtol=1e-4, atol=1e-5)
