"""Generation throughput: lmforge ``generate`` vs transformers ``generate`` on the same Llama weights.

A random-init HF ``LlamaForCausalLM`` (benchmark shape: vocab 8192, d 384, 6 layers, 6 heads, FFN 1024) is
saved and imported with ``lmforge.models.hf.load_hf``; both then decode greedily 128 new tokens (no early
stop) from the same 32-token prompts, batch 1 and 8, in fp32 and bf16 (weights cast, no autocast).
Prints new tokens/s (median of repeats) and the lmforge/HF ratio, and checks fp32 outputs agree.

    .venv/bin/python benchmarks/generate_throughput.py [--new 128] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from benchmarks.train_throughput import SHAPE, cpu_name  # noqa: E402


def hf_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    s = SHAPE
    cfg = LlamaConfig(vocab_size=s["vocab"], hidden_size=s["d"], intermediate_size=s["ffn"],
                      num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["heads"],
                      max_position_embeddings=512, tie_word_embeddings=True, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger weights than the default init: peaky logits, so greedy ties are rare
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    return model


def alternate(fns: dict, repeats: int) -> tuple[dict, dict]:
    """Median wall time per function, running them alternately so background load hits all alike."""
    outs = {k: f() for k, f in fns.items()}  # warm-up (also the returned outputs)
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}, outs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new", type=int, default=128, help="new tokens per sequence")
    ap.add_argument("--prompt", type=int, default=32, help="prompt length")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import transformers

    from lmforge.models.generate import generate
    from lmforge.models.hf import load_hf

    print(f"date {datetime.datetime.now().isoformat(timespec='seconds')}  cpu {cpu_name()}  threads {args.threads}"
          f"  torch {torch.__version__}  transformers {transformers.__version__}")
    hf = hf_model()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = load_hf(tmp).eval()
    g = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16):
        hf_d, ours_d = hf.to(dtype), ours.to(dtype)
        for batch in (1, 8):
            prompts = torch.randint(0, SHAPE["vocab"], (batch, args.prompt), generator=g)
            kw = dict(max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False, pad_token_id=0,
                      eos_token_id=None)

            def run_hf():
                with torch.no_grad():
                    return hf_d.generate(prompts, attention_mask=torch.ones_like(prompts), **kw)[:, args.prompt:]

            def run_ours():
                return generate(ours_d, prompts.tolist(), args.new, temperature=0)

            t, outs = alternate({"hf": run_hf, "lmforge": run_ours}, args.repeats)
            t_hf, t_ours, out_hf, out_ours = t["hf"], t["lmforge"], outs["hf"], outs["lmforge"]
            tps_hf, tps_ours = batch * args.new / t_hf, batch * args.new / t_ours
            same = out_hf.tolist() == out_ours
            tag = str(dtype).removeprefix("torch.")
            print(f"{tag:8s} batch {batch}:  hf {tps_hf:8.1f} tok/s   lmforge {tps_ours:8.1f} tok/s   "
                  f"ratio {tps_ours / tps_hf:5.2f}x   identical tokens: {same}")


if __name__ == "__main__":
    main()
