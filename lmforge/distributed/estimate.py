"""Per-rank memory estimate for each parallel strategy, and a recommendation that fits a budget.

State terms follow how ``parallelize_model`` lays parameters out: block matmul weights are split by ``tp``,
embeddings/output/norms are replicated across tp; pipeline stages hold their blocks (the worst stage is
reported); ddp keeps everything, zero1 shards optimizer state, zero2/zero3 shard params, grads and optimizer
state over ``dp_shard`` (FSDP2), zero3 also frees gathered params after forward. Activations use the
Korthikanti et al. per-layer count (34·D bytes-per-2-byte-element per token, /tp for the matmul part) plus
the logits, assuming fused attention (no T×T score matrices); with activation checkpointing only block inputs and one block's activations are kept.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Optional

from lmforge.errors import ConfigError

GiB = 1024 ** 3
_STRATEGIES = ("ddp", "zero1", "zero2", "zero3", "zero3+offload")


@dataclass
class ModelShape:
    vocab: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_hidden: int
    tied: bool

    @classmethod
    def from_config(cls, mcfg) -> "ModelShape":
        from lmforge.models.common import ffn_hidden_default

        if mcfg.vocab_size is None:
            raise ConfigError("model.vocab_size is not set (needed to size the embeddings)",
                              hint="set --model.vocab_size=N, or data.path to a packed folder that states it")
        return cls(mcfg.vocab_size, mcfg.d_model, mcfg.n_layers, mcfg.n_heads, mcfg.n_kv_heads or mcfg.n_heads,
                   mcfg.ffn_hidden or ffn_hidden_default(mcfg.d_model), mcfg.tie_embeddings)

    def block_matmul(self) -> int:
        hd = self.d_model // self.n_heads
        attn = 2 * self.d_model * self.n_heads * hd + 2 * self.d_model * self.n_kv_heads * hd
        return attn + 3 * self.d_model * self.ffn_hidden

    def stage_params(self, tp: int, pp: int) -> int:
        """Parameters one rank holds before data-parallel sharding (first stage when pp > 1)."""
        layers = -(-self.n_layers // pp)
        per_block = self.block_matmul() // tp + 2 * self.d_model
        emb = self.vocab * self.d_model
        if pp == 1:
            return layers * per_block + emb * (1 if self.tied else 2) + self.d_model
        return layers * per_block + emb + self.d_model  # first stage: embeddings; last: output + norm


def estimate(shape: ModelShape, strategy: str, world_size: int, *, tp: int = 1, pp: int = 1,
             dp_replicate: int = 1, micro_batch: int = 1, seq_len: int = 512, optimizer: str = "adamw",
             momentum: float = 0.9, precision: str = "fp32", activation_checkpointing: bool = False,
             pp_microbatches: int = 4) -> dict[str, float]:
    """Bytes per rank: params (persistent), params_gathered (transient), grads, optimizer, activations,
    total (device) and host (CPU-offloaded state)."""
    if world_size % (tp * pp):
        raise ConfigError(f"world size {world_size} is not divisible by distributed.tp={tp} × distributed.pp={pp}")
    dp = world_size // (tp * pp)
    shard = dp // dp_replicate if strategy.startswith(("zero2", "zero3")) else 1
    offload = strategy.endswith("+offload")
    P = shape.stage_params(tp, pp)
    n_states = {"adamw": 2, "adam": 2, "sgd": 1 if momentum > 0 else 0}[optimizer]
    compute_b = 2 if precision == "bf16" else 4
    layers = -(-shape.n_layers // pp)
    block = shape.block_matmul() // tp + 2 * shape.d_model
    out = {"params": 4.0 * P / shard, "grads": 4.0 * P / shard, "optimizer": 4.0 * n_states * P / shard}
    if strategy == "zero1":
        out["optimizer"] = 4.0 * n_states * P / dp
    if strategy in ("ddp", "zero1"):
        out["params_gathered"] = (compute_b * P if compute_b != 4 else 0.0)
    elif strategy == "zero2":  # every block stays gathered from forward to backward
        out["params_gathered"] = compute_b * P + 4.0 * block
    else:  # two blocks in flight (current + prefetch), one block's unsharded grads
        out["params_gathered"] = compute_b * 2 * block + 4.0 * block
    T, D, B = seq_len, shape.d_model, micro_batch
    act_b = compute_b
    per_layer = T * B * D * (10 + 24 / tp) * act_b / 2  # fused (SDPA) attention: no T×T scores kept
    in_flight = min(pp, pp_microbatches) if pp > 1 else 1
    if activation_checkpointing:
        acts = layers * T * B * D * act_b + per_layer
    else:
        acts = layers * per_layer
    logits = 2 * 4.0 * T * B * shape.vocab  # float logits and their grad (last stage)
    out["activations"] = acts * in_flight + logits
    out["host"] = 0.0
    if offload:
        out["host"] = out["params"] + out["grads"] + out["optimizer"]
        out["params"] = out["grads"] = out["optimizer"] = 0.0
    out["total"] = sum(out[k] for k in ("params", "params_gathered", "grads", "optimizer", "activations"))
    return out


def recommend(shape: ModelShape, world_size: int, budget_gb: float, seq_len: int, micro_batch: int = 8,
              **kw) -> Optional[dict]:
    """Keep the requested micro-batch if anything fits (halve it otherwise); among setups that fit, take
    the fewest collectives: ddp < zero1 < zero2 < zero3 < offload, then no TP, then no checkpointing."""
    budget = budget_gb * GiB
    tps = [t for t in (1, 2, 4, 8) if world_size % t == 0 and shape.n_kv_heads % t == 0]
    mb = micro_batch
    while mb >= 1:
        for strategy in _STRATEGIES:
            for tp in tps if strategy.startswith(("zero2", "zero3")) else [1]:  # DDP cannot hold TP DTensors
                for ac in (False, True):
                    est = estimate(shape, strategy, world_size, tp=tp, micro_batch=mb, seq_len=seq_len,
                                   activation_checkpointing=ac, **kw)
                    if est["total"] <= budget:
                        return {"strategy": strategy, "tp": tp, "activation_checkpointing": ac,
                                "micro_batch": mb, "estimate": est}
        mb //= 2
    return None


def _row(name: str, est: dict) -> str:
    cols = ("params", "params_gathered", "grads", "optimizer", "activations", "total", "host")
    return f"{name:<15}" + "".join(f"{est[c] / GiB:>11.3f}" for c in cols)


def estimate_main(argv: list[str] | None = None) -> int:
    """``lmforge estimate --config CFG --world-size N [--budget-gb X] [--section.key=value ...]``."""
    from lmforge.config import load_config

    ap = argparse.ArgumentParser(prog="lmforge estimate", description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=None)
    ap.add_argument("--world-size", type=int, required=True)
    ap.add_argument("--budget-gb", type=float, default=None, help="per-rank device memory budget")
    args, overrides = ap.parse_known_args(argv)
    if args.world_size < 1:
        raise ConfigError(f"--world-size {args.world_size}: the number of ranks must be >= 1")
    if args.budget_gb is not None and not (math.isfinite(args.budget_gb) and args.budget_gb > 0):
        raise ConfigError(f"--budget-gb {args.budget_gb}: the per-rank memory budget must be a number > 0")
    cfg = load_config(args.config, overrides)
    if cfg.model.vocab_size is None and cfg.data.path:  # as `train` does: the data's tokenizer sizes the model
        from lmforge.data.pack import read_manifest

        cfg.model.vocab_size = read_manifest(cfg.data.path)["vocab_size"]
    shape = ModelShape.from_config(cfg.model)
    d, t = cfg.distributed, cfg.training
    kw = dict(seq_len=cfg.data.seq_len, optimizer=cfg.optimizer.name, momentum=cfg.optimizer.momentum,
              precision=t.precision)
    tp, pp = max(d.tp, 1), max(d.pp, 1)
    print(f"per-rank GiB, world size {args.world_size}, tp={tp} pp={pp}, micro-batch {t.micro_batch_size}, "
          f"seq {cfg.data.seq_len}, {cfg.optimizer.name}, {t.precision}, "
          f"activation checkpointing {t.activation_checkpointing}")
    print(f"{'strategy':<15}" + "".join(f"{c:>11}" for c in ("params", "gathered", "grads", "optim", "activ",
                                                             "total", "host")))
    for s in _STRATEGIES:
        est = estimate(shape, s, args.world_size, tp=tp, pp=pp, micro_batch=t.micro_batch_size,
                       activation_checkpointing=t.activation_checkpointing, pp_microbatches=d.pp_microbatches,
                       dp_replicate=max(d.dp_replicate, 1), **kw)
        print(_row(s, est))
    if args.budget_gb is not None:
        rec = recommend(shape, args.world_size, args.budget_gb, micro_batch=t.micro_batch_size, **kw)
        if rec is None:
            print(f"nothing fits {args.budget_gb} GiB per rank, even zero3+offload with micro-batch 1")
            return 1
        print(f"recommended for {args.budget_gb} GiB: distributed.strategy={rec['strategy'].split('+')[0]}"
              f"{' distributed.cpu_offload=true' if 'offload' in rec['strategy'] else ''} distributed.tp={rec['tp']} "
              f"training.micro_batch_size={rec['micro_batch']} "
              f"training.activation_checkpointing={str(rec['activation_checkpointing']).lower()} "
              f"(~{rec['estimate']['total'] / GiB:.2f} GiB)")
    return 0
