"""The one training step, for every world size, strategy and engine, for pretraining and fine-tuning alike.

Legend: B micro-batch size, T sequence length, V vocab.

A step takes the micro-batches of one optimizer step (this rank's share of the global batch) and:

1. counts the labelled targets on the host (``objective.weight``: CPU batches, no device sync) and sums them
   over the data-parallel ranks (a host-side all-reduce), giving W, the global target weight;
2. runs forward/backward through the engine: every micro-batch backprops
   ``objective.loss_sum × loss_scale × dp / W``. Data-parallel gradient *averaging* (÷ dp) then leaves the
   gradient of the mean loss over every labelled target of the global batch, for any accumulation split or
   number of ranks. Only the last micro-step synchronises gradients;
3. unscales (fp16), takes the global grad norm and clips;
4. agrees, in ONE all-reduce and ONE host read, on the finite check and on the stop requests (time budget,
   signals), so no rank takes a branch its peers do not; then steps the optimizer (or skips a non-finite /
   overflowed step), the loss scaler and the schedule. A skipped step still advances the schedule so the
   data stream and the learning rate stay aligned with an uninterrupted run.

The loss and the grad norm stay on the device: the loop reads them on logging steps only.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from lmforge.models.losses import IGNORE_INDEX


def autocast_ctx(device: torch.device, precision: str):
    """bf16/fp16 autocast for the forward pass; fp32 and pure-bf16 params need none."""
    if precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(device_type=device.type, dtype=dtype)
    return contextlib.nullcontext()


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU batch tensor on ``device`` without making the host wait: to CUDA it is staged in pinned memory
    (the caching host allocator keeps the block until the copy is done) and copied asynchronously; a pageable
    source would make the copy synchronous. To the CPU (or a tensor already there) nothing changes."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def count_valid_tokens(micro_batches: list[dict]) -> int:
    """Labelled targets in CPU-resident LM batches (no device sync)."""
    return int(sum(int((mb["labels"] != IGNORE_INDEX).sum()) for mb in micro_batches))


class LMObjective:
    """Next-token (or masked-token) cross-entropy of an lmforge model, through its ``forward`` so DDP /
    FSDP2 / DeepSpeed hooks run (the model fuses the output head with the cross-entropy)."""

    def weight(self, batch: dict) -> float:
        return float((batch["labels"] != IGNORE_INDEX).sum())

    def loss_sum(self, model: nn.Module, batch: dict, device: torch.device) -> torch.Tensor:
        tokens_BT = to_device(batch["input_ids"], device)
        labels_BT = to_device(batch["labels"], device)
        doc_ids_BT = batch.get("doc_ids")
        if doc_ids_BT is not None:
            doc_ids_BT = to_device(doc_ids_BT, device)
        return model(tokens_BT, doc_ids_BT, labels_BT=labels_BT, reduction="sum")


def grad_norm_and_clip(params: Iterable[torch.Tensor], max_norm: Optional[float]) -> torch.Tensor:
    """Global L2 norm of all (unsharded) grads as a device tensor; grads scaled in place to ``max_norm``."""
    with_grad = [p for p in params if p.grad is not None]
    if not with_grad:
        return torch.zeros(())
    norm = torch.nn.utils.get_total_norm([p.grad for p in with_grad], norm_type=2.0, foreach=True)
    if max_norm is not None:  # takes the parameters (it scales their .grad), not the grads themselves
        torch.nn.utils.clip_grads_with_norm_(with_grad, max_norm, norm, foreach=True)
    return norm


@dataclass
class StepOutput:
    loss_sum: torch.Tensor  # this rank's share of the summed target loss (device; world sum = global sum)
    weight: float  # labelled targets (or class-weight sum) of the global batch
    norm: torch.Tensor  # global grad norm before clipping (device)
    finite: bool  # agreed by every rank; False: the update was skipped
    overflow: bool  # skipped because of an fp16 overflow (not a non-finite loss)
    budget: bool  # some rank asked to stop for the time budget
    signal: bool  # some rank caught SIGTERM/SIGINT
    scaler_stop: Optional[str] = None  # fp16 cannot continue (overflows at the minimum scale)


@dataclass
class StepSettings:
    grad_clip: Optional[float]
    precision: str


class TrainStep:
    """``TrainStep(engine, objective, pdims, settings)(micro, requests) -> StepOutput``.

    ``engine`` (``training.engine``) owns the model, optimizer and schedule and knows how forward/backward,
    clipping and the update run (native single-process / DDP / FSDP2 / TP, pipeline, DeepSpeed).
    ``requests() -> (budget, signal)`` is sampled after backward, so a step that crosses the time budget
    stops the run right after it. ``post_update(step)`` runs after the optimizer step while gradients still
    exist (AdaLoRA's rank allocator)."""

    def __init__(self, engine, objective, pdims, settings: StepSettings,
                 post_update: Optional[Callable[[], None]] = None):
        self.engine, self.objective, self.pdims, self.settings = engine, objective, pdims, settings
        self.post_update = post_update
        self.read_norm = False  # the loop sets this when it needs the norm every step (spike detection)

    def __call__(self, micro: list[dict], requests: Callable[[], tuple[bool, bool]]) -> StepOutput:
        eng, pdims = self.engine, self.pdims
        weight = self._global_weight(sum(self.objective.weight(mb) for mb in micro))
        scaler = eng.scaler
        factor = (scaler.scale if scaler else 1.0) * pdims.dp / max(weight, 1.0)
        loss_sum = eng.forward_backward(micro, self.objective, factor)
        found_inf = scaler.found_inf_(eng.clip_params) if scaler else None
        norm = eng.clip(self.settings.grad_clip)
        bad = ~(torch.isfinite(norm) & torch.isfinite(loss_sum.detach()))
        if found_inf is not None:
            bad = bad | found_inf.to(bad.device).bool().reshape(())
        budget, signal = requests()
        flags = self._agree(bad, budget, signal, norm)
        finite = not flags[0]
        eng.update(finite)
        if finite and self.post_update is not None:
            self.post_update()
        eng.zero_grad()
        msg = scaler.update(found_inf=not finite) if scaler else None
        eng.schedule_step()
        return StepOutput(eng.loss_share(loss_sum), weight, norm, finite, overflow=not finite and scaler is not None,
                          budget=flags[1], signal=flags[2], scaler_stop=msg)

    def _global_weight(self, local: float) -> float:
        """Sum over dp ranks (host side: a CPU all-reduce over the world, each dp replica counted tp × pp
        times because its tensor/pipeline peers load the same batch)."""
        pdims = self.pdims
        if not pdims.is_distributed:
            return local
        import torch.distributed as dist

        t = torch.tensor([local], dtype=torch.float64)
        dist.all_reduce(t, group=pdims.host_group)
        return float(t[0]) / (pdims.tp * pdims.pp)

    def _agree(self, bad: torch.Tensor, budget: bool, signal: bool, norm: torch.Tensor) -> list[bool]:
        """[any rank non-finite, any budget, any signal] with one host read (the norm rides along when the
        loop wants it every step, so spike detection costs no extra sync). The host's flags enter as fills of
        a device tensor, not as host-to-device copies (each of those would be a sync of its own on CUDA)."""
        bad_d = bad.to(torch.float64).reshape(())
        flags = torch.stack([bad_d, torch.full_like(bad_d, float(budget)), torch.full_like(bad_d, float(signal))])
        if self.pdims.is_distributed:
            import torch.distributed as dist

            flags = flags.to(self.pdims.device)
            dist.all_reduce(flags)
        if self.read_norm:
            flags = torch.cat([flags, norm.detach().double().reshape(1).to(flags.device)])
        values = flags.tolist()
        if self.read_norm:
            self.last_norm = values[3]
        return [v > 0 for v in values[:3]]


@torch.no_grad()
def evaluate(engine, objective, batches: Iterable[dict], precision: str) -> dict:
    """Token-weighted mean loss and perplexity over ``batches`` (every rank its own share; summed over the
    world, each rank's share counted once: see ``engine.loss_share``)."""
    device = engine.device
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    with engine.eval_mode():
        for batch in batches:
            with autocast_ctx(device, precision):
                ce = engine.eval_loss_sum(batch, objective)
            totals[0] += engine.loss_share(ce).double()
            totals[1] += objective.weight(batch) / (engine.pdims.tp * engine.pdims.pp)
    if engine.pdims.is_distributed:
        import torch.distributed as dist

        dist.all_reduce(totals)
    loss_sum, n = totals.tolist()
    if n == 0:
        return {}
    loss = loss_sum / n
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": int(round(n))}


def schedule_step(scheduler) -> None:
    with warnings.catch_warnings():  # a skipped step still advances the schedule, on purpose
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
        scheduler.step()
