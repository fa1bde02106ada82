"""lmforge tune, without training: study.yaml / space validation errors (before anything is written), the
deterministic slot sampler (the same seed gives the same trials whatever the timing), folds, the loop hook."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")

from lmforge.errors import ConfigError
from lmforge.training.loop import Limits, TrainState, stop_reason


def test_stop_reason_external():
    st, lim = TrainState(), Limits(max_steps=10, stop_at_step=5)
    st.step = 3
    assert stop_reason(st, lim, None, False, None) is None
    assert stop_reason(st, lim, None, False, None, "pruned") == "pruned"
    st.step = 5  # an external stop wins over the per-invocation stop_at_step
    assert stop_reason(st, lim, None, False, None, "pruned") == "pruned"
    st.step = 10  # a finished run is finished
    assert stop_reason(st, lim, None, False, None, "pruned") == "max_steps"
    assert stop_reason(st, lim, None, True, None, "pruned") == "early_stop"


@pytest.fixture()
def base(tmp_path):
    from lmforge.config import build_config, save_config

    cfg = build_config({"model": {"preset": "tiny", "vocab_size": 64, "max_seq_len": 16},
                        "data": {"path": str(tmp_path / "data")}})
    save_config(cfg, tmp_path / "base.yaml")
    return tmp_path / "base.yaml"


def _study(tmp_path, base, body: str) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(f"base: {base}\ndir: {tmp_path / 'study'}\nobjective: {{metric: val_loss}}\n" + body)
    return path


@pytest.mark.parametrize("body, message", [
    ("space:\n  optimizer.lrr: {log: [1.0e-4, 1.0e-2]}\n", "did you mean 'optimizer.lr'"),
    ("space:\n  optimizer.lr: {log: [1.0e-2, 1.0e-4]}\n", "low 0.01 must be < high 0.0001"),
    ("space:\n  optimizer.lr: {flot: [1.0e-4, 1.0e-2]}\n", "did you mean 'float'"),
    ("space:\n  training.micro_batch_size: {int: [0, 4]}\n", "value 0 is not valid for the base job"),
    ("space:\n  optimizer.lr: [0.1]\n", "objective metric 'val_acc' is never reported"),
    ("space:\n  method.lora_r: {int: [2, 8], when: {method.name: lora}}\n", "unknown key 'space.method.lora_r'"),
    ("space:\n  optimizer.lr: [0.1]\nstorage: postgresql://nobody@127.0.0.1:1/none\n", "cannot connect"),
    ("space:\n  optimizer.lr: [0.1]\nstorage: sqlite:///x.db\n", "SQLite cannot hold a study with --workers 2"),
    ("space:\n  optimizer.lr: [0.1]\nstorage: /no/such/folder/s.journal\n", "folder /no/such/folder does not exist"),
    ("space:\n  optimizer.lr: [0.1]\npruner: {name: asha}\noverrides: {training.max_steps: 80}\n",
     "study.yaml:6:9: pruner.after_warmup: the base job warms up for 100 of its 80 steps"),
])
def test_bad_study_refused_before_anything_is_written(tmp_path, base, body, message):
    from lmforge.tune.cli import tune

    path = _study(tmp_path, base, body)
    if "val_acc" in message:
        path.write_text(path.read_text().replace("metric: val_loss", "metric: val_acc"))
    with pytest.raises(ConfigError) as e:
        tune(str(path), workers=2)
    assert message in str(e.value), str(e.value)
    assert not (tmp_path / "study").exists()
    if "lrr" in body or "flot" in body:
        assert f"{path}:5:" in str(e.value)  # located at the key's line


def test_unparsable_harness_task(tmp_path):
    from lmforge.evaluation.harness import task_names

    bad = tmp_path / "task.yaml"
    bad.write_text("task: x\ndoc_to_text: [unclosed\n")
    with pytest.raises(ConfigError, match=r"task.yaml:\d+:\d+: harness task file is not valid YAML"):
        task_names([str(bad)])


def _run_slots(sampler_name: str, seed: int, n: int, lag: int, jitter: bool, tmp_path: Path,
               pruner: str = "none") -> list:
    """Trials from ``lag`` threads sharing one journal study (random finishing order when ``jitter``)."""
    from lmforge.tune.config import StudyConfig
    from lmforge.tune.space import parse_space
    from lmforge.tune.storage import build_study
    from lmforge.config import Config

    cfg = StudyConfig(base="x", dir=str(tmp_path), seed=seed, sampler={"name": sampler_name, "n_startup_trials": 3,
                      "population_size": 4}, objective={"metric": "val_loss"},
                      pruner={"name": pruner, "n_startup_trials": 2, "min_resource": 2, "max_resource": 10},
                      space={"optimizer.lr": [1e-4, 1e-3, 1e-2, 1e-1] if sampler_name == "grid" else
                             {"log": [1e-4, 1e-1]}, "optimizer.weight_decay": {"float": [0, 0.3],
                             "step": 0.1}, "scheduler.name": ["cosine", "linear"]})
    space = parse_space(cfg.space, Config)
    tmp_path.mkdir(parents=True, exist_ok=True)
    url = f"journal://{tmp_path}/j.log"
    build_study(cfg, url, space, lag, n, None)
    rng = random.Random(seed)
    delays = [rng.random() * 0.05 if jitter else 0.0 for _ in range(n)]
    lock = threading.Lock()

    def work():
        study = build_study(cfg, url, space, lag, n, None, create=False)
        study.sampler.poll_s = 0.01
        while True:
            with lock:
                if len(study.trials) >= n:
                    return
                trial = study.ask()
            p = space.suggest(trial)
            value = (p["optimizer.lr"] - 0.01) ** 2 + p["optimizer.weight_decay"]
            for step in range(1, 11):  # a learning curve, checked by the pruner at every step
                time.sleep(delays[trial.number] / 10)
                trial.report(value * (1 + 1 / step), step)
                if trial.should_prune():
                    study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                    break
            else:
                study.tell(trial, value)

    threads = [threading.Thread(target=work) for _ in range(lag)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    study = build_study(cfg, url, space, lag, n, None, create=False)
    return [(t.params, t.state.name, t.last_step) for t in sorted(study.trials, key=lambda t: t.number)]


@pytest.mark.parametrize("sampler", ["tpe", "random", "grid", "cmaes", "nsga2", "gp"])
def test_same_seed_same_trials_whatever_the_timing(tmp_path, sampler):
    n = 8 if sampler == "gp" else 10
    a = _run_slots(sampler, 3, n, 2, True, tmp_path / "a")
    b = _run_slots(sampler, 3, n, 2, False, tmp_path / "b")
    assert a == b
    c = _run_slots(sampler, 4, n, 2, False, tmp_path / "c")
    assert c != a  # the seed matters


def test_parallel_grid_visits_every_point_once(tmp_path):
    """2 workers over a 32-point grid: 32 distinct points (every slot's grid sampler shuffles the grid
    with the study's seed; a per-slot seed gave each slot its own order and repeated points)."""
    got = _run_slots("grid", 3, 32, 2, True, tmp_path)
    points = [tuple(sorted(p.items())) for p, _, _ in got]
    assert len(points) == 32 and len(set(points)) == 32


@pytest.mark.parametrize("pruner", ["median", "asha", "hyperband"])
def test_pruning_decisions_do_not_depend_on_timing(tmp_path, pruner):
    a = _run_slots("tpe", 3, 10, 2, True, tmp_path / "a", pruner)
    b = _run_slots("tpe", 3, 10, 2, False, tmp_path / "b", pruner)
    assert a == b
    assert any(state == "PRUNED" for _, state, _ in a)  # the pruner did prune


def test_folds_deterministic_stratified_and_disjoint():
    from lmforge.tune.cv import fold_indices

    labels = [0] * 30 + [1] * 10
    parts = fold_indices(labels, 40, 5, True, seed=1)
    assert parts == fold_indices(labels, 40, 5, True, seed=1)
    assert sorted(i for p in parts for i in p) == list(range(40))
    assert all(sum(labels[i] for i in p) == 2 for p in parts)  # every fold keeps the 1:3 proportion
    assert parts != fold_indices(labels, 40, 5, True, seed=2)


def test_conditional_space_over_finetune_keys():
    from lmforge.finetune.config import FinetuneConfig
    from lmforge.tune.space import parse_space

    space = parse_space({"method.name": ["full", "lora"], "method.lora_r": {"int": [4, 32], "log": True,
                         "when": {"method.name": "lora"}}, "optimizer.lr": {"log": [1e-5, 1e-3]}}, FinetuneConfig)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(12):
        t = study.ask()
        p = space.suggest(t)
        assert ("method.lora_r" in p) == (p["method.name"] == "lora")  # only sampled when the method is lora
        seen.add(p["method.name"])
        study.tell(t, 0.0)
    assert seen == {"full", "lora"}
    with pytest.raises(ConfigError, match="not a parameter listed before it"):
        parse_space({"method.lora_r": {"int": [4, 8], "when": {"method.name": "lora"}}}, FinetuneConfig)


def test_duplicate_of_sees_only_the_settled_slots_of_the_view():
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import TrialState, create_trial

    from lmforge.tune.ordered import duplicate_of

    dist = {"x": CategoricalDistribution([1, 2, 3])}

    def t(number, x, state, value=None):
        fz = create_trial(params={"x": x}, distributions=dist, state=state, value=value,
                          intermediate_values={4: 1.0} if state == TrialState.PRUNED else None)
        fz.number = fz._trial_id = number
        return fz

    trials = [t(0, 1, TrialState.COMPLETE, 0.5), t(1, 2, TrialState.PRUNED), t(2, 3, TrialState.FAIL),
              t(3, 3, TrialState.COMPLETE, 0.2)]
    assert duplicate_of(trials, 5, 2, {"x": 1}).number == 0
    assert duplicate_of(trials, 5, 2, {"x": 2}).number == 1  # a pruned twin is reused (as pruned)
    assert duplicate_of(trials, 4, 2, {"x": 3}) is None  # slot 3 is still running for slot 4 (lag 2)
    assert duplicate_of(trials, 5, 2, {"x": 3}).number == 3  # the failed slot 2 is no twin
    assert duplicate_of(trials, 5, 2, {"x": 9}) is None


def test_a_trial_is_not_judged_inside_its_own_warmup():
    """ASHA at step 20 compares a trial still warming up (to step 30) with one that never warmed up, and
    prunes the one that is better from step 40 on (the tune benchmark's best point). With the warm-up rule
    its first judgement is at step 40, where it is the better one, and it survives every rung."""
    from types import SimpleNamespace

    from lmforge.config import SchedulerConfig
    from lmforge.training.schedule import warmup_end
    from lmforge.tune.config import PrunerConfig
    from lmforge.tune.runner import judge_from
    from lmforge.tune.trial import PruneHook

    assert warmup_end(SchedulerConfig(name="cosine", warmup_steps=30)) == 30
    assert warmup_end(SchedulerConfig(name="WarmupCosineLR", warmup_steps=12)) == 12
    assert warmup_end(SchedulerConfig(name="WarmupLR", warmup_steps=30, params={"warmup_num_steps": 7})) == 7
    assert warmup_end(SchedulerConfig(name="OneCycle", warmup_steps=30)) == 0  # no warm-up phase
    job = SimpleNamespace(scheduler=SchedulerConfig(warmup_steps=30))
    assert judge_from(SimpleNamespace(cfg=SimpleNamespace(pruner=PrunerConfig())), job) == 30
    assert judge_from(SimpleNamespace(cfg=SimpleNamespace(pruner=PrunerConfig(after_warmup=False))), job) == 0

    def second_trial_pruned_at(start: int):
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(pruner=optuna.pruners.SuccessiveHalvingPruner(min_resource=20))
        for curve, frm in (((3.38, 3.04, 2.83, 2.69), 0), ((3.88, 3.01, 2.69, 2.59), start)):
            hook = PruneHook(study.ask(), "val_loss", distributed=False, rank0=True, judge_from=frm)
            for step, value in zip((20, 40, 60, 80), curve):
                hook.evaluated(step, {"val_loss": value, "other": 1.0})
                if hook.reason == "pruned":
                    return step
            study.tell(hook.trial, curve[-1])
        return None

    assert second_trial_pruned_at(0) == 20
    assert second_trial_pruned_at(30) is None
