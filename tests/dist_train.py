"""A minimal training loop on top of lmforge.distributed, shared by the multi-process tests.

Every run trains the tiny Llama for a few SGD(momentum) steps on a fixed random global batch (some labels
ignored, unevenly across ranks) with global-norm clipping, so a parallel run must match the single-process
run step for step. Legend: S steps, B global batch, T tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmforge.config import build_config
from lmforge.distributed.mesh import ParallelDims
from lmforge.distributed.parallelize import parallelize_model, shard_optimizer
from lmforge.distributed.utils import clip_grad_norm, global_token_count, grad_sync, normalize_loss

VOCAB, SEQ, BATCH, STEPS, LR, CLIP = 96, 32, 4, 5, 0.5, 1.0


def make_cfg(tie: bool = True, accum: int = 1, **dist):
    return build_config({"model": {"preset": "tiny", "vocab_size": VOCAB, "tie_embeddings": tie},
                         "training": {"device": "cpu", "grad_accum_steps": accum}, "distributed": dist})


def make_data(steps: int = STEPS) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    seq_SBT = torch.randint(0, VOCAB, (steps, BATCH, SEQ + 1), generator=g)
    inputs_SBT, labels_SBT = seq_SBT[:, :, :-1].clone(), seq_SBT[:, :, 1:].clone()
    labels_SBT[:, -1, : SEQ // 2] = -100  # the last row (a later rank's) has fewer valid tokens
    return inputs_SBT, labels_SBT


def build(cfg, pdims: ParallelDims):
    from lmforge.models import build_model

    model = build_model(cfg.model, seed=0)
    model = parallelize_model(model, pdims, cfg)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    return model, shard_optimizer(opt, pdims, cfg)


def full_params(model) -> dict[str, torch.Tensor]:
    """Canonical FQN → full tensor (this rank's stage only under pp)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    sd, _ = get_state_dict(model, [], options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().clone() for k, v in sd.items()}


def train_steps(model, opt, pdims: ParallelDims, cfg, start: int, stop: int) -> dict:
    """Steps [start, stop). Returns global mean losses and pre-clip grad norms (lists) per step."""
    inputs_SBT, labels_SBT = make_data()
    per = BATCH // pdims.dp
    rows = slice(pdims.dp_rank * per, (pdims.dp_rank + 1) * per)
    schedule, holder = None, {}
    if pdims.pp > 1:
        from lmforge.distributed.pipeline import build_schedule

        def loss_fn(logits_BTV, labels_BT):
            ce = F.cross_entropy(logits_BTV.flatten(0, 1), labels_BT.flatten(), ignore_index=-100, reduction="sum")
            return normalize_loss(ce, holder["ntok"], pdims)

        schedule = build_schedule(model, pdims, cfg, loss_fn)
    losses, norms = [], []
    for s in range(start, stop):
        x_BT, y_BT = inputs_SBT[s, rows], labels_SBT[s, rows]
        ntok = global_token_count((y_BT != -100).sum(), pdims)
        holder["ntok"] = ntok
        if schedule is not None:
            from lmforge.distributed.pipeline import pipeline_step

            mb_losses = pipeline_step(schedule, pdims, x_BT, y_BT)
            local = sum(float(v) for v in mb_losses) * ntok / pdims.dp if mb_losses else 0.0
        else:
            accum, local = cfg.training.grad_accum_steps, 0.0
            for i, (xm_BT, ym_BT) in enumerate(zip(x_BT.chunk(accum), y_BT.chunk(accum))):
                with grad_sync(model, enabled=i == accum - 1):
                    logits_BTV = model(xm_BT)
                    ce = F.cross_entropy(logits_BTV.flatten(0, 1), ym_BT.flatten(), ignore_index=-100,
                                         reduction="sum")
                    normalize_loss(ce, ntok, pdims).backward()
                local += float(ce.detach())
        norms.append(clip_grad_norm(model, CLIP, pdims))
        opt.step()
        opt.zero_grad()
        total = torch.tensor(local, dtype=torch.float64)
        if pdims.is_distributed:
            torch.distributed.all_reduce(total)  # world sum: every dp replica's stage/tp copies counted
            total /= pdims.tp  # tp ranks each computed the same loss
        losses.append(float(total) / ntok)
    return {"losses": losses, "norms": norms}


def reference(steps: int = STEPS, tie: bool = True) -> dict:
    """The single-process run every parallel run must reproduce."""
    cfg = make_cfg(tie=tie, dp_shard=1)
    pdims = ParallelDims.from_config(cfg.distributed, 1)
    model, opt = build(cfg, pdims)
    out = train_steps(model, opt, pdims, cfg, 0, steps)
    out["params"] = full_params(model)
    return out
