"""Quantization-aware fine-tuning before int8 quantization (``quantize.qat_steps`` > 0), via torchao QAT.

torchao's ``QATConfig`` (prepare step) swaps the layers ``quantize`` will quantize for ``FakeQuantizedLinear``:
the forward rounds weights to int8 per output row (symmetric, as the final quantizer) and, for
``int8_dynamic``, activations to int8 per token (asymmetric: torchao's fake quantizer has no symmetric per-token
mode); gradients pass straight through the rounding. The short fine-tune runs through the one training loop
(``trainjobs``; the state-dict names are unchanged, so its checkpoints are ordinary), then the convert step
puts plain ``nn.Linear`` back and the post-training quantizer takes over.
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.compress.qlinear import quiet_torchao, targets


def _configs(scheme: str):
    from torchao.quantization.qat import IntxFakeQuantizeConfig

    weight = IntxFakeQuantizeConfig(torch.int8, "per_channel", is_symmetric=True)
    act = IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False) if scheme == "int8_dynamic" else None
    return act, weight


def fake_quantize(lm: nn.Module, scheme: str, skip: list[str]) -> None:
    """The QAT prepare step on ``lm``'s target linears (in place)."""
    q = quiet_torchao()
    from torchao.quantization.qat import QATConfig

    act, weight = _configs(scheme)
    names = set(targets(lm, skip))
    q.quantize_(lm, QATConfig(activation_config=act, weight_config=weight, step="prepare"),
                filter_fn=lambda mod, fqn: isinstance(mod, nn.Linear) and fqn in names)


def convert_back(lm: nn.Module) -> None:
    """The QAT convert step without a base config: ``FakeQuantizedLinear`` → ``nn.Linear`` (trained weights)."""
    q = quiet_torchao()
    from torchao.quantization.qat import QATConfig

    q.quantize_(lm, QATConfig(step="convert"))


def qat_finetune(ctx, model: nn.Module) -> tuple[nn.Module, dict]:
    """``quantize.qat_steps`` of fake-quantized fine-tuning of ``model`` (an LM or a TaskModel); returns the
    trained float model (fake quantization removed) and the run's summary."""
    from lmforge.compress.kd import lm_of
    from lmforge.compress.trainjobs import done, train_classifier, train_lm, work_dir

    qc = ctx.cfg.quantize
    ctx.cfg.train.steps = qc.qat_steps

    def convert(m: nn.Module) -> None:
        fake_quantize(lm_of(m), qc.scheme, qc.skip)

    if ctx.src.kind == "lm":
        trained, summary = train_lm(ctx, model, work_dir(ctx, "qat"), convert=convert)
    else:
        trained, summary = train_classifier(ctx, model, work_dir(ctx, "qat"), convert=convert)
    done(ctx)
    convert_back(lm_of(trained))
    return trained, summary
