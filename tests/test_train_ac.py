"""Activation checkpointing applied from outside the model: gradients bit-identical to no checkpointing."""

from __future__ import annotations

import pytest
import torch

from lmforge.config import build_config
from lmforge.models import build_model
from lmforge.training.engine import accumulate_gradients
from lmforge.distributed.parallelize import apply_activation_checkpointing


def _grads(every: int | None, selective: bool = False, dropout: float = 0.1):
    cfg = build_config({"model": {"preset": "tiny", "vocab_size": 64, "max_seq_len": 16, "n_layers": 4,
                                  "dropout": dropout}})
    model = build_model(cfg.model, seed=0)
    n_wrapped = apply_activation_checkpointing(model, every=every, selective=selective) if every else 0
    g = torch.Generator().manual_seed(1)
    seq = torch.randint(0, 64, (3, 17), generator=g)
    torch.manual_seed(5)  # dropout masks: the recompute must replay them
    loss = accumulate_gradients(model, [{"input_ids": seq[:, :-1], "labels": seq[:, 1:]}], torch.device("cpu"))
    return loss, {n.replace("_checkpoint_wrapped_module.", ""): p.grad.clone() for n, p in model.named_parameters()
                  if p.grad is not None}, n_wrapped, model


@pytest.mark.parametrize("every,selective,expect_wrapped", [(1, False, 4), (2, False, 2), (1, True, 4)])
def test_checkpointed_grads_bit_identical(every, selective, expect_wrapped):
    loss0, g0, _, _ = _grads(None)
    loss1, g1, n, model = _grads(every, selective)
    assert n == expect_wrapped
    assert torch.equal(loss0, loss1)
    assert g0.keys() == g1.keys()
    for k in g0:
        assert torch.equal(g0[k], g1[k]), k
    # names in the state dict are unchanged, so checkpoints stay interchangeable
    assert "layers.0.attention.wq.weight" in model.state_dict()
