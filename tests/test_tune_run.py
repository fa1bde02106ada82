"""lmforge tune end to end on a tiny pretraining job (trial processes, 2 workers, ASHA):

- an uninterrupted study and one whose ``lmforge tune`` is SIGKILLed mid-trial and rerun end with the same
  ledger: the same parameters, states and values per trial, every trial COMPLETE or PRUNED, none RUNNING,
  none duplicated; pruned trials stopped at an evaluation step with a checkpoint there; report + best.yaml;
- a trial with --nproc 2 (torchrun, 2 gloo ranks): both ranks train the parameters rank 0 sampled.
Every subprocess has a hard timeout.
"""

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


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from lmforge.config import save_config

    root = tmp_path_factory.mktemp("tune")
    data = pack_tiny(root / "data")
    cfg = tiny_cfg(root / "unused", data, training={"max_steps": 12, "eval_every": 4, "micro_batch_size": 2,
                                                    "grad_accum_steps": 1}, checkpoint={"every_steps": 2})
    save_config(cfg, root / "base.yaml")
    return root


def _study(root: Path, name: str, n: int = 4, extra: str = "") -> Path:
    path = root / f"{name}.yaml"
    path.write_text(f"""base: {root / 'base.yaml'}
dir: {root / name}
objective: {{metric: val_loss}}
sampler: {{name: tpe, n_startup_trials: 2}}
pruner: {{name: asha, min_resource: 4, reduction_factor: 2}}
n_trials: {n}
seed: 5
fault: {{grace_s: 5, heartbeat_s: 1}}
space:
  optimizer.lr: {{log: [1.0e-4, 3.0e-2]}}
  training.micro_batch_size: [1, 2]
{extra}""")
    return path


def _tune(study: Path, *flags: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmforge", "tune", "--config", str(study), *flags], env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def _ledger(folder: Path) -> list:
    from lmforge.tune.storage import open_storage

    storage = open_storage(f"journal://{folder / 'study.journal'}")
    study = optuna.load_study(study_name=folder.name, storage=storage)
    return sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)


def _summary(trials) -> list:
    return [(t.number, t.state.name, t.params, None if t.values is None else round(t.values[0], 6)) for t in trials]


def test_sigkill_and_rerun_gives_the_uninterrupted_study(base):
    ref = _tune(_study(base, "ref"), "--workers", "2")
    assert ref.returncode == 0, ref.stderr[-3000:]
    cut = _study(base, "cut")
    proc = subprocess.Popen([sys.executable, "-m", "lmforge", "tune", "--config", str(cut), "--workers", "2"],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if list((base / "cut" / "trials").glob("trial_*/checkpoints/step_0000006/COMPLETE")):
                break
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    mid = _ledger(base / "cut")
    assert any(t.state.name == "RUNNING" for t in mid)  # killed mid-trial
    again = _tune(cut, "--workers", "2")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from its checkpoint" in again.stdout
    a, b = _ledger(base / "ref"), _ledger(base / "cut")
    assert _summary(a) == _summary(b)
    assert len(b) == 4 and all(t.state.name in ("COMPLETE", "PRUNED") for t in b)
    for t in b:
        if t.state.name == "PRUNED":
            step = max(t.intermediate_values)
            assert (Path(t.user_attrs["run_dir"]) / "checkpoints" / f"step_{step:07d}" / "COMPLETE").is_file()
    rep = json.loads((base / "cut" / "report.json").read_text())
    assert rep["counts"]["settled"] == 4 and (base / "cut" / "best.yaml").is_file()
    assert (base / "cut" / "report.html").read_text().count("<img") >= 3
    from lmforge.config import load_config

    best = load_config(base / "cut" / "best.yaml")
    assert best.optimizer.lr == pytest.approx(rep["best"][0]["params"]["optimizer.lr"])


def test_distributed_trial_ranks_share_the_sampled_params(base):
    study = _study(base, "dist", n=1, extra="distributed: null\n")
    study.write_text(study.read_text().replace("distributed: null\n", "overrides: {distributed.strategy: ddp}\n"))
    out = _tune(study, "--nproc", "2", timeout=240)
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-2000:]
    ranks = sorted((base / "dist" / "trials" / "trial_0000" / "ranks").glob("rank_*.json"))
    got = [json.loads(p.read_text()) for p in ranks]
    assert [g["rank"] for g in got] == [0, 1] and all(g["world"] == 2 for g in got)
    assert got[0]["params"] == got[1]["params"]
    (t,) = _ledger(base / "dist")
    assert t.state.name == "COMPLETE" and t.params == got[0]["params"]


def test_two_coordinators_share_one_study(base):
    """Two ``lmforge tune`` processes on one journal (as two machines on a shared filesystem), one worker
    each and parallelism 2: the same trials as the one 2-worker study with that seed, none duplicated."""
    if not (base / "ref" / "study.journal").is_file():
        assert _tune(_study(base, "ref"), "--workers", "2").returncode == 0
    study = _study(base, "pair", extra="parallelism: 2\n")
    procs = [subprocess.Popen([sys.executable, "-m", "lmforge", "tune", "--config", str(study)], env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    try:
        outs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-2000:] for o in outs)
    from lmforge.tune.ordered import slot_attempts

    pair = _ledger(base / "pair")
    settled = [a[-1] for j, a in sorted(slot_attempts(pair).items()) if j < 4]
    extra = [t for t in pair if t not in settled]
    assert all(t.user_attrs.get("lmforge_surplus") for t in extra)  # a race for the last slot is never run
    ref = [(t.state.name, t.params, round(t.values[0], 6) if t.values else None) for t in _ledger(base / "ref")]
    assert [(t.state.name, t.params, round(t.values[0], 6) if t.values else None) for t in settled] == ref


def test_a_repeated_point_reuses_the_earlier_result_without_training(base):
    """Two candidate points, four trials, one worker: at least two trials repeat a settled one. They take
    its value and state, spend no steps and get no run folder."""
    study = _study(base, "dups", extra="")
    study.write_text(study.read_text().replace("sampler: {name: tpe, n_startup_trials: 2}",
                                               "sampler: {name: random}").replace(
        "pruner: {name: asha, min_resource: 4, reduction_factor: 2}", "pruner: {name: none}").replace(
        "  optimizer.lr: {log: [1.0e-4, 3.0e-2]}\n", ""))
    out = _tune(study, "--workers", "1")
    assert out.returncode == 0, out.stderr[-3000:]
    trials = _ledger(base / "dups")
    reused = [t for t in trials if "lmforge_duplicate_of" in t.user_attrs]
    assert len(trials) == 4 and len(reused) >= 2
    by_number = {t.number: t for t in trials}
    for t in reused:
        twin = by_number[t.user_attrs["lmforge_duplicate_of"]]
        assert twin.number < t.number and "lmforge_duplicate_of" not in twin.user_attrs
        assert (t.params, t.state, t.values) == (twin.params, twin.state, twin.values)
        assert not (base / "dups" / "trials" / f"trial_{t.number:04d}").exists()
    logs = "".join(p.read_text() for p in (base / "dups" / "logs").glob("*.log"))
    assert logs.count("is reused, no training") == len(reused)
    rep = json.loads((base / "dups" / "report.json").read_text())
    assert rep["counts"]["reused"] == len(reused)
    assert rep["steps_spent"] == 12 * (4 - len(reused))
    assert {r["number"]: r["steps"] for r in rep["trials"] if r["reused_from"] is not None} == \
        {t.number: 0 for t in reused}
