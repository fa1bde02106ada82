"""The distillation loss, as an objective of the one ``TrainStep`` (``weight(batch)`` on the host,
``loss_sum(model, batch, device)`` on the device).

For the labelled targets t of a batch (decoders: positions with a next-token label; classifiers: examples),
student logits z_s, teacher logits z_t, temperature T, mix α:

    loss_sum = Σ_t [ α · T² · KL(softmax(z_t/T) ‖ softmax(z_s/T)) + (1 − α) · CE(z_s, y_t) ]
               + β_h · Σ_t Σ_j mean_D (h_s^j − h_t^{m(j)})²  + β_a · (the same over attention outputs)

where j runs over the student's blocks, m(j) is the teacher block it was initialised from, h the block
outputs (hidden-state transfer) and the attention sublayer outputs (attention transfer) at target t's
position (classifiers: the mean over the example's real tokens). T² keeps the KL gradient on the scale of the
CE's (Hinton et al. 2015). The step divides by Σ weight, so the mean is over targets for any accumulation.
Classifiers' CE (and ``weight``) come from ``TaskObjective`` (class weights included); the KL term is not
class-weighted.

The teacher runs in eval mode under ``torch.inference_mode``; its logits can be cached on disk, one file per
row keyed by the sha1 of the row's real tokens, so a batch whose rows were all seen before (epochs over a fixed
set, reshuffled or not) skips the teacher. Hidden / attention
transfer needs the teacher's activations, so it runs the teacher every time.

Legend: B batch, T tokens, V vocab (or K classes), D d_model.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.models.losses import IGNORE_INDEX

CACHE_LIMIT_BYTES = 4 << 20  # a row's teacher logits larger than this are not cached (long decoder windows)


def lm_of(model: nn.Module) -> nn.Module:
    """The language model inside ``model`` (itself, or a TaskModel's backbone)."""
    return model if hasattr(model, "layers") else model.backbone.model


class _Taps:
    """Forward hooks keeping the outputs of an LM's blocks and attention sublayers of the last forward."""

    def __init__(self, lm: nn.Module, attention: bool):
        self.blocks: list = [None] * len(lm.layers)
        self.attn: list = [None] * len(lm.layers)
        for i, block in enumerate(lm.layers):
            block.register_forward_hook(self._keep(self.blocks, i))
            if attention:
                block.attention.register_forward_hook(self._keep(self.attn, i))

    @staticmethod
    def _keep(store: list, i: int):
        def hook(_m, _args, out):
            store[i] = out[0] if isinstance(out, tuple) else out
        return hook


class DistillObjective:
    def __init__(self, teacher: nn.Module, kind: str, alpha: float, temperature: float, layer_map: list[int],
                 hidden_weight: float = 0.0, attention_weight: float = 0.0, cache_dir: Optional[Path] = None,
                 hard=None):
        self.teacher, self.kind, self.alpha, self.T = teacher.eval(), kind, alpha, temperature
        self.layer_map, self.hw, self.aw, self.hard = layer_map, hidden_weight, attention_weight, hard
        self.transfer = hidden_weight > 0 or attention_weight > 0
        self.cache_dir = Path(cache_dir) if cache_dir is not None and not self.transfer else None
        self.hits = self.misses = 0
        self._teacher_taps = _Taps(lm_of(teacher), attention_weight > 0) if self.transfer else None
        self._student_taps: dict[int, _Taps] = {}

    # ------------------------------------------------------------------ host side
    def weight(self, batch: dict) -> float:
        if self.hard is not None:
            return self.hard.weight(batch)
        return float((batch["labels"] != IGNORE_INDEX).sum())

    # ------------------------------------------------------------------ device side
    def _forward(self, model: nn.Module, batch: dict, device) -> torch.Tensor:
        ids = batch["input_ids"].to(device)
        if self.kind == "lm":
            return model(ids)
        return model(ids, batch["attention_mask"].to(device))

    @staticmethod
    def _row_keys(batch: dict) -> list[str]:
        """One key per row: sha1 of its real tokens (padding excluded), so a row hits the cache in any batch."""
        ids = batch["input_ids"].cpu()
        mask = batch.get("attention_mask")
        keys = []
        for i in range(ids.shape[0]):
            row = ids[i][mask[i].bool().cpu()] if mask is not None else ids[i]
            keys.append(hashlib.sha1(row.contiguous().numpy().tobytes()).hexdigest())
        return keys

    def teacher_logits(self, batch: dict, device) -> torch.Tensor:
        keys = self._row_keys(batch) if self.cache_dir is not None else []
        paths = [self.cache_dir / f"{k}.pt" for k in keys]
        if paths and all(p.is_file() for p in paths):
            self.hits += 1
            rows = [torch.load(p, map_location=device, weights_only=True) for p in paths]
            return torch.stack([r[: batch["input_ids"].shape[1]] if r.dim() > 1 else r for r in rows])
        with torch.inference_mode():
            z_t = self._forward(self.teacher, batch, device).float()
        z_t = z_t.clone()  # an ordinary tensor: it enters the student's autograd graph as a constant
        self.misses += 1
        if paths and z_t[0].numel() * 4 <= CACHE_LIMIT_BYTES:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            for p, row in zip(paths, z_t.cpu()):
                tmp = p.with_suffix(".tmp")
                torch.save(row.clone(), tmp)
                tmp.replace(p)
        return z_t

    def loss_sum(self, model: nn.Module, batch: dict, device) -> torch.Tensor:
        if self.transfer and id(model) not in self._student_taps:
            self._student_taps[id(model)] = _Taps(lm_of(model), self.aw > 0)
        z_s = self._forward(model, batch, device).float()
        z_t = self.teacher_logits(batch, device) if self.alpha > 0 or self.transfer else None
        sel = self._selection(batch, z_s, device)
        total = self._hard_sum(model, batch, z_s, device)
        if self.alpha > 0:
            total = (1 - self.alpha) * total + self.alpha * self.T ** 2 * kl_sum(z_s[sel], z_t[sel], self.T)
        if self.transfer:
            total = total + self._transfer_sum(model, batch, sel, device)
        return total

    def _selection(self, batch: dict, z_s: torch.Tensor, device) -> torch.Tensor:
        """The targets' positions: a bool mask over [B, T] (decoders) or [B] (classifiers)."""
        if self.kind == "lm":
            return (batch["labels"] != IGNORE_INDEX).to(device)
        return (batch["label"] != IGNORE_INDEX).to(device)

    def _hard_sum(self, model, batch: dict, z_s: torch.Tensor, device) -> torch.Tensor:
        if self.hard is not None:
            from lmforge.finetune.evaluation import to_device

            b = to_device(batch, device)
            cw = self.hard.class_weights.to(device) if self.hard.class_weights is not None else None
            z, y, w = self.hard.task_model.targets(z_s, b, cw)
            return F.cross_entropy(z, y, weight=w, ignore_index=IGNORE_INDEX, reduction="sum")
        y = batch["labels"].to(device)
        return F.cross_entropy(z_s.flatten(0, -2), y.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")

    def _transfer_sum(self, model, batch: dict, sel: torch.Tensor, device) -> torch.Tensor:
        s, t = self._student_taps[id(model)], self._teacher_taps
        mask = batch.get("attention_mask")
        total = torch.zeros((), device=device)
        for weight, s_list, t_list in ((self.hw, s.blocks, t.blocks), (self.aw, s.attn, t.attn)):
            if not weight:
                continue
            for j, i in enumerate(self.layer_map):
                total = total + weight * feature_mse_sum(s_list[j].float(), t_list[i].float().clone(), sel,
                                                         mask.to(device) if mask is not None else None)
        return total

    def cache_note(self) -> Optional[str]:
        if self.cache_dir is None:
            return "teacher cache off (hidden/attention transfer needs the teacher's activations)" \
                if self.transfer else None
        return f"teacher logits cache: {self.hits} hits, {self.misses} teacher forwards"


def kl_sum(z_s: torch.Tensor, z_t: torch.Tensor, T: float) -> torch.Tensor:
    """Σ over rows of KL(softmax(z_t/T) ‖ softmax(z_s/T)) (rows: the leading dims, classes: the last)."""
    log_p_s = F.log_softmax(z_s / T, dim=-1)
    log_p_t = F.log_softmax(z_t / T, dim=-1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum()


def feature_mse_sum(h_s: torch.Tensor, h_t: torch.Tensor, sel: torch.Tensor, mask_BT: Optional[torch.Tensor]
                    ) -> torch.Tensor:
    """Σ over targets of mean_D (h_s − h_t)²: decoders at each target position (``sel`` [B, T]); classifiers
    the mean over each example's real tokens (``mask_BT``) for the selected examples (``sel`` [B])."""
    d_BTD = (h_s - h_t) ** 2
    if sel.dim() == 2:
        return d_BTD.mean(-1)[sel].sum()
    m_BT = mask_BT.to(d_BTD.dtype) if mask_BT is not None else torch.ones(d_BTD.shape[:2], device=d_BTD.device)
    per_B = (d_BTD.mean(-1) * m_BT).sum(1) / m_BT.sum(1).clamp(min=1)
    return per_B[sel].sum()
