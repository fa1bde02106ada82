"""Llama ↔ HF ``LlamaForCausalLM``. Both use the rotate-half RoPE layout, so q/k need no permutation."""

from __future__ import annotations

import torch

from lmforge.config import ModelConfig
from lmforge.models.hf.io import require, take, take_head


def config_from_hf(c: dict, src: str) -> ModelConfig:
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    require(rope.get("rope_type", rope.get("type", "default")) == "default",
            f"{src}: rope type {rope.get('rope_type', rope.get('type'))!r} is not supported (only default RoPE)")
    require(not c.get("attention_bias", False) and not c.get("mlp_bias", False),
            f"{src}: attention_bias/mlp_bias=true is not supported by lmforge Llama")
    require(c.get("hidden_act", "silu") == "silu", f"{src}: hidden_act {c.get('hidden_act')!r} != 'silu'")
    d, h = c["hidden_size"], c["num_attention_heads"]
    require(c.get("head_dim") in (None, d // h), f"{src}: head_dim={c.get('head_dim')} != hidden_size/heads")
    return ModelConfig(arch="llama", vocab_size=c["vocab_size"], d_model=d, n_layers=c["num_hidden_layers"],
                       n_heads=h, n_kv_heads=c.get("num_key_value_heads") or h, ffn_hidden=c["intermediate_size"],
                       max_seq_len=c.get("max_position_embeddings", 2048),
                       rope_theta=float(rope.get("rope_theta", c.get("rope_theta", 10000.0))),
                       norm_eps=c.get("rms_norm_eps", 1e-6), tie_embeddings=bool(c.get("tie_word_embeddings", False)),
                       init_std=c.get("initializer_range", 0.02))


def config_to_hf(cfg: ModelConfig, dtype: str) -> dict:
    h = cfg.n_heads
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.d_model, "intermediate_size": cfg.ffn_hidden, "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": h, "num_key_value_heads": cfg.n_kv_heads or h, "head_dim": cfg.dims_per_head,
            "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
            "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False, "mlp_bias": False,
            "initializer_range": cfg.init_std, "dtype": dtype}


_LAYER = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
          "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
          "feed_forward.w2": "mlp.down_proj", "attention_norm": "input_layernorm",
          "ffn_norm": "post_attention_layernorm"}


def from_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig, src: str) -> dict[str, torch.Tensor]:
    sd = dict(sd)
    out = {"tok_embeddings.weight": take(sd, "model.embed_tokens.weight", src),
           "norm.weight": take(sd, "model.norm.weight", src)}
    for i in range(cfg.n_layers):
        for ours, theirs in _LAYER.items():
            out[f"layers.{i}.{ours}.weight"] = take(sd, f"model.layers.{i}.{theirs}.weight", src)
    take_head(sd, out, cfg.tie_embeddings, src)
    sd = {k: v for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}
    require(not sd, f"{src}: unexpected tensors {sorted(sd)[:5]}")
    return out


def to_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out = {"model.embed_tokens.weight": sd["tok_embeddings.weight"], "model.norm.weight": sd["norm.weight"]}
    for i in range(cfg.n_layers):
        for ours, theirs in _LAYER.items():
            out[f"model.layers.{i}.{theirs}.weight"] = sd[f"layers.{i}.{ours}.weight"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["output.weight"]
    return out
