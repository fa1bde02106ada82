"""GPT-2 ↔ HF ``GPT2LMHeadModel``. HF stores Conv1D weights as [in, out] with q/k/v fused in ``c_attn``."""

from __future__ import annotations

import torch

from lmforge.config import ModelConfig
from lmforge.models.hf.io import require, take, take_head

_ACT_FROM_HF = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}
_ACT_TO_HF = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}


def config_from_hf(c: dict, src: str) -> ModelConfig:
    act = c.get("activation_function", "gelu_new")
    require(act in _ACT_FROM_HF, f"{src}: activation_function {act!r} is not supported ({', '.join(_ACT_FROM_HF)})")
    require(c.get("scale_attn_weights", True) and not c.get("scale_attn_by_inverse_layer_idx", False)
            and not c.get("reorder_and_upcast_attn", False), f"{src}: non-standard GPT-2 attention scaling")
    d = c["n_embd"]
    return ModelConfig(arch="gpt2", vocab_size=c["vocab_size"], d_model=d, n_layers=c["n_layer"], n_heads=c["n_head"],
                       ffn_hidden=c.get("n_inner") or 4 * d, max_seq_len=c.get("n_positions", 1024),
                       norm_eps=c.get("layer_norm_epsilon", 1e-5),
                       tie_embeddings=bool(c.get("tie_word_embeddings", True)),
                       activation=_ACT_FROM_HF[act], init_std=c.get("initializer_range", 0.02))


def _no_pruned_heads(cfg: ModelConfig) -> None:
    require(cfg.dims_per_head * cfg.n_heads == cfg.d_model, f"model.head_dim={cfg.head_dim} × model.n_heads="
            f"{cfg.n_heads} != model.d_model={cfg.d_model}: the HF {cfg.arch} config cannot state pruned heads")


def config_to_hf(cfg: ModelConfig, dtype: str) -> dict:
    _no_pruned_heads(cfg)
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
            "n_embd": cfg.d_model, "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_inner": cfg.ffn_hidden or
            4 * cfg.d_model, "n_positions": cfg.max_seq_len, "layer_norm_epsilon": cfg.norm_eps,
            "activation_function": _ACT_TO_HF[cfg.activation or "gelu_tanh"], "tie_word_embeddings": cfg.tie_embeddings,
            "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
            "initializer_range": cfg.init_std, "dtype": dtype}


def from_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig, src: str) -> dict[str, torch.Tensor]:
    sd = {(k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k): v for k, v in sd.items()}
    sd = {k: v for k, v in sd.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    p = "transformer."
    out = {"tok_embeddings.weight": take(sd, p + "wte.weight", src),
           "pos_embeddings.weight": take(sd, p + "wpe.weight", src),
           "norm.weight": take(sd, p + "ln_f.weight", src), "norm.bias": take(sd, p + "ln_f.bias", src)}
    for i in range(cfg.n_layers):
        h, o = f"{p}h.{i}.", f"layers.{i}."
        qkv_w = take(sd, h + "attn.c_attn.weight", src).t()
        qkv_b = take(sd, h + "attn.c_attn.bias", src)
        for j, name in enumerate(("wq", "wk", "wv")):
            out[f"{o}attention.{name}.weight"] = qkv_w.chunk(3, 0)[j].contiguous()
            out[f"{o}attention.{name}.bias"] = qkv_b.chunk(3, 0)[j].contiguous()
        for ours, theirs in (("attention.wo", "attn.c_proj"), ("feed_forward.fc", "mlp.c_fc"),
                             ("feed_forward.proj", "mlp.c_proj")):
            out[f"{o}{ours}.weight"] = take(sd, f"{h}{theirs}.weight", src).t().contiguous()
            out[f"{o}{ours}.bias"] = take(sd, f"{h}{theirs}.bias", src)
        for ours, theirs in (("attention_norm", "ln_1"), ("ffn_norm", "ln_2")):
            out[f"{o}{ours}.weight"] = take(sd, f"{h}{theirs}.weight", src)
            out[f"{o}{ours}.bias"] = take(sd, f"{h}{theirs}.bias", src)
    take_head(sd, out, cfg.tie_embeddings, src)
    require(not sd, f"{src}: unexpected tensors {sorted(sd)[:5]}")
    return out


def to_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    p = "transformer."
    out = {p + "wte.weight": sd["tok_embeddings.weight"], p + "wpe.weight": sd["pos_embeddings.weight"],
           p + "ln_f.weight": sd["norm.weight"], p + "ln_f.bias": sd["norm.bias"]}
    for i in range(cfg.n_layers):
        h, o = f"{p}h.{i}.", f"layers.{i}."
        out[h + "attn.c_attn.weight"] = torch.cat([sd[f"{o}attention.{n}.weight"] for n in ("wq", "wk", "wv")]).t()
        out[h + "attn.c_attn.bias"] = torch.cat([sd[f"{o}attention.{n}.bias"] for n in ("wq", "wk", "wv")])
        for ours, theirs in (("attention.wo", "attn.c_proj"), ("feed_forward.fc", "mlp.c_fc"),
                             ("feed_forward.proj", "mlp.c_proj")):
            out[f"{h}{theirs}.weight"] = sd[f"{o}{ours}.weight"].t()
            out[f"{h}{theirs}.bias"] = sd[f"{o}{ours}.bias"]
        for ours, theirs in (("attention_norm", "ln_1"), ("ffn_norm", "ln_2")):
            out[f"{h}{theirs}.weight"] = sd[f"{o}{ours}.weight"]
            out[f"{h}{theirs}.bias"] = sd[f"{o}{ours}.bias"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["output.weight"]
    return out
