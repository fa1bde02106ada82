"""One optimizer step and evaluation when the world size is > 1 (the single-process step lives in the trainer).

Legend: B micro-batch size, T sequence length, V vocab.

Every rank runs the same control flow: the global valid-token count is all-reduced over dp, each
micro-step backprops ``sum CE × loss_scale × dp / global tokens`` (dp-averaged gradients then equal the
gradient of the mean over every valid token of the global batch) and only the last one syncs gradients;
the global grad norm is reduced over FSDP/TP meshes and pipeline stages; then ONE all-reduce over the world
agrees on the logged loss, the finite check and the stop requests (time budget, signals), so no rank can
take a branch its peers do not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lmforge.training.step import IGNORE, accumulate_gradients, autocast_ctx, count_valid_tokens, evaluate


@dataclass
class StepResult:
    loss_sum: float  # summed token CE over the global batch
    ntok: int  # valid target tokens of the global batch
    norm: float  # global grad norm before clipping
    finite: bool  # agreed by every rank
    stop_budget: bool  # some rank hit training.max_minutes
    signal: bool  # some rank caught SIGTERM/SIGINT


def _concat(micro: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat([m["input_ids"] for m in micro]), torch.cat([m["labels"] for m in micro])


def _world_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _pipeline_ce(parts) -> float:
    """Summed CE of the last pipeline step (the first step's shape inference also calls the loss: skip it)."""
    return sum(float(c) for c in parts.pp_state["ce"][-parts.schedule._n_microbatches:])


def _loss_share(parts, pdims, ce_sum: torch.Tensor | float) -> float:
    """This rank's share of the world sum: tp peers each hold the same loss, only the last stage has one."""
    if pdims.pp > 1 and not pdims.is_last_stage:
        return 0.0
    return float(ce_sum) / pdims.tp


def dist_train_step(parts, micro: list[dict], pdims, tc, *, want_stop_budget: bool, caught_signal: bool
                    ) -> StepResult:
    """Forward/backward over all micro-batches, unscale, clip and agree; the caller steps the optimizer
    when ``finite``."""
    from lmforge.distributed.utils import clip_grad_norm, global_token_count, grad_sync

    device = pdims.device
    ntok = global_token_count(count_valid_tokens(micro), pdims)
    loss_scale = parts.scaler.scale if parts.scaler else 1.0
    if parts.schedule is not None:
        from lmforge.distributed.pipeline import pipeline_step

        x_BT, y_BT = _concat(micro)
        parts.pp_state.update(scale=loss_scale * pdims.dp / max(ntok, 1), ce=[])
        with autocast_ctx(device, tc.precision):
            pipeline_step(parts.schedule, pdims, x_BT.to(device), y_BT.to(device))
        ce_sum = _pipeline_ce(parts)
    else:
        ce_sum = accumulate_gradients(parts.model, micro, device, total_tokens=ntok, precision=tc.precision,
                                      loss_scale=loss_scale * pdims.dp,
                                      sync_ctx=lambda last: grad_sync(parts.model, last))
    params = parts.params
    local_ok = True
    if parts.scaler:
        local_ok = parts.scaler.unscale_(params)
    norm = clip_grad_norm(params, tc.grad_clip, pdims)
    local_ok = local_ok and math.isfinite(norm) and math.isfinite(float(ce_sum))
    loss, bad, budget, sig = _world_sum([_loss_share(parts, pdims, ce_sum), float(not local_ok),
                                         float(want_stop_budget), float(caught_signal)], device)
    return StepResult(loss, ntok, norm, finite=bad == 0 and math.isfinite(loss), stop_budget=budget > 0,
                      signal=sig > 0)


def _pad_rows(batch: dict, rows: int) -> dict:
    """Pad a partial eval batch to ``rows`` with ignored targets (the loss sum and token count are unchanged)."""
    n = batch["input_ids"].shape[0]
    if n == rows:
        return batch
    pad = rows - n
    x = torch.cat([batch["input_ids"], batch["input_ids"][:1].expand(pad, -1)])
    y = torch.cat([batch["labels"], torch.full((pad, batch["labels"].shape[1]), IGNORE, dtype=torch.long)])
    return {"input_ids": x, "labels": y}


@torch.no_grad()
def dist_evaluate(parts, batches, pdims, tc) -> dict:
    """Token-weighted validation CE over every dp rank's windows, under any strategy (pipeline included)."""
    device = pdims.device

    def world_reduce(totals: torch.Tensor) -> torch.Tensor:
        share = totals / pdims.tp if (pdims.pp == 1 or pdims.is_last_stage) else torch.zeros_like(totals)
        dist.all_reduce(share)
        return share

    if parts.schedule is None:
        return evaluate(parts.model, batches, device, tc.precision, reduce=world_reduce)
    m = parts.schedule._n_microbatches
    rows = -(-tc.micro_batch_size // m) * m
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    model = parts.model
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            batch = _pad_rows(batch, rows)
            parts.pp_state.update(scale=1.0, ce=[])
            x_BT, y_BT = batch["input_ids"].to(device), batch["labels"].to(device)
            with autocast_ctx(device, tc.precision):
                if pdims.pp_rank == 0:
                    parts.schedule.eval(x_BT, target=y_BT if pdims.is_last_stage else None)
                else:
                    parts.schedule.eval(target=y_BT if pdims.is_last_stage else None)
            totals[0] += _pipeline_ce(parts)
            totals[1] += float(count_valid_tokens([batch]))
    finally:
        model.train(was_training)
    loss_sum, n = world_reduce(totals).tolist()
    if n == 0:
        return {}
    loss = loss_sum / n
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": int(n)}
