"""lmforge tune's other modes, end to end with hard timeouts: throughput autotuning (estimator-pruned
candidates never run; the fastest config keeps the global batch), cross-validated fine-tuning (deterministic
folds from the train file only, mean ± std), the retry policy after a trial process is SIGKILLed, and a
multi-objective NSGA-II study."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")
from tests.helpers.runs import pack_tiny, tiny_cfg

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "LMFORGE_PEAK_FLOPS": "1e11"}


def _tune(study: Path, *flags: str, timeout: float = 240) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "lmforge", "tune", "--config", str(study), *flags], env=ENV,
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-2000:]
    return out


def _ledger(folder: Path) -> list:
    from lmforge.tune.storage import open_storage

    study = optuna.load_study(study_name=folder.name, storage=open_storage(f"journal://{folder / 'study.journal'}"))
    return sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)


@pytest.fixture(scope="module")
def lm_base(tmp_path_factory):
    from lmforge.config import save_config

    root = tmp_path_factory.mktemp("modes")
    cfg = tiny_cfg(root / "unused", pack_tiny(root / "data"), training={"max_steps": 8, "eval_every": 4,
                   "micro_batch_size": 1, "grad_accum_steps": 2}, checkpoint={"every_steps": 4})
    save_config(cfg, root / "base.yaml")
    return root


def test_throughput_autotuning(lm_base):
    from lmforge.config import load_config
    from lmforge.tune.plan import Plan
    from lmforge.tune.throughput import candidate, estimate_bytes

    probe = Plan(study={}, kind="train", url="", lag=1, n_slots=1, max_steps=8, metrics=["tokens_per_s"],
                 global_batch=2)
    assert candidate(probe, {"training.micro_batch_size": 1})["training.grad_accum_steps"] == 2
    sizes = {mbs: estimate_bytes(probe, load_config(lm_base / "base.yaml", {"training": {"micro_batch_size": mbs}}))
             for mbs in (1, 2)}
    budget = (sizes[1] + sizes[2]) / 2 / 2 ** 30  # micro-batch 2 without checkpointing does not fit
    study = lm_base / "tp.yaml"
    study.write_text(f"base: {lm_base / 'base.yaml'}\ndir: {lm_base / 'tp'}\n"
                     f"throughput: {{steps: 6, warmup_steps: 2, budget_gb: {budget}}}\n")
    _tune(study, "--objective", "throughput")
    trials = _ledger(lm_base / "tp")
    assert len(trials) == 4  # micro-batch {1, 2} × activation checkpointing {off, on}
    pruned = [t for t in trials if t.state.name == "PRUNED"]
    assert pruned and all(t.user_attrs.get("pruned_by") == "estimate" for t in pruned)
    assert all(not (Path(t.user_attrs["run_dir"]) / "metrics.jsonl").exists() for t in pruned)  # never ran
    best = load_config(lm_base / "tp" / "best_throughput.yaml")
    assert best.training.micro_batch_size * best.training.grad_accum_steps == 2  # the global batch is kept
    done = [t for t in trials if t.state.name == "COMPLETE"]
    fastest = max(done, key=lambda t: t.value)
    assert best.training.micro_batch_size == fastest.params["training.micro_batch_size"]


def test_cross_validated_finetune_study(tiny_run, cls_files, tmp_path):
    from lmforge.finetune.config import FinetuneConfig, save_finetune_config

    base = FinetuneConfig.model_validate({
        "base": {"path": str(tiny_run), "pooling": "mean"}, "run_dir": str(tmp_path / "unused"),
        "data": {"train": str(cls_files / "train.tsv"), "validation": str(cls_files / "dev.tsv"), "max_len": 24,
                 "max_train_examples": 60},
        "train": {"max_steps": 4, "batch_size": 8, "eval_every": 2, "precision": "fp32", "threads": 1},
        "method": {"name": "lora", "lora_r": 4}, "optimizer": {"lr": 1e-2}})
    save_finetune_config(base, tmp_path / "ft.yaml")
    study = tmp_path / "cv.yaml"
    study.write_text(f"base: {tmp_path / 'ft.yaml'}\ndir: {tmp_path / 'cv'}\nobjective: {{metric: val_accuracy}}\n"
                     "sampler: {name: random}\nn_trials: 2\ncv: {folds: 2, stratified: true}\n"
                     "space:\n  optimizer.lr: {log: [1.0e-3, 3.0e-2]}\n")
    _tune(study, "--workers", "2")
    trials = _ledger(tmp_path / "cv")
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    for t in trials:
        vals = t.user_attrs["cv_values"]
        assert len(vals) == 2 and t.value == pytest.approx(sum(vals) / 2) and "cv_std" in t.user_attrs
        for i in range(2):
            fold = Path(t.user_attrs["run_dir"]) / f"fold_{i}"
            assert (fold / "summary.json").is_file() and "folds/fold_" in (fold / "finetune.yaml").read_text()
    meta = json.loads((tmp_path / "cv" / "folds" / "folds.json").read_text())
    assert meta["source"] == str(cls_files / "train.tsv") and meta["stratified"]  # dev.tsv is never a fold


def test_retry_policy_after_a_trial_process_is_killed(lm_base):
    study = lm_base / "retry.yaml"
    study.write_text(f"base: {lm_base / 'base.yaml'}\ndir: {lm_base / 'retry'}\nobjective: {{metric: val_loss}}\n"
                     "sampler: {name: random}\nn_trials: 2\nseed: 1\nfault: {on_interrupt: retry, max_retries: 1}\n"
                     "space:\n  optimizer.lr: {log: [1.0e-4, 3.0e-2]}\n")
    proc = subprocess.Popen([sys.executable, "-m", "lmforge", "tune", "--config", str(study)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline, killed = time.monotonic() + 120, False
    try:
        while not killed and time.monotonic() < deadline:
            for tok in (lm_base / "retry" / "workers").glob("*.json") if (lm_base / "retry").exists() else []:
                info = json.loads(tok.read_text())
                if (lm_base / "retry" / "trials" / f"trial_{info['trial']:04d}" / "metrics.jsonl").is_file():
                    os.kill(info["pid"], signal.SIGKILL)  # the worker, not lmforge tune
                    killed = True
                    break
            time.sleep(0.05)
        out, _ = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert killed and proc.returncode == 0, out[-3000:]
    trials = _ledger(lm_base / "retry")
    failed = [t for t in trials if t.state.name == "FAIL"]
    assert len(failed) == 1 and len(trials) == 3  # the killed attempt, its retry, the other trial
    retry = [t for t in trials if t.user_attrs.get("lmforge_retry_of") == failed[0].number]
    assert len(retry) == 1 and retry[0].state.name == "COMPLETE" and retry[0].params == failed[0].params
    rep = json.loads((lm_base / "retry" / "report.json").read_text())
    assert rep["counts"]["complete"] == 2 and rep["counts"]["failed"] == 0 and rep["counts"]["retried"] == 1


def test_multi_objective_nsga2(lm_base):
    study = lm_base / "mo.yaml"
    study.write_text(f"base: {lm_base / 'base.yaml'}\ndir: {lm_base / 'mo'}\n"
                     "objectives: [{metric: val_loss}, {metric: tokens_per_s}]\nsampler: {name: nsga2}\nn_trials: 3\n"
                     "space:\n  optimizer.lr: {log: [1.0e-4, 3.0e-2]}\n  training.micro_batch_size: [1, 2]\n")
    _tune(study, "--workers", "2")
    trials = _ledger(lm_base / "mo")
    assert all(t.state.name == "COMPLETE" and len(t.values) == 2 for t in trials)
    rep = json.loads((lm_base / "mo" / "report.json").read_text())
    assert rep["directions"] == ["minimize", "maximize"] and rep["best"]
    assert (lm_base / "mo" / "plots" / "pareto_front.png").is_file()
