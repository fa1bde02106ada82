"""GPT-2 and BERT architectures, the loss protocol of forward (labels_BT=...), pooling and task heads."""

import pytest
import torch

from lmforge.config import ConfigError, ModelConfig, build_config
from lmforge.models import build_model
from lmforge.models.generate import generate
from lmforge.finetune.model import LmforgeBackbone, TaskModel
from lmforge.models.heads import pool
from lmforge.models.losses import IGNORE_INDEX

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
def test_task_model_classification_ignores_padding(arch, pooling):
    torch.manual_seed(0)
    clf = TaskModel(LmforgeBackbone(build_model(cfg(arch), seed=4)), "classification", 3, pooling).eval()
    x = torch.randint(1, 71, (1, 9))
    padded = torch.cat([x, torch.zeros(1, 5, dtype=torch.long)], 1)
    pad = torch.cat([torch.ones(1, 9), torch.zeros(1, 5)], 1).long()
    torch.testing.assert_close(clf(padded, pad), clf(x, torch.ones_like(x)), rtol=1e-4, atol=1e-5)
    loss, _ = clf.loss({"input_ids": padded, "attention_mask": pad, "label": torch.tensor([2])})
    loss.backward()
    assert clf.head.weight.grad.abs().sum() > 0
    assert {"head.weight", "head.bias"} <= set(clf.state_dict())  # saved adapters depend on these names


def test_pool_last_any_padding_side_and_errors():
    h = torch.randn(3, 6, 4)
    right = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    count_B = right.sum(1).clamp(min=1) - 1  # right padding: the last real token is at count - 1
    assert torch.equal(pool(h, right, "last"), h[torch.arange(3), count_B])
    left = right.flip(1)
    assert torch.equal(pool(h, left, "last")[:2], h[:2, -1])
    assert torch.equal(pool(h, None, "last"), h[:, -1]) and torch.equal(pool(h, right, "cls"), h[:, 0])
    torch.testing.assert_close(pool(h, right, "mean")[1], h[1, :3].mean(0))
    with pytest.raises(ValueError, match="pooling"):
        pool(torch.zeros(1, 2, 3), None, "max")
    with pytest.raises(ConfigError, match="base.pooling"):
        TaskModel(LmforgeBackbone(build_model(cfg("bert"), seed=6)), "classification", 3, "max")


def test_task_model_token_classification_loss():
    tc = TaskModel(LmforgeBackbone(build_model(cfg("bert"), seed=6)), "token-classification", 5, dropout=0.0)
    x = torch.randint(0, 71, (2, 7))
    pad = torch.ones(2, 7, dtype=torch.long)
    pad[1, 4:] = 0
    assert tc(x, pad).shape == (2, 7, 5)
    labels = torch.randint(0, 5, (2, 7))
    labels[1, 4:] = IGNORE_INDEX
    loss, logits = tc.loss({"input_ids": x, "attention_mask": pad, "labels": labels})
    kept = labels != IGNORE_INDEX
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits[kept], labels[kept]))


def _labels(arch, x):
    """Decoders: shifted next tokens with some ignored; BERT: a few labelled (masked) positions."""
    if arch == "bert":
        y = torch.full_like(x, IGNORE_INDEX)
        y[:, 2:9:3] = x[:, 2:9:3]
        return y
    y = torch.roll(x, -1, 1)
    y[0, :4] = IGNORE_INDEX
    return y


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_forward_with_labels_is_the_loss(arch, reduction):
    m = build_model(cfg(arch), seed=9)
    x = torch.randint(0, 71, (2, 12))
    y = _labels(arch, x)
    doc = torch.tensor([[0] * 5 + [1] * 7] * 2)
    grads = []
    for fn in (lambda: m(x, doc, labels_BT=y, reduction=reduction), lambda: m.loss(x, y, doc, reduction=reduction)):
        m.zero_grad()
        loss = fn()
        loss.backward()
        grads.append({k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None})
        assert loss.dtype == torch.float32 and loss.dim() == 0
    assert torch.equal(m(x, doc, labels_BT=y, reduction=reduction), m.loss(x, y, doc, reduction=reduction))
    assert grads[0].keys() == grads[1].keys() and all(torch.equal(grads[0][k], grads[1][k]) for k in grads[0])
    assert m(x, doc).shape == (2, 12, 71)  # without labels: logits, unchanged
    n = int((y != IGNORE_INDEX).sum())
    torch.testing.assert_close(m(x, labels_BT=y, reduction="sum"), m(x, labels_BT=y) * n, rtol=1e-5, atol=1e-5)
    ref = torch.nn.functional.cross_entropy(m(x).flatten(0, 1), y.flatten(), reduction=reduction)
    torch.testing.assert_close(m(x, labels_BT=y, reduction=reduction), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="reduction"):
        m(x, labels_BT=y, reduction="none")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_forward_with_labels_plain_path_for_a_swapped_head(arch):
    m = build_model(cfg(arch, tie_embeddings=False), seed=10)
    m.output = torch.nn.Linear(32, 71, bias=True)  # a bias: the fused path does not apply
    x = torch.randint(0, 71, (2, 10))
    y = _labels(arch, x)
    ref = torch.nn.functional.cross_entropy(m(x).flatten(0, 1), y.flatten(), reduction="sum")
    torch.testing.assert_close(m(x, labels_BT=y, reduction="sum"), ref, rtol=1e-5, atol=1e-4)


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
