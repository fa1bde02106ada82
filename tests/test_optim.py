"""Optimizer factory: the decay / no-decay rule, each optimizer builds and steps, Lion against its formula."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lmforge.config import build_config
from lmforge.models import build_model
from lmforge.training.lion import Lion
from lmforge.training.optim import build_optimizer, param_groups


def _cfg(**opt):
    return build_config({"model": {"preset": "tiny", "vocab_size": 64, "max_seq_len": 16}, "optimizer": opt})


def test_param_group_rule():
    cfg = _cfg(weight_decay=0.1)
    model = build_model(cfg.model, seed=0)
    groups = {g["name"]: g for g in param_groups(model, cfg.optimizer)}
    decay, no_decay = set(groups["decay"]["param_names"]), set(groups["no_decay"]["param_names"])
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0
    assert "tok_embeddings.weight" in no_decay  # embeddings (and the tied head, same tensor) never decay
    assert "output.weight" not in decay | no_decay  # tied: counted once
    assert "layers.0.attention.wq.weight" in decay and "layers.1.feed_forward.w2.weight" in decay
    assert {"norm.weight", "layers.0.attention_norm.weight", "layers.0.ffn_norm.weight"} <= no_decay
    n_unique = len({id(p) for p in model.parameters()})
    assert len(decay) + len(no_decay) == n_unique
    for name in decay:
        assert dict(model.named_parameters())[name].ndim >= 2


def test_untied_head_decays_and_patterns_and_embedding_decay():
    cfg = build_config({"model": {"preset": "tiny", "vocab_size": 64, "tie_embeddings": False},
                        "optimizer": {"no_decay_patterns": ["feed_forward.w2"], "embedding_weight_decay": 0.01}})
    model = build_model(cfg.model, seed=0)
    groups = {g["name"]: g for g in param_groups(model, cfg.optimizer)}
    assert "output.weight" in groups["decay"]["param_names"]
    assert "layers.0.feed_forward.w2.weight" in groups["no_decay"]["param_names"]
    assert groups["embedding"]["param_names"] == ["tok_embeddings.weight"]
    assert groups["embedding"]["weight_decay"] == 0.01


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd", "lion", "adafactor"])
def test_each_optimizer_steps(name):
    cfg = _cfg(name=name, lr=1e-2)
    model = build_model(cfg.model, seed=0)
    opt = build_optimizer(model, cfg.optimizer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randint(0, 64, (2, 8))
    model(x).logsumexp(-1).mean().backward()
    opt.step()
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert "layers.0.attention.wq.weight" in changed
    sd = opt.state_dict()
    opt2 = build_optimizer(model, cfg.optimizer)
    opt2.load_state_dict(sd)


def test_lion_matches_formula():
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(5, 3))
    ref, m = p.detach().clone(), torch.zeros(5, 3)
    opt = Lion([p], lr=0.1, betas=(0.9, 0.99), weight_decay=0.5)
    for _ in range(3):
        g = torch.randn(5, 3)
        p.grad = g.clone()
        opt.step()
        ref = ref * (1 - 0.1 * 0.5) - 0.1 * torch.sign(0.9 * m + 0.1 * g)
        m = 0.99 * m + 0.01 * g
    torch.testing.assert_close(p.detach(), ref)
