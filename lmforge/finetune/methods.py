"""Parameter-efficient fine-tuning on plain ``nn.Module``s.

- lora / adalora: Hugging Face ``peft`` injected into the module tree in place (``inject_adapter_in_model``;
  AdaLoRA through ``AdaLoraModel`` whose rank allocator the trainer steps via ``Applied.after_step``).
- adapter: bottleneck adapters (down → GELU → up, up zero-initialised so training starts at the base model)
  added to each target sublayer's output by a forward hook; the adapter lives as a child ``adapter`` of
  that sublayer, so base parameter names are unchanged.
- prefix: learned per-layer key/value slots (see ``model.PrefixKV``), Llama bases only.

Everything else is frozen except the task head and ``method.trainable`` patterns.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from lmforge.config import ConfigError
from lmforge.finetune.config import MethodConfig

DEFAULT_TARGETS = {  # (backbone naming, method family) → module-name regexes
    ("lmforge", "lora"): [r".*\.attention\.(wq|wk|wv|wo)"],
    ("lmforge", "adapter"): [r".*layers\.\d+\.(attention|feed_forward)"],
    ("hf", "lora"): [r".*\.attention\.self\.(query|key|value)", r".*\.attention\.output\.dense"],
    ("hf", "adapter"): [r".*\.layer\.\d+\.(attention\.output\.dense|output\.dense)"],
}


class Bottleneck(nn.Module):
    def __init__(self, d_model: int, size: int):
        super().__init__()
        self.down = nn.Linear(d_model, size)
        self.up = nn.Linear(size, d_model)
        nn.init.normal_(self.down.weight, std=0.02)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(torch.nn.functional.gelu(self.down(h)))


def _adapter_hook(module: nn.Module, args, out):
    if isinstance(out, tuple):
        return (out[0] + module.adapter(out[0]),) + out[1:]
    return out + module.adapter(out)


@dataclass
class Applied:
    """The model with a method applied, plus what the trainer and the savers need."""

    model: nn.Module
    cfg: MethodConfig
    tuner: Any = None  # peft AdaLoraModel (rank allocator) for adalora
    hooks: list = field(default_factory=list)

    def after_step(self, step: int) -> None:
        """Call after ``optimizer.step()``, before ``zero_grad()`` (AdaLoRA rank reallocation)."""
        if self.tuner is not None:
            self.tuner.update_and_allocate(step)

    def state(self) -> Optional["AllocatorState"]:
        """The method's state outside the model's tensors, as a Stateful (AdaLoRA's rank allocator), or None."""
        return AllocatorState(self.tuner) if self.tuner is not None else None

    def trainable_names(self) -> list[str]:
        return [n for n, p in self.model.named_parameters() if p.requires_grad]

    def param_counts(self) -> dict:
        seen, total, train = set(), 0, 0
        for p in self.model.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel()
            train += p.numel() if p.requires_grad else 0
        return {"trainable": train, "total": total, "trainable_pct": 100.0 * train / max(total, 1)}


class AllocatorState:
    """AdaLoRA's rank allocator as a Stateful (``method`` in checkpoints): the smoothed importance scores
    (``ipt``, ``exp_avg_ipt``, ``exp_avg_unc``, per LoRA tensor) and the rank pattern fixed at ``tfinal``; peft
    keeps them on the tuner, outside the model's tensors (the pruned ranks' zeros are in ``lora_E`` itself)."""

    _SCORES = ("ipt", "exp_avg_ipt", "exp_avg_unc")

    def __init__(self, tuner):
        self.tuner = tuner

    def state_dict(self) -> dict:
        ra = self.tuner.rankallocator
        sd = {k: {n: t.detach().cpu().clone() for n, t in getattr(ra, k).items()} for k in self._SCORES}
        return {**sd, "rank_pattern": self.tuner.peft_config[ra.adapter_name].rank_pattern}

    def load_state_dict(self, sd: dict) -> None:
        ra = self.tuner.rankallocator
        device = {n: p.device for n, p in self.tuner.model.named_parameters()}
        for k in self._SCORES:
            setattr(ra, k, {n: t.to(device[n]) for n, t in sd[k].items()})
        self.tuner.peft_config[ra.adapter_name].rank_pattern = sd["rank_pattern"]


def _targets(model: nn.Module, cfg: MethodConfig, kind: str) -> list[str]:
    pats = cfg.target_modules or DEFAULT_TARGETS.get((kind, "adapter" if cfg.name == "adapter" else "lora"), [])
    names = [n for n, _ in model.named_modules() if any(re.fullmatch(p, n) for p in pats)]
    if not names:
        raise ConfigError(f"method.target_modules {pats} match no module of this model (e.g. "
                          f"{[n for n, _ in model.named_modules()][1:6]})")
    return names


def _set_trainable(model: nn.Module, cfg: MethodConfig, keep: tuple[str, ...]) -> None:
    pats = [re.compile(p) for p in cfg.trainable]
    for name, p in model.named_parameters():
        p.requires_grad = (cfg.name == "full" or any(s in name for s in keep)
                           or any(r.search(name) for r in pats))


def apply_method(model: nn.Module, cfg: MethodConfig, total_steps: int = 1000) -> Applied:
    """Apply ``cfg.name`` to a ``TaskModel`` in place and freeze all but the method's parameters and the head."""
    kind = model.backbone.naming
    if cfg.name == "full":
        _set_trainable(model, cfg, ())
        return Applied(model, cfg)
    if cfg.name in ("lora", "adalora"):
        from peft import AdaLoraConfig, LoraConfig, inject_adapter_in_model

        targets = [re.escape(n) for n in _targets(model, cfg, kind)]
        regex = "(" + "|".join(targets) + ")"
        if cfg.name == "lora":
            pc = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                            target_modules=regex, bias="none")
            inject_adapter_in_model(pc, model)
            tuner = None
        else:
            from peft.tuners.adalora import AdaLoraModel

            tinit = int(cfg.adalora_tinit * total_steps)
            tfinal = int(cfg.adalora_tfinal * total_steps)
            pc = AdaLoraConfig(init_r=cfg.adalora_init_r, target_r=cfg.adalora_target_r, lora_alpha=cfg.lora_alpha,
                               lora_dropout=cfg.lora_dropout, target_modules=regex, total_step=total_steps,
                               tinit=tinit, tfinal=tfinal, deltaT=cfg.adalora_delta_t)
            tuner = AdaLoraModel(model, pc, "default")
        _set_trainable(model, cfg, ("lora_", "head."))
        return Applied(model, cfg, tuner=tuner)
    if cfg.name == "adapter":
        hooks = []
        d = model.backbone.d_model
        dev = next(model.parameters()).device
        for name in _targets(model, cfg, kind):
            mod = model.get_submodule(name)
            mod.add_module("adapter", Bottleneck(d, cfg.adapter_size).to(dev))
            hooks.append(mod.register_forward_hook(_adapter_hook))
        _set_trainable(model, cfg, (".adapter.", "head."))
        return Applied(model, cfg, hooks=hooks)
    if cfg.name == "prefix":
        model.backbone.enable_prefix(cfg.prefix_len)
        _set_trainable(model, cfg, ("backbone.prefix.", "head."))
        return Applied(model, cfg)
    raise ConfigError(f"invalid value for 'method.name': {cfg.name!r}")


# ----------------------------------------------------------------------------- save / load / merge


def adapter_tensors(applied: Applied) -> dict[str, torch.Tensor]:
    """The live tensors an adapter file holds, by state-dict key: the trainable parameters, plus AdaLoRA's
    rank buffers (its pruned-rank masks live there too: keeps ranks exact). Sharded (DTensor) under FSDP."""
    names = set(applied.trainable_names())
    sd = applied.model.state_dict()
    out = {k: v for k, v in sd.items() if k in names}
    if applied.tuner is not None:
        out.update({k: v for k, v in sd.items() if "ranknum" in k})
    return out


def save_adapter(applied: Applied, folder: str | Path, extra: Optional[dict] = None,
                 tensors: Optional[dict[str, torch.Tensor]] = None) -> Path:
    """``adapter.safetensors`` (trainable tensors only) + ``adapter.json`` (method config, names, ``extra``).
    ``tensors``: write these instead of ``adapter_tensors(applied)`` (the distributed trainer passes the full
    tensors it gathered from the shards)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    live = adapter_tensors(applied) if tensors is None else tensors
    sd = {k: v.detach().contiguous().cpu() for k, v in live.items()}
    save_file(sd, str(folder / "adapter.safetensors"))
    meta = {"method": applied.cfg.model_dump(mode="json"), "tensors": sorted(sd), **(extra or {})}
    (folder / "adapter.json").write_text(json.dumps(meta, indent=2))
    return folder


def load_adapter(applied: Applied, folder: str | Path) -> dict:
    """Load tensors saved by ``save_adapter`` into a model with the same method applied; returns adapter.json."""
    from safetensors.torch import load_file

    folder = Path(folder)
    for f in ("adapter.safetensors", "adapter.json"):
        if not (folder / f).is_file():
            raise ConfigError(f"{folder}: missing {f} (not an adapter folder)")
    meta = json.loads((folder / "adapter.json").read_text())
    if meta["method"]["name"] != applied.cfg.name:
        raise ConfigError(f"{folder}: adapter is method {meta['method']['name']!r}, model has {applied.cfg.name!r}")
    sd = load_file(str(folder / "adapter.safetensors"))
    own = applied.model.state_dict()
    missing = sorted(set(applied.trainable_names()) - set(sd))
    if meta.get("backbone_in_base"):  # a compressed classifier: its base run already holds every backbone tensor
        missing = [k for k in missing if not k.startswith("backbone.")]
    unexpected = sorted(set(sd) - set(own))
    if missing or unexpected:
        raise ConfigError(f"{folder}/adapter.safetensors does not fit this model (missing: {missing[:4]}, "
                          f"unexpected: {unexpected[:4]}); same base and method settings?")
    with torch.no_grad():
        for k, v in sd.items():
            own[k].copy_(v)
    return meta


def merge(applied: Applied) -> nn.Module:
    """Fold LoRA/AdaLoRA deltas into the base weights and remove the peft layers (in place). The result has
    the base model's plain module names, so it saves and loads as an ordinary model."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if applied.cfg.name == "full":
        return applied.model
    if applied.cfg.name not in ("lora", "adalora"):
        raise ConfigError(f"method {applied.cfg.name!r} adds modules that cannot be folded into the base weights; "
                          "save the whole model instead (save_model)")
    model = applied.model
    for name, mod in list(model.named_modules()):
        if isinstance(mod, BaseTunerLayer):
            mod.merge()
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, mod.get_base_layer())
    applied.tuner = None
    return model


def save_model(model: nn.Module, file: str | Path, metadata: Optional[dict] = None) -> Path:
    """Every tensor of the (merged) model as one safetensors file (tied tensors stored once)."""
    from safetensors.torch import save_file

    from lmforge.checkpoint import model_state

    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    save_file(model_state(model), str(file), metadata={k: str(v) for k, v in (metadata or {}).items()})
    return file
