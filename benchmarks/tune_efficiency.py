"""lmforge tune targets on a small character-level LM over tinyshakespeare (issue 15):

1. efficiency: a full grid (16 points: lr × warmup × weight decay) is the reference; TPE + ASHA over the same
   space must reach within 1% of the grid's best val_loss using ≤ 1/3 of the grid's training steps, and the
   tuned config must beat lmforge's default values for those keys. Both best-so-far curves vs steps spent
   are written (PNG + JSON).
2. faults: a 2-worker study whose ``lmforge tune`` is SIGKILLed at 5 random moments (rerun after each) ends
   with a consistent ledger (every trial COMPLETE, PRUNED or FAIL-and-retried; none duplicated or RUNNING)
   and the same best result as the uninterrupted study with the same seed.
3. harness parity: the lm-eval adapter's loglikelihoods equal a direct computation with the model (1e-5), and
   a local multiple-choice task runs end to end on the tuned model.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/tune_efficiency.py --out /tmp/tune_bench [--skip-faults]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DATA = Path(os.environ.get("LMFORGE_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
SPACE = {"optimizer.lr": [1e-4, 3e-4, 1e-3, 3e-3], "scheduler.warmup_steps": [0, 30],
         "optimizer.weight_decay": [0.0, 0.1]}
TPE_ASHA = {"sampler": {"name": "tpe", "n_startup_trials": 4}, "n_trials": 12,
            "pruner": {"name": "asha", "min_resource": 20, "reduction_factor": 3}}
DEFAULT = {"optimizer.lr": 3e-4, "scheduler.warmup_steps": 100, "optimizer.weight_decay": 0.1}  # schema defaults


def prepare_data(out: Path) -> Path:
    import yaml

    from lmforge.data.config import load_prepare_config
    from lmforge.data.prepare import prepare

    data = out / "data"
    if (data / "manifest.json").is_file():
        return data
    cfg = {"sources": [{"path": str(DATA / "tinyshakespeare" / "input.txt"), "type": "text", "doc_mode": "paragraph"}],
           "dedup": {"exact": False, "near": False}, "tokenizer": {"vocab_size": 260, "min_frequency": 1000000000},
           "output": {"dir": str(data), "val_fraction": 0.1, "seed": 0}}
    (out / "prepare.yaml").write_text(yaml.safe_dump(cfg))
    prepare(load_prepare_config(out / "prepare.yaml"))
    return data


def base_config(out: Path, data: Path, steps: int) -> Path:
    from lmforge.config import load_config, save_config

    cfg = load_config(None, {"run_dir": str(out / "unused"),
                             "model": {"arch": "gpt2", "d_model": 64, "n_layers": 2, "n_heads": 4, "max_seq_len": 64},
                             "data": {"path": str(data), "seq_len": 64},
                             "training": {"max_steps": steps, "micro_batch_size": 16, "eval_every": 20,
                                          "eval_batches": 8, "precision": "fp32", "device": "cpu", "seed": 1},
                             "scheduler": {"name": "cosine"}, "checkpoint": {"every_steps": 20, "keep_last": 1},
                             "logging": {"log_every": 20, "tensorboard": False, "progress": False, "report": False}})
    save_config(cfg, out / "base.yaml")
    return out / "base.yaml"


def study_yaml(out: Path, name: str, base: Path, body: dict) -> Path:
    import yaml

    doc = {"base": str(base), "dir": str(out / name), "objective": {"metric": "val_loss"}, "space": SPACE, **body}
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def curve(study_dir: Path) -> list[tuple[int, float]]:
    """(steps spent so far, best val_loss so far) over the trials in the order they were sampled."""
    rep = json.loads((study_dir / "report.json").read_text())
    rows = sorted(rep["trials"], key=lambda r: r["number"])  # the sampling order (deterministic)
    out, spent, best = [], 0, float("inf")
    for r in rows:
        spent += r["steps"]
        if r["state"] == "COMPLETE":
            best = min(best, r["values"][0])
        out.append((spent, best))
    return out


def steps_to_reach(points: list, target: float):
    """Training steps spent when the best-so-far curve first reached ``target`` (None: never)."""
    return next((spent for spent, best in points if best <= target), None)


def run_default(out: Path, base: Path) -> float:
    from lmforge.config import load_config
    from lmforge.training.trainer import train

    cfg = load_config(base, {"run_dir": str(out / "default_run"), **_nest(DEFAULT)})
    return train(cfg)["val_loss"]


def _nest(flat: dict) -> dict:
    tree: dict = {}
    for k, v in flat.items():
        a, b = k.split(".")
        tree.setdefault(a, {})[b] = v
    return tree


def efficiency(out: Path, base: Path, steps: int, workers: int, seeds: list[int]) -> dict:
    """The grid once; TPE + ASHA once per seed (seed 0 is the headline, the others show the spread)."""
    from lmforge.tune.cli import tune

    t0 = time.time()
    grid = tune(str(study_yaml(out, "grid", base, {"sampler": {"name": "grid"}, "seed": 0})), workers=workers)
    g_best = grid["best"][0]["values"][0]
    res = {"grid_best": g_best, "grid_steps": grid["steps_spent"], "grid_s": time.time() - t0,
           "grid_trials": len(grid["trials"]), "grid_curve": curve(out / "grid"),
           "default_val_loss": run_default(out, base), "tpe_asha": []}
    for seed in seeds:
        name = "tpe_asha" if seed == seeds[0] else f"tpe_asha_seed{seed}"
        t0 = time.time()
        asha = tune(str(study_yaml(out, name, base, {**TPE_ASHA, "seed": seed})), workers=workers)
        a_best = asha["best"][0]["values"][0]
        res["tpe_asha"].append({
            "seed": seed, "best": a_best, "steps": asha["steps_spent"], "seconds": time.time() - t0,
            "counts": asha["counts"], "best_params": asha["best"][0]["params"], "curve": curve(out / name),
            "within_1pct": a_best <= g_best * 1.01, "steps_ratio": asha["steps_spent"] / res["grid_steps"],
            "steps_to_within_1pct": steps_to_reach(curve(out / name), g_best * 1.01),
            "tuned_beats_default": a_best < res["default_val_loss"], "run_dir": asha["best"][0]["run_dir"]})
    plot(res, out / "tune_efficiency_curves.png")
    return res


def replay(grid_dir: Path, tmp: Path, seeds: range, workers: int, steps: int, g_best: float,
           settings: dict = TPE_ASHA) -> dict:
    """TPE + ASHA studies replayed on the grid's recorded learning curves: training is deterministic (equal
    parameters give equal curves, as the grid's repeats show), so a trial's reports can be looked up instead
    of trained. lmforge's own ordered sampler, pruner, warm-up rule and duplicate reuse decide, so the result
    per seed is the real study's (checked against the seeds run for real), for many more seeds in seconds."""
    import dataclasses
    import threading

    import optuna

    from lmforge.config import Config
    from lmforge.tune.config import StudyConfig
    from lmforge.tune.plan import Plan
    from lmforge.tune.space import parse_space
    from lmforge.tune.storage import build_study, open_storage

    st = optuna.load_study(study_name=grid_dir.name, storage=open_storage(f"journal://{grid_dir / 'study.journal'}"))
    curves = {tuple(sorted(t.params.items())): t.intermediate_values for t in st.trials}
    grid_plan, target, budget = Plan.read(grid_dir), g_best * 1.01, len(curves) * steps / 3
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    shutil.rmtree(tmp, ignore_errors=True)  # journals of an earlier replay would be loaded, not replayed
    tmp.mkdir(parents=True)
    rows = []
    for seed in seeds:
        cfg = StudyConfig(base="unused", dir=str(tmp / f"replay{seed}"), seed=seed, space=SPACE,
                          objective={"metric": "val_loss"}, **settings)
        space, url = parse_space(cfg.space, Config), f"journal://{tmp / f'replay{seed}.journal'}"
        build_study(cfg, url, space, workers, cfg.n_trials, steps)
        plan = dataclasses.replace(grid_plan, study={**grid_plan.study, "pruner": cfg.pruner.model_dump()})
        lock, spent = threading.Lock(), {}

        def work():
            study = build_study(cfg, url, space, workers, cfg.n_trials, steps, create=False)
            study.sampler.poll_s = 0.005
            while True:
                with lock:
                    if len(study.trials) >= cfg.n_trials:
                        return
                    trial = study.ask()
                spent[trial.number] = _replay_trial(study, trial, plan, space, curves, workers, steps)

        threads = [threading.Thread(target=work) for _ in range(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        study = build_study(cfg, url, space, workers, cfg.n_trials, steps, create=False)
        points, total, best = [], 0, float("inf")
        for t in sorted(study.trials, key=lambda t: t.number):  # the benchmark's curve(): sampling order
            total += spent[t.number]
            best = min(best, t.value) if t.state.name == "COMPLETE" else best
            points.append((total, best))
        rows.append({"seed": seed, "best": best, "steps": total,
                     "steps_to_within_1pct": steps_to_reach(points, target)})
    met = [r for r in rows if r["best"] <= target and r["steps"] <= budget]
    reached = [r for r in rows if r["steps_to_within_1pct"] is not None and r["steps_to_within_1pct"] <= budget]
    found = [r for r in rows if r["best"] <= target]
    return {"seeds": len(rows), "met": len(met), "reached": len(reached), "found": len(found), "rows": rows}


def _replay_trial(study, trial, plan, space, curves: dict, workers: int, steps: int) -> int:
    """Play one asked trial: reuse its twin, or report its recorded curve until pruned → steps trained."""
    import optuna

    from lmforge.tune.ordered import duplicate_of, slot_of
    from lmforge.tune.runner import judge_from
    from lmforge.tune.trial import reuse

    params = space.suggest(trial)
    curve, start = curves[tuple(sorted(params.items()))], judge_from(plan, plan.job().load(params))
    trials = study._storage.get_all_trials(study._study_id, deepcopy=False)
    twin = duplicate_of(trials, slot_of(trials, trial.number), workers, trial.params)
    if twin is not None:
        reuse(study, trial, twin)
        return 0
    for step in sorted(curve):
        trial.report(curve[step], step)
        if step >= start and trial.should_prune():
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            return step
    study.tell(trial, curve[steps])
    return steps


def replays(out: Path, n: int, workers: int, steps: int, g_best: float) -> list[dict]:
    """Seeds 0..n-1 and held-out seeds 100.., with the warm-up rule (the default) and without it."""
    off = {**TPE_ASHA, "pruner": {**TPE_ASHA["pruner"], "after_warmup": False}}
    rows = []
    for first in (0, 100):
        for rule, study in (("after_warmup", TPE_ASHA), ("no warm-up rule", off)):
            seeds = range(first, first + n)
            with open(os.devnull, "w") as quiet, contextlib.redirect_stderr(quiet):  # one line per reused trial
                rp = replay(out / "grid", out / "replay" / rule.replace(" ", "_"), seeds, workers, steps, g_best,
                            study)
            rows.append({**rp, "range": f"{seeds.start}-{seeds.stop - 1}", "rule": rule})
            print(f"replay, seeds {rows[-1]['range']}, {rule}: {rp['reached']}/{rp['seeds']} reach within 1% of the "
                  f"grid's best within 1/3 of its steps (best-so-far curve); {rp['met']}/{rp['seeds']} also spend "
                  f"no more than that in all; {rp['found']}/{rp['seeds']} find a point within 1% at all")
    return rows


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    curves = [("grid (16 points)", res["grid_curve"])] + [(f"TPE + ASHA, seed {r['seed']}", r["curve"])
                                                         for r in res["tpe_asha"]]
    for label, points in curves:
        xs, ys = zip(*[(s, b) for s, b in points if b != float("inf")])
        ax.step(xs, ys, where="post", label=label)
    ax.axhline(res["default_val_loss"], ls="--", c="gray", label="lmforge defaults")
    ax.set_xlabel("training steps spent")
    ax.set_ylabel("best val_loss so far")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def faults(out: Path, base: Path, kills: int, seed: int) -> dict:
    body = {"sampler": {"name": "tpe", "n_startup_trials": 3}, "n_trials": 8, "seed": 3,
            "pruner": {"name": "asha", "min_resource": 20, "reduction_factor": 3},
            "fault": {"grace_s": 10, "heartbeat_s": 2}}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref_yaml = study_yaml(out, "faults_ref", base, body)
    subprocess.run([sys.executable, "-m", "lmforge", "tune", "--config", str(ref_yaml), "--workers", "2"], env=env,
                   check=True, capture_output=True, timeout=1800)
    cut_yaml = study_yaml(out, "faults_cut", base, body)
    rng, done_kills = random.Random(seed), 0
    cmd = [sys.executable, "-m", "lmforge", "tune", "--config", str(cut_yaml), "--workers", "2"]
    while done_kills < kills:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            proc.wait(rng.uniform(3.0, 12.0))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait(60)
            done_kills += 1
            continue
        break  # the study finished before this kill: nothing left to interrupt
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=1800)
    return {"kills": done_kills, **compare_ledgers(out / "faults_ref", out / "faults_cut")}


def compare_ledgers(ref: Path, cut: Path) -> dict:
    import optuna

    from lmforge.tune.ordered import slot_attempts
    from lmforge.tune.storage import open_storage

    def load(d):
        return optuna.load_study(study_name=d.name, storage=open_storage(f"journal://{d / 'study.journal'}")).trials

    a, b = load(ref), load(cut)
    states = {t.state.name for t in b}
    slots_b = slot_attempts(b)
    settled = {j: at[-1] for j, at in slots_b.items()}
    consistent = "RUNNING" not in states and "WAITING" not in states and all(
        all(x.state.name == "FAIL" for x in at[:-1]) for at in slots_b.values())
    same = [(t.params, t.state.name, None if t.values is None else round(t.values[0], 6)) for t in a] == \
        [(settled[j].params, settled[j].state.name, None if settled[j].values is None else round(settled[j].values[0], 6))
         for j in sorted(settled)]
    best = lambda ts: min((t.values[0] for t in ts if t.state.name == "COMPLETE"), default=None)  # noqa: E731
    return {"ledger_consistent": consistent, "slots": len(slots_b), "attempts": len(b),
            "states": sorted(t.state.name for t in settled.values()), "same_trials_as_uninterrupted": same,
            "best_ref": best(a), "best_cut": best(settled.values()), "best_matches": best(a) == best(settled.values())}


def harness(out: Path, run_dir: Path) -> dict:
    import torch

    from lmforge.evaluation.harness import LMForgeLM, run_harness
    from lmforge.inference import load_run

    model, tok, cfg, _ = load_run(run_dir)
    lm = LMForgeLM(model, tok, cfg.model.max_seq_len, batch_size=4)
    reqs = [("ROMEO:\nWhat say", " you"), ("First Citizen:\n", "Before we proceed"), ("", "KING HENRY")]

    class R:
        def __init__(self, args):
            self.args = args

    got = lm.loglikelihood([R(r) for r in reqs])
    diffs = []
    for (ctx, cont), (ll, _) in zip(reqs, got):
        c, x = lm.split(ctx, cont)
        ids = c + x
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids[:-1]])).float(), -1)[0].double()
        direct = logp[len(c) - 1:].gather(1, torch.tensor(x)[:, None]).sum().item()
        diffs.append(abs(ll - direct))
    rows = [{"q": "ROMEO:\nO, she doth teach the torches to burn", "c": [" bright!", " qzx!"], "a": 0},
            {"q": "JULIET:\nRomeo, Romeo, wherefore art thou", "c": [" Romeo?", " xqj?"], "a": 0},
            {"q": "To be, or not to", "c": [" be", " zq"], "a": 0},
            {"q": "My kingdom for a", "c": [" horse", " xkcd"], "a": 0}]
    (out / "mc.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (out / "mc.yaml").write_text(f"task: shakespeare_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                 f"    test: {out / 'mc.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
                                 "doc_to_text: \"{{q}}\"\ndoc_to_choice: \"{{c}}\"\ndoc_to_target: \"{{a}}\"\n"
                                 "metric_list:\n  - metric: acc\n")
    res = run_harness(model, tok, cfg.model.max_seq_len, [str(out / "mc.yaml")])
    return {"max_abs_diff": max(diffs), "parity_1e-5": max(diffs) < 1e-5, "mc": res["tasks"]["shakespeare_mc"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/tune_bench")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--kills", type=int, default=5)
    ap.add_argument("--seeds", default="0,1,2", help="TPE + ASHA seeds (the first is the headline)")
    ap.add_argument("--replay-seeds", type=int, default=40, help="TPE + ASHA seeds replayed on the grid's curves")
    ap.add_argument("--skip-faults", action="store_true")
    ap.add_argument("--only-faults", action="store_true")
    ap.add_argument("--only-replay", action="store_true", help="replay on OUT/grid from an earlier run")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = prepare_data(out)
    base = base_config(out, data, args.steps)
    res = {"cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
           "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M")}
    try:
        from lmforge.hardware import cpu_facts

        res["cpu"] = cpu_facts().get("model") or res["cpu"]
    except Exception:  # noqa: BLE001
        pass
    if args.only_replay:
        g_best = json.loads((out / "grid" / "report.json").read_text())["best"][0]["values"][0]
        res["replay"] = replays(out, args.replay_seeds, args.workers, args.steps, g_best)
        (out / "tune_replay.json").write_text(json.dumps(res, indent=2))
        return 0
    if not args.only_faults:
        res["efficiency"] = eff = efficiency(out, base, args.steps, args.workers,
                                             [int(s) for s in args.seeds.split(",")])
        print(json.dumps({k: v for k, v in eff.items() if k not in ("grid_curve", "tpe_asha")}, indent=2))
        print(json.dumps([{k: v for k, v in r.items() if k != "curve"} for r in eff["tpe_asha"]], indent=2))
        res["replay"] = replays(out, args.replay_seeds, args.workers, args.steps, eff["grid_best"])
        res["harness"] = harness(out, Path(eff["tpe_asha"][0]["run_dir"]))
        print(json.dumps(res["harness"], indent=2))
    if not args.skip_faults:
        res["faults"] = faults(out, base, args.kills, seed=0)
        print(json.dumps(res["faults"], indent=2))
    name = "tune_faults.json" if args.only_faults else "tune_efficiency.json"
    (out / name).write_text(json.dumps(res, indent=2))
    print(f"wrote {out / name}" + ("" if args.only_faults else f" and {out / 'tune_efficiency_curves.png'}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
