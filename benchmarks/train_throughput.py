"""Training throughput: lmforge Llama vs HF transformers LlamaForCausalLM, same shape, side by side.

Both models: vocab 8192, d 384, 6 layers, 6 heads, FFN 1024, tied embeddings, batch 8 × 256 random tokens,
AdamW (fused=True), loss = mean next-token cross-entropy over all B·T positions (HF via its
own ``labels``/``shift_labels`` path, lmforge via ``Llama.loss``). fp32 and bf16 autocast, each library the
same way. MFU is against the peak the trainer uses (``lmforge.hardware.peak_flops``: best of several matmul
shapes in the same dtype, cached per machine), which bounds what the model's matmuls reach.

    .venv/bin/python benchmarks/train_throughput.py [--steps 20] [--warmup 3] [--threads N] [--ac] [--compile]

``--ac`` checkpoints every block's activations (lmforge: ``distributed/parallelize.py`` from outside the model; HF:
``gradient_checkpointing_enable``). ``--compile`` compiles every block with ``torch.compile`` (lmforge:
``distributed/parallelize.py``; HF: the same per-layer ``.compile()``), so both libraries get the same treatment.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

SHAPE = dict(vocab=8192, d=384, layers=6, heads=6, ffn=1024, batch=8, seq=256)


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def matmul_peak(dtype: torch.dtype, m: int = 1536, k: int = 1536, n: int = 1536, reps: int = 6) -> float:
    """Best-of FLOP/s of an (m×k)·(k×n) matmul in ``dtype``."""
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * m * k * n / best


OPTS = {"ac": False, "compile": False}


def build_lmforge():
    from lmforge.config import ModelConfig
    from lmforge.models import build_model

    s = SHAPE
    cfg = ModelConfig(vocab_size=s["vocab"], d_model=s["d"], n_layers=s["layers"], n_heads=s["heads"],
                      n_kv_heads=s["heads"], ffn_hidden=s["ffn"], max_seq_len=s["seq"], tie_embeddings=True)
    model = build_model(cfg, seed=0)
    from lmforge.distributed.parallelize import apply_activation_checkpointing, apply_compile

    if OPTS["ac"]:
        apply_activation_checkpointing(model)
    if OPTS["compile"]:
        apply_compile(model)
    return model, lambda x, y: model.loss(x, y)


def build_hf():
    from transformers import LlamaConfig, LlamaForCausalLM

    s = SHAPE
    cfg = LlamaConfig(vocab_size=s["vocab"], hidden_size=s["d"], intermediate_size=s["ffn"],
                      num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                      num_key_value_heads=s["heads"], max_position_embeddings=s["seq"], tie_word_embeddings=True,
                      rms_norm_eps=1e-5, attention_dropout=0.0)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.config.use_cache = False
    if OPTS["ac"]:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if OPTS["compile"]:
        for layer in model.model.layers:
            layer.compile(dynamic=False)
    return model, lambda x, y: model(input_ids=x, labels=y, shift_labels=y).loss


class Runner:
    """One model + AdamW + a fixed set of random batches; ``step()`` returns its wall time."""

    def __init__(self, builder, precision: str, seed: int = 0):
        self.model, self.loss_fn = builder()
        self.model.train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=3e-4, weight_decay=0.1, fused=True)
        g = torch.Generator().manual_seed(seed)
        B, T, V = SHAPE["batch"], SHAPE["seq"], SHAPE["vocab"]
        self.batches = [torch.randint(0, V, (B, T + 1), generator=g) for _ in range(4)]
        self.ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" \
            else contextlib.nullcontext
        self.i, self.times, self.loss = 0, [], float("nan")

    def step(self, record: bool) -> None:
        t0 = time.perf_counter()
        b = self.batches[self.i % len(self.batches)]
        x, y = b[:, :-1].contiguous(), b[:, 1:].contiguous()
        with self.ctx():
            loss = self.loss_fn(x, y)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.i += 1
        if record:
            self.times.append(time.perf_counter() - t0)
            self.loss = float(loss.detach())

    def tokens_per_s(self) -> float:
        dt = sorted(self.times)[len(self.times) // 2]  # median step: robust to other jobs on the CPU
        return SHAPE["batch"] * SHAPE["seq"] / dt


def compare(precision: str, steps: int, warmup: int) -> dict[str, Runner]:
    """Steps the two libraries alternately, so load from other processes hits both alike."""
    runners = {"hf": Runner(build_hf, precision), "lmforge": Runner(build_lmforge, precision)}
    for i in range(warmup + steps):
        for r in runners.values():
            r.step(record=i >= warmup)
    return runners


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--precision", choices=["fp32", "bf16", "both"], default="both")
    ap.add_argument("--ac", action="store_true", help="activation checkpointing on every block (both libraries)")
    ap.add_argument("--compile", action="store_true", help="torch.compile every block (both libraries)")
    args = ap.parse_args()
    OPTS.update(ac=args.ac, compile=args.compile)
    torch.set_num_threads(args.threads)

    import transformers

    from lmforge.models import build_model  # noqa: F401  (fail early if lmforge is missing)

    print(f"date {datetime.datetime.now().isoformat(timespec='seconds')}  cpu {cpu_name()}  "
          f"threads {args.threads}  torch {torch.__version__}  transformers {transformers.__version__}")
    s = SHAPE
    print(f"shape: vocab {s['vocab']} d {s['d']} layers {s['layers']} heads {s['heads']} ffn {s['ffn']} "
          f"tied, batch {s['batch']}x{s['seq']}, AdamW; {args.warmup} warmup + {args.steps} timed steps; "
          f"activation checkpointing {'on' if args.ac else 'off'}, compile {'on' if args.compile else 'off'}")
    lm, _ = build_lmforge()
    flops_tok = lm.flops_per_token(s["seq"])
    print(f"params {lm.num_params() / 1e6:.2f}M  flops/token {flops_tok / 1e6:.1f}M (6N + 12·L·H·Dh·T)")
    del lm
    precisions = ["fp32", "bf16"] if args.precision == "both" else [args.precision]
    for prec in precisions:
        dt = torch.bfloat16 if prec == "bf16" else torch.float32
        from lmforge.hardware import peak_info

        peak, source = peak_info(torch.device("cpu"), dt)
        # the model's own typical matmul (B·T × d) · (d × ffn): small K caps what this CPU reaches
        shape_peak = matmul_peak(dt, s["batch"] * s["seq"], s["d"], s["ffn"])
        print(f"{prec:5s} peak {peak / 1e9:.0f} GFLOP/s ({source}), model-shape matmul {shape_peak / 1e9:.0f} "
              f"GFLOP/s ({s['batch'] * s['seq']}×{s['d']}×{s['ffn']})")
        runners = compare(prec, args.steps, args.warmup)
        res = {name: (r.tokens_per_s(), r.loss) for name, r in runners.items()}
        del runners
        gc.collect()
        for name in ("hf", "lmforge"):
            tps, loss = res[name]
            mfu, of_shape = tps * flops_tok / peak, tps * flops_tok / shape_peak
            print(f"{prec:5s} {name:8s} {tps:9.0f} tok/s  MFU {mfu * 100:5.1f}%, {of_shape * 100:5.1f}% of the "
                  f"model-shape matmul rate  final loss {loss:.3f}")
        print(f"{prec:5s} ratio lmforge/hf = {res['lmforge'][0] / res['hf'][0]:.2f}x")


if __name__ == "__main__":
    main()
