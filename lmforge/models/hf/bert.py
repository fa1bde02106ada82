"""BERT ↔ HF ``BertModel`` / ``BertForMaskedLM`` / ``BertForPreTraining`` (with or without the ``bert.`` prefix).

Parts a checkpoint lacks (e.g. the MLM head of a plain ``BertModel`` such as all-MiniLM-L6-v2, or the
pooler of ``BertForMaskedLM``) keep the model's freshly initialised values; ``from_hf`` reports them.
"""

from __future__ import annotations

import torch

from lmforge.config import ModelConfig
from lmforge.models.hf.io import require, take

_ACT_FROM_HF = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
_ACT_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}

_LAYER = {"attention.wq": "attention.self.query", "attention.wk": "attention.self.key",
          "attention.wv": "attention.self.value", "attention.wo": "attention.output.dense",
          "attention_norm": "attention.output.LayerNorm", "feed_forward.fc": "intermediate.dense",
          "feed_forward.proj": "output.dense", "ffn_norm": "output.LayerNorm"}
_TOP = {"tok_embeddings": "bert.embeddings.word_embeddings", "pos_embeddings": "bert.embeddings.position_embeddings",
        "type_embeddings": "bert.embeddings.token_type_embeddings", "emb_norm": "bert.embeddings.LayerNorm"}
_OPTIONAL = {"pooler": "bert.pooler.dense", "mlm_head.dense": "cls.predictions.transform.dense",
             "mlm_head.norm": "cls.predictions.transform.LayerNorm", "nsp_head": "cls.seq_relationship"}


def config_from_hf(c: dict, src: str) -> ModelConfig:
    act = c.get("hidden_act", "gelu")
    require(act in _ACT_FROM_HF, f"{src}: hidden_act {act!r} is not supported ({', '.join(_ACT_FROM_HF)})")
    require(c.get("position_embedding_type", "absolute") == "absolute",
            f"{src}: position_embedding_type {c.get('position_embedding_type')!r} is not supported (absolute only)")
    return ModelConfig(arch="bert", vocab_size=c["vocab_size"], d_model=c["hidden_size"],
                       n_layers=c["num_hidden_layers"],
                       n_heads=c["num_attention_heads"], ffn_hidden=c["intermediate_size"],
                       max_seq_len=c.get("max_position_embeddings", 512), norm_eps=c.get("layer_norm_eps", 1e-12),
                       type_vocab_size=c.get("type_vocab_size", 2), activation=_ACT_FROM_HF[act],
                       tie_embeddings=True, init_std=c.get("initializer_range", 0.02))


def _no_pruned_heads(cfg: ModelConfig) -> None:
    require(cfg.dims_per_head * cfg.n_heads == cfg.d_model, f"model.head_dim={cfg.head_dim} × model.n_heads="
            f"{cfg.n_heads} != model.d_model={cfg.d_model}: the HF {cfg.arch} config cannot state pruned heads")


def config_to_hf(cfg: ModelConfig, dtype: str, nsp: bool) -> dict:
    _no_pruned_heads(cfg)
    return {"architectures": ["BertForPreTraining" if nsp else "BertForMaskedLM"], "model_type": "bert",
            "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads, "intermediate_size": cfg.ffn_hidden or 4 * cfg.d_model,
            "max_position_embeddings": cfg.max_seq_len, "layer_norm_eps": cfg.norm_eps,
            "type_vocab_size": cfg.type_vocab_size, "hidden_act": _ACT_TO_HF[cfg.activation or "gelu"],
            "position_embedding_type": "absolute", "hidden_dropout_prob": cfg.dropout,
            "attention_probs_dropout_prob": cfg.dropout, "initializer_range": cfg.init_std,
            "tie_word_embeddings": True, "pad_token_id": 0, "dtype": dtype}


def _linear_or_norm(sd, out, ours, theirs, src, required=True) -> bool:
    if not required and f"{theirs}.weight" not in sd:
        return False
    out[f"{ours}.weight"] = take(sd, f"{theirs}.weight", src)
    out[f"{ours}.bias"] = take(sd, f"{theirs}.bias", src)
    return True


def from_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig, src: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Returns (our state dict, names of our parts the checkpoint did not contain)."""
    sd = {(k if k.startswith(("bert.", "cls.")) else "bert." + k): v for k, v in sd.items()}
    sd.pop("bert.embeddings.position_ids", None)
    out: dict[str, torch.Tensor] = {}
    missing = []
    for ours, theirs in _TOP.items():
        if ours == "emb_norm":
            _linear_or_norm(sd, out, ours, theirs, src)
        else:
            out[f"{ours}.weight"] = take(sd, f"{theirs}.weight", src)
    for i in range(cfg.n_layers):
        for ours, theirs in _LAYER.items():
            _linear_or_norm(sd, out, f"layers.{i}.{ours}", f"bert.encoder.layer.{i}.{theirs}", src)
    for ours, theirs in _OPTIONAL.items():
        if not _linear_or_norm(sd, out, ours, theirs, src, required=False):
            missing.append(ours)
    if "cls.predictions.bias" in sd:
        out["mlm_head.decoder.bias"] = sd.pop("cls.predictions.bias")
        sd.pop("cls.predictions.decoder.bias", None)
    else:
        missing.append("mlm_head.decoder.bias")
    sd.pop("cls.predictions.decoder.weight", None)  # tied to the word embeddings
    out["mlm_head.decoder.weight"] = out["tok_embeddings.weight"]
    require(not sd, f"{src}: unexpected tensors {sorted(sd)[:5]}")
    return out, missing


def to_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig, nsp: bool) -> dict[str, torch.Tensor]:
    out = {}
    for ours, theirs in _TOP.items():
        out[f"{theirs}.weight"] = sd[f"{ours}.weight"]
        if ours == "emb_norm":
            out[f"{theirs}.bias"] = sd[f"{ours}.bias"]
    for i in range(cfg.n_layers):
        for ours, theirs in _LAYER.items():
            for t in ("weight", "bias"):
                out[f"bert.encoder.layer.{i}.{theirs}.{t}"] = sd[f"layers.{i}.{ours}.{t}"]
    for ours, theirs in _OPTIONAL.items():
        if ours == "nsp_head" and not nsp:
            continue
        for t in ("weight", "bias"):
            out[f"{theirs}.{t}"] = sd[f"{ours}.{t}"]
    out["cls.predictions.bias"] = sd["mlm_head.decoder.bias"]
    return out
