"""Deterministic sampling and pruning over a shared, asynchronous study.

A *slot* is a trial's place in the study's sequence: the k-th trial created that is not a retry (a retry
takes the slot of the trial it repeats). With ``deterministic: true`` and lag P (``parallelism``):

- slot k is sampled by a fresh sampler seeded with (seed, k) that sees exactly slots 0..k-P, as they
  finally ended, and slots k-P+1..k-1 as RUNNING with nothing else shown; the trial waits (polling the
  storage) until slots 0..k-P have ended. With P workers that is at most the wait for the oldest running
  trial, and it makes the parameters a pure function of the seed and the earlier results: whatever the
  timing, kills and resumptions, the same seed gives the same trials.
- pruning decisions of slot k (each ``should_prune``) see the same slots 0..k-P and the trial itself, so
  they do not depend on how far concurrent trials have got either.

The views are ordinary ``optuna.Study`` objects over a ``ViewStorage`` that answers trial queries from the
chosen list, keeps study system attributes to itself and sends everything else to the real storage, so every
sampler and pruner (Hyperband's bracket studies included) works on them unchanged.
"""

from __future__ import annotations

import copy
import time
import zlib
from typing import Callable, Optional

import optuna
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

RETRY_OF = "lmforge_retry_of"  # user attr of a retry: the trial number it repeats
SLOT = "lmforge_slot"  # user attr of a retry (its slot); fresh trials' slots are computed from the numbers


def slot_of(trials: list[FrozenTrial], number: int) -> int:
    """Slot of trial ``number``: a retry's recorded slot, else the count of fresh trials before it."""
    by_number = {t.number: t for t in trials}
    t = by_number.get(number)
    if t is not None and SLOT in t.user_attrs:
        return int(t.user_attrs[SLOT])
    return sum(1 for u in trials if u.number < number and RETRY_OF not in u.user_attrs)


def slot_attempts(trials: list[FrozenTrial]) -> dict[int, list[FrozenTrial]]:
    """slot → its trials (attempts) in number order."""
    out: dict[int, list[FrozenTrial]] = {}
    fresh = 0
    for t in sorted(trials, key=lambda u: u.number):
        if RETRY_OF in t.user_attrs:
            out.setdefault(int(t.user_attrs[SLOT]), []).append(t)
        else:
            out.setdefault(fresh, []).append(t)
            fresh += 1
    return out


def final_attempt(attempts: list[FrozenTrial]) -> Optional[FrozenTrial]:
    """The attempt that settles the slot (the newest one, once finished), or None while it is open."""
    last = attempts[-1]
    return last if last.state.is_finished() else None


def _as(t: FrozenTrial, number: int, hide: bool) -> FrozenTrial:
    u = copy.copy(t)
    u.number = number
    if hide:
        u.state, u.values, u.intermediate_values = TrialState.RUNNING, None, {}
        u.params, u.distributions, u.system_attrs, u.datetime_complete = {}, {}, {}, None
    return u


def view_trials(trials: list[FrozenTrial], slot: int, lag: int, current: Optional[FrozenTrial] = None):
    """Slots < ``slot``: those ≤ slot-lag as they ended, the rest as bare RUNNING; then ``current``."""
    out = []
    for j, attempts in sorted(slot_attempts(trials).items()):
        if j >= slot:
            continue
        done = final_attempt(attempts)
        if j <= slot - lag and done is not None:
            out.append(_as(done, j, hide=False))
        else:
            out.append(_as(attempts[-1], j, hide=True))
    if current is not None:
        out.append(_as(current, slot, hide=False))
    return out


DUPLICATE_OF = "lmforge_duplicate_of"  # user attr of a trial answered from an earlier one's result


def duplicate_of(trials: list[FrozenTrial], slot: int, lag: int, params: dict) -> Optional[FrozenTrial]:
    """The earliest settled trial (COMPLETE or PRUNED) with exactly ``params`` among the slots that
    ``slot`` sees as ended (0..slot-lag), or None. Its result is the one a rerun would give: the trial's
    training seed is part of its config, so equal parameters train the same run."""
    for j, attempts in sorted(slot_attempts(trials).items()):
        if j > slot - lag:
            break
        done = final_attempt(attempts)
        if done is not None and done.state in (TrialState.COMPLETE, TrialState.PRUNED) and done.params == params:
            return done
    return None


class ViewStorage:
    """Trial reads from a fixed list; study system attributes private to the view (samplers cache derived
    state there, e.g. NSGA-II's populations: a cache written from another slot's view would leak timing);
    every other call (trial writes, study directions, user attributes) goes to the real storage."""

    def __init__(self, real, trials: list[FrozenTrial]):
        self._real, self._trials, self._study_attrs = real, trials, {}
        self._by_id = {t._trial_id: t for t in trials}

    def get_study_system_attrs(self, study_id) -> dict:
        return dict(self._study_attrs)

    def set_study_system_attr(self, study_id, key, value) -> None:
        self._study_attrs[key] = value

    def __getattr__(self, name):
        return getattr(self._real, name)

    def get_all_trials(self, study_id, deepcopy=True, states=None):
        out = [t for t in self._trials if states is None or t.state in states]
        return copy.deepcopy(out) if deepcopy else out

    def get_n_trials(self, study_id, state=None):
        states = None if state is None else (state if isinstance(state, (tuple, list)) else (state,))
        return len(self.get_all_trials(study_id, False, states))

    def get_trial(self, trial_id):
        return self._by_id[trial_id] if trial_id in self._by_id else self._real.get_trial(trial_id)

    def get_best_trial(self, study_id):
        done = [t for t in self._trials if t.state == TrialState.COMPLETE]
        if not done:
            raise ValueError("No trials are completed yet.")
        maximize = self._real.get_study_directions(study_id)[0] == optuna.study.StudyDirection.MAXIMIZE
        return (max if maximize else min)(done, key=lambda t: t.value)


def view_study(study, trials: list[FrozenTrial], sampler=None, pruner=None):
    return optuna.study.Study(study_name=study.study_name, storage=ViewStorage(study._storage, trials),
                              sampler=sampler, pruner=pruner)


def slot_seed(seed: int, slot: int) -> int:
    return zlib.crc32(f"lmforge-tune/{seed}/{slot}".encode()) & 0x7FFFFFFF


class SlotSampler(BaseSampler):
    """The study's sampler: per slot, a fresh ``make(seed)`` sampler over the deterministic view."""

    def __init__(self, make: Callable[[int], BaseSampler], seed: int, lag: int, deterministic: bool = True,
                 n_slots: Optional[int] = None, poll_s: float = 0.5, wait_note: Optional[Callable] = None,
                 on_trial: Optional[Callable] = None):
        self.make, self.seed, self.lag, self.deterministic = make, seed, lag, deterministic
        self.n_slots, self.poll_s, self.wait_note, self.on_trial = n_slots, poll_s, wait_note, on_trial
        self._cur: dict[int, tuple] = {}  # trial number → (inner sampler, view study, slot)

    def _ready(self, study, trials, slot: int) -> bool:
        attempts = slot_attempts(trials)
        return all(final_attempt(attempts[j]) is not None for j in range(0, slot - self.lag + 1) if j in attempts)

    def _prepare(self, study, trial: FrozenTrial):
        if self.on_trial is not None:  # e.g. record the owner before any wait
            self.on_trial(study, trial)
        trials = study._storage.get_all_trials(study._study_id, deepcopy=False)
        slot = slot_of(trials, trial.number)
        waited = False
        while self.deterministic and (self.n_slots is None or slot < self.n_slots) and \
                not self._ready(study, trials, slot):
            if not waited and self.wait_note:
                self.wait_note(slot, slot - self.lag)
            waited = True
            time.sleep(self.poll_s)
            trials = study._storage.get_all_trials(study._study_id, deepcopy=False)
        inner = self.make(slot_seed(self.seed, slot))
        lag = self.lag if self.deterministic else 1
        view = view_study(study, view_trials(trials, slot, lag, current=trial), inner)
        self._cur[trial.number] = (inner, view, slot)

    def _get(self, study, trial: FrozenTrial):
        if trial.number not in self._cur:
            self._prepare(study, trial)
        inner, view, slot = self._cur[trial.number]
        return inner, view, _as(trial, slot, hide=False)

    def before_trial(self, study, trial: FrozenTrial) -> None:
        inner, view, t = self._get(study, trial)
        inner.before_trial(view, t)

    def infer_relative_search_space(self, study, trial):
        inner, view, t = self._get(study, trial)
        return inner.infer_relative_search_space(view, t)

    def sample_relative(self, study, trial, search_space):
        inner, view, t = self._get(study, trial)
        return inner.sample_relative(view, t, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        inner, view, t = self._get(study, trial)
        return inner.sample_independent(view, t, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        entry = self._cur.pop(trial.number, None)
        if entry is not None:
            inner, view, slot = entry
            try:
                inner.after_trial(view, _as(trial, slot, hide=False), state, values)
            except Exception:  # noqa: BLE001  (bookkeeping of the inner sampler, e.g. grid's stop())
                pass


class OrderedPruner(optuna.pruners.BasePruner):
    """``inner`` deciding over the deterministic view of slot k: slots 0..k-P as they ended, and the trial."""

    def __init__(self, inner, lag: int, deterministic: bool = True):
        self.inner, self.lag, self.deterministic = inner, lag, deterministic

    def prune(self, study, trial: FrozenTrial) -> bool:
        if not self.deterministic:
            return self.inner.prune(study, trial)
        trials = study._storage.get_all_trials(study._study_id, deepcopy=False)
        slot = slot_of(trials, trial.number)
        view = view_study(study, view_trials(trials, slot, self.lag, current=trial), pruner=self.inner)
        return self.inner.prune(view, _as(trial, slot, hide=False))
