"""Per-rank memory estimate for each parallel strategy, and a recommendation that fits a budget.

State terms follow how ``parallelize_model`` lays parameters out: block matmul weights are split by ``tp``,
embeddings/output/norms are replicated across tp; pipeline stages hold their blocks (the worst stage is
reported); ddp keeps everything, zero1 shards optimizer state, zero2/zero3 shard params, grads and optimizer
state over ``dp_shard`` (FSDP2), zero3 also frees gathered params after forward.

Activations are counted from what lmforge's Llama block keeps for its backward (fused attention: no T×T
scores), per token, with c the compute bytes (2 in bf16/fp16, 4 in fp32) and a float32 residual stream:
- no checkpointing: both RMSNorms keep their fp32 input (2·4·D) and the bf16 outputs go to 6 tensors of D
  (norm outputs ×2, rotated q, k and v as attention sees them, attention output = ``wo``'s input) and 4 of F
  (w1, w3, silu, product): 8·D + c·(6·D + 4·F) + 4·H (softmax log-sum-exp) + 8 (two rstd);
- selective (matmul and attention outputs kept): 4·D + c·(4·D + 2·Dkv + 2·F) + 4·H;
- full: the block input, 4·D.
The peak is the largest of three moments (on top of params + optimizer state):
- forward end, inside the fused head+CE: all blocks' activations, the bf16 weight casts autocast keeps
  (ddp/zero1 in low precision), the head's saved gradients (grad_h N·D·c, grad_w V·D·4) and one chunk's
  float32 logits (``losses.chunk_rows``);
- backward start: the same minus the chunk, plus the backward working set of one block (RMSNorm's fp32
  backward, 20·D per token) and, with checkpointing, one recomputed block;
- backward end: every gradient, block 0's activations and the working set.
Gradients are freed after each step (``zero_grad(set_to_none=True)``), so they do not add to the forward
peak, except DDP's gradient buckets (ddp/zero1 with dp > 1), which live for the whole run. ``ac_every`` is
taken as 1 (every block checkpointed). Compiled blocks keep at most this much.
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


def saved_per_token(shape: ModelShape, mode: str, compute_b: int, tp: int = 1) -> float:
    """Bytes one block keeps for its backward per token: ``mode`` "none", "selective" or "full" (see the module
    docstring; the matmul-side terms split by ``tp``)."""
    D, F, H, c = shape.d_model, shape.ffn_hidden, shape.n_heads, compute_b
    dkv = shape.n_kv_heads * (D // H)
    if mode == "full":
        return 4.0 * D
    if mode == "selective":
        return 4.0 * D + c * (2 * D + (2 * D + 2 * dkv + 2 * F) / tp) + 4.0 * H / tp
    return 8.0 * D + c * (2 * D + (4 * D + 4 * F) / tp) + 4.0 * H / tp + 8


def _head_terms(shape: ModelShape, tokens: float, compute_b: int, pp: int, chunk: Optional[int]
                ) -> tuple[float, float]:
    """(forward peak, kept after forward) bytes of the final norm + output head + loss on the last stage:
    the fused chunked CE at pp = 1 (``chunk`` rows; None: the CUDA choice of ``losses.chunk_rows``),
    materialised float logits and their gradient under the pipeline."""
    from lmforge.models.losses import chunk_rows

    D, V, c = shape.d_model, shape.vocab, compute_b
    norm_in = tokens * (4.0 * D + 8)  # the final norm's fp32 input, the token ids
    if pp > 1:
        logits = tokens * V * (c + 8.0)
        return norm_in + logits, norm_in + logits
    kept = norm_in + tokens * c * D + 4.0 * V * D  # grad_h, grad_w (computed in the forward)
    chunk = min(tokens, chunk or chunk_rows(V, "cuda"))
    return kept + tokens * c * D + 2.0 * c * V * D + chunk * V * (4.0 + c), kept


def estimate(shape: ModelShape, strategy: str, world_size: int, *, tp: int = 1, pp: int = 1,
             dp_replicate: int = 1, micro_batch: int = 1, seq_len: int = 512, optimizer: str = "adamw",
             momentum: float = 0.9, precision: str = "fp32", activation_checkpointing: bool = False,
             ac_selective: bool = False, pp_microbatches: int = 4, ce_chunk: Optional[int] = None
             ) -> dict[str, float]:
    """Bytes per rank: params (persistent), params_gathered (transient), grads, optimizer, activations (what
    the forward keeps), peak_forward / peak_backward_start / peak_backward_end (everything above the
    persistent state at those moments), total (device peak) and host (CPU-offloaded state)."""
    if world_size % (tp * pp):
        raise ConfigError(f"world size {world_size} is not divisible by distributed.tp={tp} × distributed.pp={pp}")
    dp = world_size // (tp * pp)
    shard = dp // dp_replicate if strategy.startswith(("zero2", "zero3")) else 1
    P = shape.stage_params(tp, pp)
    n_states = {"adamw": 2, "adam": 2, "sgd": 1 if momentum > 0 else 0}[optimizer]
    c = 2 if precision in ("bf16", "fp16") else 4
    layers = -(-shape.n_layers // pp)
    block = shape.block_matmul() // tp + 2 * shape.d_model
    out = {"params": 4.0 * P / shard, "grads": 4.0 * P / shard, "optimizer": 4.0 * n_states * P / shard}
    if strategy == "zero1":
        out["optimizer"] = 4.0 * n_states * P / dp
    if strategy.endswith("+offload"):
        out["host"] = out["params"] + out["grads"] + out["optimizer"]
        out["params"] = out["grads"] = out["optimizer"] = 0.0
    else:
        out["host"] = 0.0
    replicated = strategy in ("ddp", "zero1")
    if replicated:  # autocast's bf16 copies of the block matmul weights (none in fp32)
        out["params_gathered"] = c * layers * shape.block_matmul() / tp if c != 4 else 0.0
    elif strategy == "zero2":  # every block stays gathered from forward to backward
        out["params_gathered"] = c * P + 4.0 * block
    else:  # two blocks in flight (current + prefetch), one block's unsharded grads
        out["params_gathered"] = c * 2 * block + 4.0 * block
    gathered_bwd = out["params_gathered"] / layers if replicated else out["params_gathered"]
    tokens = seq_len * micro_batch * (min(pp, pp_microbatches) if pp > 1 else 1)
    mode = ("selective" if ac_selective else "full") if activation_checkpointing else "none"
    saved, full = tokens * saved_per_token(shape, mode, c, tp), tokens * saved_per_token(shape, "none", c, tp)
    head_peak, head_kept = _head_terms(shape, seq_len * micro_batch, c, pp, ce_chunk)  # one micro-batch reaches the head
    work = tokens * 20.0 * shape.d_model  # one block's backward working set (RMSNorm's fp32 backward)
    out["activations"] = layers * saved + head_kept
    out["peak_forward"] = out["params_gathered"] + layers * saved + head_peak
    if mode == "none":
        out["peak_backward_start"] = out["params_gathered"] + out["activations"] + work
    else:  # the last block recomputed, the head's weight gradient made
        head_grad = 4.0 * shape.vocab * shape.d_model
        out["peak_backward_start"] = (layers - 1) * saved + full + work + gathered_bwd + head_grad
    out["peak_backward_end"] = out["grads"] + full + work + gathered_bwd
    buckets = out["grads"] if replicated and dp > 1 else 0.0  # DDP's gradient buckets live for the whole run
    peak = max(out["peak_forward"], out["peak_backward_start"], out["peak_backward_end"])
    out["total"] = out["params"] + out["optimizer"] + buckets + peak
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
          f"activation checkpointing {t.activation_checkpointing}{' (selective)' if t.ac_selective else ''}")
    print(f"{'strategy':<15}" + "".join(f"{c:>11}" for c in ("params", "gathered", "grads", "optim", "activ",
                                                             "total", "host")))
    for s in _STRATEGIES:
        est = estimate(shape, s, args.world_size, tp=tp, pp=pp, micro_batch=t.micro_batch_size,
                       activation_checkpointing=t.activation_checkpointing, ac_selective=t.ac_selective,
                       pp_microbatches=d.pp_microbatches,
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
