"""lmforge ZeRO-2/3 (FSDP2 via parallelize_model) vs DeepSpeed ZeRO-2/3 on the same lmforge Llama, side by side.

Every run is ``world`` fresh gloo processes on this machine (so peak RSS is per run), training the same model
on the same random token batches with lmforge's AdamW (decay groups) and global-norm clipping 1.0, the model's own
fused loss on both sides; lmforge runs its product path (``build_engine`` + the one ``TrainStep``), DeepSpeed gets
the very same ``nn.Module`` and optimizer through ``deepspeed.initialize``. Printed per engine and stage: tokens/s,
per-rank peak RSS (and its growth after imports), live tensor bytes after backward (params + grads + optimizer
state + buffers, deduplicated storages), the ratios lmforge/DeepSpeed, and lmforge's memory estimator against
its measured state bytes.

    DS_ACCELERATOR=cpu .venv/bin/python benchmarks/distributed_compare.py              # d256 L4 V8192 T256
    .venv/bin/python benchmarks/distributed_compare.py --steps 4 --warmup 1 --vocab 1024   # quick check

Legend: B micro-batch per rank, T sequence length, V vocab.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import socket
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _cfg(a, stage: int):
    from lmforge.config import build_config

    return build_config({"model": {"d_model": a.d_model, "n_layers": a.n_layers, "n_heads": a.n_heads,
                                   "vocab_size": a.vocab, "max_seq_len": a.seq},
                         "data": {"seq_len": a.seq}, "optimizer": {"lr": 1e-3},
                         "scheduler": {"name": "constant", "warmup_steps": 0},
                         "training": {"device": "cpu", "micro_batch_size": a.micro_batch, "grad_clip": 1.0,
                                      "seed": 0},
                         "distributed": {"strategy": f"zero{stage}", "backend": "gloo"}})


def _batches(a, rank: int):
    g = torch.Generator().manual_seed(1000 + rank)
    seq_SBT = torch.randint(0, a.vocab, (a.warmup + a.steps, a.micro_batch, a.seq + 1), generator=g)
    return seq_SBT[:, :, :-1].contiguous(), seq_SBT[:, :, 1:].contiguous()


def live_tensor_bytes() -> int:
    """Bytes of every distinct tensor storage reachable from Python (activations excluded by the caller)."""
    gc.collect()
    seen, total = set(), 0
    for o in gc.get_objects():
        if not isinstance(o, torch.Tensor) or o.device.type == "meta":
            continue
        try:
            st = o.untyped_storage()
            ptr, n = st.data_ptr(), st.nbytes()
        except (RuntimeError, NotImplementedError, TypeError):  # wrapper subclasses (DTensor): counted via locals
            continue
        if n and ptr not in seen:
            seen.add(ptr)
            total += n
            if os.environ.get("LMFORGE_BENCH_DEBUG") and n > 2 ** 24:
                print(f"big storage {n / 2 ** 20:.0f} MB shape {tuple(o.shape)} {o.dtype}", file=sys.stderr)
    return total


def _rss_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _run_lmforge(a, stage, x_SBT, y_SBT):
    """lmforge's product path: the one build path and the one TrainStep (what ``lmforge train`` runs)."""
    from lmforge.distributed import init_distributed
    from lmforge.distributed.utils import local_state_bytes
    from lmforge.training.build import build_engine
    from lmforge.training.step import LMObjective, StepSettings, TrainStep

    cfg = _cfg(a, stage)
    pdims = init_distributed(cfg)
    base = _rss_kb()
    engine = build_engine(cfg, pdims, pdims.device).engine
    step = TrainStep(engine, LMObjective(), pdims, StepSettings(1.0, "fp32"))
    out, last = {"losses": []}, a.warmup + a.steps - 1
    real_clip = engine.clip

    def clip(max_norm):  # after the last backward, before the update: what is live with gradients held
        if len(out["losses"]) == last:
            out["live_bytes"] = live_tensor_bytes()
            sb = local_state_bytes(engine.model, engine.optimizer)
            grads = sum(p.grad.to_local().numel() * p.grad.element_size() if hasattr(p.grad, "to_local")
                        else p.grad.numel() * p.grad.element_size() for p in engine.params if p.grad is not None)
            out["state"] = {"params": sb["params"], "grads": grads, "optimizer": sb["optimizer"]}
        return real_clip(max_norm)

    engine.clip = clip
    for s in range(a.warmup + a.steps):
        if s == a.warmup:
            torch.distributed.barrier()
            t0 = time.perf_counter()
        res = step([{"input_ids": x_SBT[s], "labels": y_SBT[s]}], lambda: (False, False))
        out["losses"].append(float(res.loss_sum) / res.weight * pdims.dp)
    torch.distributed.barrier()
    out.update(elapsed=time.perf_counter() - t0, rss_base_kb=base)
    return out


def ds_config(a, stage: int, n_params: int) -> dict:
    """DeepSpeed's defaults, except buckets sized to the model: the default 5e8-element buckets would be a 2 GB
    buffer per rank here (real memory on a GPU); one model-sized bucket also gives DeepSpeed its fewest
    collectives."""
    bucket = n_params if a.ds_bucket <= 0 else a.ds_bucket
    zero = {"stage": stage, "reduce_bucket_size": bucket, "allgather_bucket_size": bucket}
    if stage == 3:
        zero["stage3_prefetch_bucket_size"] = bucket
    return {"train_micro_batch_size_per_gpu": a.micro_batch, "gradient_accumulation_steps": 1,
            "gradient_clipping": 1.0, "zero_optimization": zero, "steps_per_print": 10 ** 9}


def _run_deepspeed(a, stage, x_SBT, y_SBT):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    from lmforge.models import build_model
    from lmforge.training.optim import build_optimizer

    cfg = _cfg(a, stage)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    torch.set_num_threads(a.threads)
    base = _rss_kb()
    model = build_model(cfg.model, seed=0)
    opt = build_optimizer(model, cfg.optimizer)  # the same decay groups and AdamW kernel as lmforge
    ds = ds_config(a, stage, sum(p.numel() for p in model.parameters()))
    eng, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    torch.set_num_threads(a.threads)
    out = {"losses": []}
    for s in range(a.warmup + a.steps):
        if s == a.warmup:
            torch.distributed.barrier()
            t0 = time.perf_counter()
        loss = eng(x_SBT[s], labels_BT=y_SBT[s])  # the model's own (fused) loss, as lmforge computes it
        eng.backward(loss)
        out["losses"].append(float(loss.detach()))
        del loss
        if s == a.warmup + a.steps - 1:
            out["live_bytes"] = live_tensor_bytes()
        eng.step()
    torch.distributed.barrier()
    out.update(elapsed=time.perf_counter() - t0, rss_base_kb=base)
    return out


def _rank_main(rank, world, port, engine, stage, a, q):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(a.threads)
    warnings.filterwarnings("ignore")
    try:
        x_SBT, y_SBT = _batches(a, rank)
        fn = _run_lmforge if engine == "lmforge" else _run_deepspeed
        out = fn(a, stage, x_SBT, y_SBT)
        out.update(rank=rank, rss_peak_kb=_rss_kb(), threads=torch.get_num_threads())
        q.put(out)
        torch.distributed.destroy_process_group()
    except BaseException:
        q.put({"rank": rank, "error": traceback.format_exc()})
        raise


def run(engine: str, stage: int, a) -> list[dict]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_rank_main, args=(r, a.world, port, engine, stage, a, q)) for r in range(a.world)]
    for p in procs:
        p.start()
    results = [q.get(timeout=a.timeout) for _ in procs]
    for p in procs:
        p.join(30)
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        raise RuntimeError(f"{engine} zero{stage} failed:\n" + "\n".join(errors))
    return sorted(results, key=lambda r: r["rank"])


def summarize(rs: list[dict], a) -> dict:
    tokens = a.steps * a.micro_batch * a.seq * a.world
    return {"tok_s": tokens / max(r["elapsed"] for r in rs),
            "rss_mb": max(r["rss_peak_kb"] for r in rs) / 1024,
            "rss_growth_mb": max(r["rss_peak_kb"] - r["rss_base_kb"] for r in rs) / 1024,
            "live_mb": max(r["live_bytes"] for r in rs) / 2 ** 20,
            "loss": sum(r["losses"][-1] for r in rs) / len(rs), "threads": rs[0]["threads"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--n-layers", type=int, default=4)
    ap.add_argument("--n-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--stages", default="2,3")
    ap.add_argument("--repeats", type=int, default=1, help="alternate engines this many times; best kept")
    ap.add_argument("--ds-bucket", type=int, default=0, help="DeepSpeed bucket elements (0: the model's size)")
    ap.add_argument("--timeout", type=float, default=900)
    a = ap.parse_args(argv)
    try:
        import deepspeed  # noqa: F401
    except ImportError as e:
        print(f"deepspeed is not importable ({e}); install it with pip install 'lmforge[deepspeed]'")
        return 1
    from lmforge.distributed.estimate import ModelShape, estimate
    from lmforge.models import build_model

    cfg = _cfg(a, 3)
    print(f"model d{a.d_model} L{a.n_layers} V{a.vocab}, T={a.seq}, B={a.micro_batch}/rank, {a.world} gloo ranks × "
          f"{a.threads} thread(s), AdamW, clip 1.0; {a.steps} timed steps after {a.warmup}")
    print(f"deepspeed {deepspeed.__version__} config: "
          f"{ds_config(a, 3, sum(p.numel() for p in build_model(cfg.model, device='meta').parameters()))}")
    hdr = f"{'run':<16}{'tok/s':>9}{'peak RSS MB':>13}{'RSS growth':>12}{'live MB':>10}{'last loss':>11}"
    for stage in (int(s) for s in a.stages.split(",")):
        best: dict = {}
        for _ in range(a.repeats):
            for engine in ("lmforge", "deepspeed"):
                rs = run(engine, stage, a)
                sm = summarize(rs, a)
                if engine not in best or sm["tok_s"] > best[engine][0]["tok_s"]:
                    best[engine] = (sm, rs)
        print(f"\n== ZeRO-{stage} ==\n{hdr}")
        for engine, (sm, _) in best.items():
            print(f"{engine + f' zero{stage}':<16}{sm['tok_s']:>9.0f}{sm['rss_mb']:>13.0f}{sm['rss_growth_mb']:>12.0f}"
                  f"{sm['live_mb']:>10.1f}{sm['loss']:>11.4f}")
        L, D = best["lmforge"][0], best["deepspeed"][0]
        print(f"lmforge/deepspeed: throughput {L['tok_s'] / D['tok_s']:.2f}x, peak RSS {L['rss_mb'] / D['rss_mb']:.2f}x,"
              f" RSS growth {L['rss_growth_mb'] / D['rss_growth_mb']:.2f}x, live tensors {L['live_mb'] / D['live_mb']:.2f}x")
        st = best["lmforge"][1][0]["state"]
        est = estimate(ModelShape.from_config(cfg.model), f"zero{stage}", a.world, micro_batch=a.micro_batch,
                       seq_len=a.seq, optimizer="adamw")
        for k in ("params", "grads", "optimizer"):
            print(f"  estimator {k:<9} {est[k] / 2 ** 20:8.2f} MB vs measured rank 0 {st[k] / 2 ** 20:8.2f} MB "
                  f"({(est[k] / st[k] - 1) * 100:+.1f}%)")
        tot_e, tot_m = sum(est[k] for k in st), sum(st.values())
        print(f"  estimator state total {tot_e / 2 ** 20:.2f} MB vs measured {tot_m / 2 ** 20:.2f} MB "
              f"({(tot_e / tot_m - 1) * 100:+.1f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
