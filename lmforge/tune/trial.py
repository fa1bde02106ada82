"""One trial in its own process: ``python -m lmforge.tune.trial STUDY_DIR [--trial N]`` (``lmforge tune``
starts these; under torchrun for ``--nproc`` > 1).

Rank 0 asks the study for a trial (or reopens trial N to resume it), samples its parameters and broadcasts
them, so every rank trains the same trial. The run is an ordinary run folder, ``DIR/trials/trial_NNNN``,
trained by ``train`` / ``finetune`` with two hooks on the loop's Job: each evaluation is reported
(``trial.report``) and the pruner consulted (``should_prune``, rank 0, broadcast); a pruned trial stops
through ``Job.external_stop`` at that step boundary, with the loop's usual final checkpoint. Rank 0 records
the owner (host, pid) and a heartbeat, so a ``lmforge tune`` that finds the trial RUNNING with its process
gone can resume it (``checkpoint.resume=auto``) or retry it.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Optional

from lmforge.tune.plan import Plan

OWNER, HEARTBEAT, OUTCOME = "lmforge_owner", "lmforge_heartbeat", "lmforge_outcome"


def die_with_parent() -> None:
    """Linux: this process is SIGKILLed when its parent dies (a killed ``lmforge tune`` takes its trials)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def trial_dir(plan: Plan, number: int) -> Path:
    return plan.dir / "trials" / f"trial_{number:04d}"


class Heartbeat:
    """Rank 0: ``lmforge_heartbeat`` = wall time every ``interval`` s, through its own storage object."""

    def __init__(self, url: str, trial_id: int, interval: float):
        from lmforge.tune.storage import open_storage

        self.storage, self.trial_id, self.interval = open_storage(url), trial_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="lmforge-tune-heartbeat")

    def start(self) -> "Heartbeat":
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.storage.set_trial_system_attr(self.trial_id, HEARTBEAT, time.time())
            except Exception:  # noqa: BLE001  (a finished trial or a storage hiccup: the next beat retries)
                pass

    def stop(self) -> None:
        self._stop.set()


def _open(plan: Plan, number: Optional[int]):
    """Rank 0: (study, trial, slot, params, heartbeat), or None for a trial settled here: a surplus one
    (told FAIL, never run) or a repeat of a settled trial (``reuse``)."""
    import optuna

    from lmforge.tune.ordered import slot_of
    from lmforge.tune.storage import build_study

    beat: list = []

    def note(slot, prior):
        print(f"[tune] trial slot {slot}: waiting for slot {prior} to end (deterministic order)", file=sys.stderr)

    def owned(study, frozen) -> None:  # before the sampler may wait: the trial is visibly alive from the start
        if not beat:
            _own(study._storage, frozen._trial_id)
            beat.append(Heartbeat(plan.url, frozen._trial_id, plan.cfg.fault.heartbeat_s).start())

    study = build_study(plan.cfg, plan.url, plan.space(), plan.lag, plan.n_slots, plan.max_steps, create=False,
                        wait_note=note, on_trial=owned)
    if number is None:
        trial = study.ask()
    else:
        tid = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
        _own(study._storage, tid)
        trial = optuna.Trial(study, tid)
    owned(study, trial)
    storage = study._storage
    slot = slot_of(storage.get_all_trials(study._study_id, deepcopy=False), trial.number)
    if slot >= plan.n_slots:
        storage.set_trial_user_attr(trial._trial_id, "lmforge_surplus", True)
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        beat[0].stop()
        return None
    params = plan.space().suggest(trial)
    twin = _twin(plan, study, trial, slot, fresh=number is None)
    if twin is not None:
        reuse(study, trial, twin)
        beat[0].stop()
        return None
    return study, trial, slot, params, beat[0]


def _twin(plan: Plan, study, trial, slot: int, fresh: bool):
    """The settled trial this one repeats, else None: the twin a reopened trial was given (a kill between
    ``reuse``'s writes and its tell), or, for a fresh trial under ``duplicates: reuse``, the slot's view's."""
    from lmforge.tune.ordered import DUPLICATE_OF, duplicate_of

    storage = study._storage
    frozen = storage.get_trial(trial._trial_id)
    if DUPLICATE_OF in frozen.user_attrs:
        return storage.get_trial(storage.get_trial_id_from_study_id_trial_number(
            study._study_id, frozen.user_attrs[DUPLICATE_OF]))
    if not fresh or plan.cfg.duplicates != "reuse":
        return None
    lag = plan.lag if plan.cfg.deterministic else 1
    return duplicate_of(storage.get_all_trials(study._study_id, deepcopy=False), slot, lag, frozen.params)


def reuse(study, trial, twin) -> None:
    """Settle ``trial`` with ``twin``'s result without training: the same parameters train the same run.
    Its curve is reported again (pruners see it as they saw the twin's) and it spends no steps."""
    import optuna

    from lmforge.tune.ordered import DUPLICATE_OF

    storage = study._storage
    storage.set_trial_user_attr(trial._trial_id, DUPLICATE_OF, twin.number)
    if "run_dir" in twin.user_attrs:
        storage.set_trial_user_attr(trial._trial_id, "run_dir", twin.user_attrs["run_dir"])
    storage.set_trial_system_attr(trial._trial_id, OUTCOME, "reused")
    done = storage.get_trial(trial._trial_id).intermediate_values
    for step, value in sorted(twin.intermediate_values.items()):
        if step not in done:
            trial.report(value, step)
    if twin.state == optuna.trial.TrialState.COMPLETE:
        study.tell(trial, twin.values if len(twin.values) > 1 else twin.values[0])
    else:
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    print(f"[tune] trial {trial.number}: the parameters of trial {twin.number}; its result "
          f"({twin.state.name.lower()}) is reused, no training", file=sys.stderr)


def _own(storage, trial_id: int) -> None:
    owner = {"host": socket.gethostname(), "pid": os.getpid(), "parent": os.getppid(), "time": time.time()}
    storage.set_trial_system_attr(trial_id, OWNER, owner)
    storage.set_trial_system_attr(trial_id, HEARTBEAT, time.time())


def _broadcast(obj, distributed: bool):
    if not distributed:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class PruneHook:
    """``on_job``: report each evaluation's objective (rank 0) and stop the run once the pruner says so.
    The pruner is asked from step ``judge_from`` on (the trial's warm-up end, ``pruner.after_warmup``)."""

    def __init__(self, trial, metric: str, distributed: bool, rank0: bool, judge_from: int = 0):
        self.trial, self.metric, self.distributed, self.rank0 = trial, metric, distributed, rank0
        self.judge_from, self.reason = judge_from, None

    def __call__(self, job) -> None:
        inner = job.on_eval

        def on_eval(step: int, metrics: dict) -> None:
            if inner is not None:
                inner(step, metrics)
            self.evaluated(step, metrics)

        job.on_eval = on_eval
        job.external_stop = lambda: self.reason

    def evaluated(self, step: int, metrics: dict) -> None:
        prune = False
        if self.rank0 and self.trial is not None and self.metric in metrics:
            self.trial.report(float(metrics[self.metric]), step)
            prune = step >= self.judge_from and self.trial.should_prune()
        if self.metric in metrics and _broadcast(prune, self.distributed):
            self.reason = "pruned"


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lmforge.tune.trial")
    ap.add_argument("study_dir")
    ap.add_argument("--trial", type=int, default=None, help="resume this trial number")
    ap.add_argument("--token", default=None, help="write the trial's number to DIR/workers/TOKEN.json")
    args = ap.parse_args(argv)
    die_with_parent()
    plan = Plan.read(args.study_dir)
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    distributed = world > 1
    if distributed:
        _init_group()
    from lmforge.tune.runner import run_trial

    opened = _open(plan, args.trial) if rank == 0 else None
    head = _broadcast(None if opened is None else (opened[1].number, opened[2], opened[3]), distributed)
    if head is None:
        return _done(distributed, 0)
    number, slot, params = head
    if rank == 0 and args.token:
        _note_token(plan, args.token, number)
    ranks = trial_dir(plan, number) / "ranks"
    ranks.mkdir(parents=True, exist_ok=True)  # what each rank trains: the same broadcast parameters
    (ranks / f"rank_{rank}.json").write_text(json.dumps({"rank": rank, "world": world, "params": params}))
    study, trial, beat = (opened[0], opened[1], opened[4]) if opened else (None, None, None)
    try:
        outcome = run_trial(plan, trial_dir(plan, number), params, trial, distributed, rank == 0)
        if outcome["state"] == "interrupted":
            print(f"[tune] trial {number}: {outcome['reason']}; left RUNNING (rerun lmforge tune to resume it)",
                  file=sys.stderr)
            return _done(distributed, 130)
        if rank == 0:
            _tell(study, trial, plan, outcome, slot)
    finally:
        if beat is not None:
            beat.stop()
    return _done(distributed, 0)


def _note_token(plan: Plan, token: str, number: int) -> None:
    folder = plan.dir / "workers"
    folder.mkdir(exist_ok=True)
    tmp = folder / f"{token}.tmp"
    tmp.write_text(json.dumps({"trial": number, "pid": os.getpid()}))
    tmp.replace(folder / f"{token}.json")


def _tell(study, trial, plan: Plan, outcome: dict, slot: int) -> None:
    from optuna.trial import TrialState

    storage = study._storage
    storage.set_trial_user_attr(trial._trial_id, "run_dir", outcome["run_dir"])
    for k, v in outcome.get("user_attrs", {}).items():
        storage.set_trial_user_attr(trial._trial_id, k, v)
    storage.set_trial_system_attr(trial._trial_id, OUTCOME, outcome["state"])
    state = outcome["state"]
    if state == "complete":
        study.tell(trial, outcome["values"] if len(outcome["values"]) > 1 else outcome["values"][0])
    elif state == "pruned":
        study.tell(trial, state=TrialState.PRUNED)
    else:
        storage.set_trial_user_attr(trial._trial_id, "fail_reason", outcome.get("reason", "failed"))
        study.tell(trial, state=TrialState.FAIL)
    Path(outcome["run_dir"]).mkdir(parents=True, exist_ok=True)
    (Path(outcome["run_dir"]) / "trial.json").write_text(json.dumps(
        {"number": trial.number, "slot": slot, "params": trial.params, **outcome}, indent=2, default=str))


def _init_group() -> None:
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if use_cuda else "gloo")


def _done(distributed: bool, rc: int) -> int:
    if distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
    return rc


if __name__ == "__main__":
    sys.exit(main())
