"""``lmforge tune``: keep ``workers`` trial processes busy until every slot of the study has ended.

Each trial is its own process (``lmforge.tune.trial``; torchrun for ``--nproc`` > 1) that asks the shared
storage for its trial, so several ``lmforge tune`` on several machines fill one study. The ledger (the
storage) is the only state: a rerun after a SIGKILL reads it and goes on. A trial found RUNNING whose
process is gone (same host: the pid is dead; another host: no heartbeat for ``fault.grace_s``) is claimed by
one coordinator and, per ``fault.on_interrupt``, resumed from its newest checkpoint (same trial number, same
run folder) or marked FAIL and enqueued again as a retry (same parameters and slot, fresh run folder), at
most ``fault.max_retries`` times. So no trial is lost (every slot ends COMPLETE, PRUNED or FAIL), counted
twice (a slot has one settling attempt) or left RUNNING.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from lmforge.errors import SetupError
from lmforge.tune.ordered import RETRY_OF, SLOT, final_attempt, slot_attempts
from lmforge.tune.plan import Plan
from lmforge.tune.trial import HEARTBEAT, OWNER

FAILURES, CLAIM = "lmforge_failures", "lmforge_claim"
_MAX_SETUP_CRASHES = 3


@dataclass
class Child:
    proc: subprocess.Popen
    token: str
    number: Optional[int]  # known for resumptions; new trials write it to DIR/workers/TOKEN.json
    log: Path
    started: float = field(default_factory=time.time)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc: trust kill(0)
    return b"lmforge.tune.trial" in cmd


def is_orphan(t, grace_s: float, now: float) -> bool:
    owner = t.system_attrs.get(OWNER)
    beat = t.system_attrs.get(HEARTBEAT) or (t.datetime_start.timestamp() if t.datetime_start else now)
    if owner and owner.get("host") == socket.gethostname():
        return not pid_alive(int(owner["pid"]))
    return now - float(beat) > grace_s


class Coordinator:
    def __init__(self, plan: Plan, workers: int, echo=print):
        from lmforge.tune.storage import build_study

        self.plan, self.workers, self.echo = plan, workers, echo
        self.cfg = plan.cfg
        self.study = build_study(self.cfg, plan.url, plan.space(), plan.lag, plan.n_slots, plan.max_steps)
        self.children: list[Child] = []
        self.crashes, self.t0, self.reported = 0, time.time(), -1
        (plan.dir / "workers").mkdir(exist_ok=True)
        (plan.dir / "logs").mkdir(exist_ok=True)

    # ------------------------------------------------------------------ the ledger
    def trials(self):
        return self.study._storage.get_all_trials(self.study._study_id, deepcopy=False)

    def _mine(self) -> set[int]:
        out = set()
        for c in self.children:
            n = c.number if c.number is not None else self._token_number(c.token)
            if n is not None:
                c.number = n
                out.add(n)
        return out

    def _token_number(self, token: str) -> Optional[int]:
        path = self.plan.dir / "workers" / f"{token}.json"
        return json.loads(path.read_text())["trial"] if path.is_file() else None

    def settled(self) -> int:
        return sum(1 for j, a in slot_attempts(self.trials()).items() if j < self.plan.n_slots and final_attempt(a))

    # ------------------------------------------------------------------ orphans
    def _claim(self, t) -> bool:
        """One coordinator wins a takeover: write a token, wait, read back (last writer wins everywhere)."""
        token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        storage = self.study._storage
        storage.set_trial_system_attr(t._trial_id, CLAIM, token)
        time.sleep(1.0)
        return storage.get_trial(t._trial_id).system_attrs.get(CLAIM) == token

    def recover(self) -> None:
        from optuna.trial import TrialState

        now, mine = time.time(), self._mine()
        for t in self.trials():
            if t.state != TrialState.RUNNING or t.number in mine or not is_orphan(t, self.cfg.fault.grace_s, now):
                continue
            if not self._claim(t):
                continue
            self.interrupted(t, "its process is gone (its lmforge tune or machine stopped)", counts=False)

    def interrupted(self, t, why: str, counts: bool = True) -> None:
        """A trial whose process ended without telling: resume it, retry it, or give up. Only failures of the
        trial's own process (``counts``: a crash, or a kill while its coordinator lived) use up
        ``fault.max_retries``; a trial orphaned by its coordinator's or machine's death is always taken up."""
        from optuna.trial import TrialState

        fault, storage = self.cfg.fault, self.study._storage
        failures = int(t.system_attrs.get(FAILURES, 0)) + int(counts)
        storage.set_trial_system_attr(t._trial_id, FAILURES, failures)
        slot = slot_attempts(self.trials()).get(self._slot(t), [])
        slot_failures = sum(int(a.system_attrs.get(FAILURES, 0)) for a in slot[:-1]) + failures
        if fault.on_interrupt == "resume" and failures <= fault.max_retries:
            self.echo(f"[tune] trial {t.number}: {why}; resuming from its checkpoint ({failures} failure(s) of "
                      f"{fault.max_retries} allowed)")
            self.launch(t.number)
            return
        if fault.on_interrupt == "retry" and slot_failures <= fault.max_retries:
            self.study.enqueue_trial(dict(t.params), user_attrs={RETRY_OF: t.number, SLOT: self._slot(t)})
            self.echo(f"[tune] trial {t.number}: {why}; marked FAIL, its parameters queued again")
        else:
            self.echo(f"[tune] trial {t.number}: {why}; FAIL (no retries left)")
        storage.set_trial_user_attr(t._trial_id, "fail_reason", why)
        self.study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)

    def _slot(self, t) -> int:
        from lmforge.tune.ordered import slot_of

        return slot_of(self.trials(), t.number)

    # ------------------------------------------------------------------ children
    def command(self, token: str, number: Optional[int]) -> list[str]:
        tail = ["-m", "lmforge.tune.trial", str(self.plan.dir), "--token", token]
        tail += ["--trial", str(number)] if number is not None else []
        if self.plan.nproc > 1:
            return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc_per_node={self.plan.nproc}"] + tail
        return [sys.executable] + tail

    def launch(self, number: Optional[int]) -> None:
        from lmforge.tune.trial import die_with_parent

        token = uuid.uuid4().hex[:12]
        log = self.plan.dir / "logs" / f"{token}.log"
        with open(log, "wb") as f:
            proc = subprocess.Popen(self.command(token, number), stdout=f, stderr=subprocess.STDOUT,
                                    preexec_fn=die_with_parent)
        self.children.append(Child(proc, token, number, log))

    def reap(self) -> None:
        for c in list(self.children):
            rc = c.proc.poll()
            if rc is None:
                continue
            self.children.remove(c)
            number = c.number if c.number is not None else self._token_number(c.token)
            if rc == 0:
                self.crashes = 0
                continue
            if number is None:
                self.crashes += 1
                if self.crashes >= _MAX_SETUP_CRASHES:
                    raise SetupError(f"lmforge tune: {self.crashes} trial processes in a row failed before starting a "
                                     f"trial; the last one's output ({c.log}):\n{_tail(c.log)}")
                continue
            t = self.study._storage.get_trial(
                self.study._storage.get_trial_id_from_study_id_trial_number(self.study._study_id, number))
            if not t.state.is_finished():
                why = "killed" if rc < 0 else f"exited with {rc} (log {c.log})"
                self.interrupted(t, f"its process {why}")

    def want_new(self) -> int:
        trials = self.trials()
        fresh = sum(1 for t in trials if RETRY_OF not in t.user_attrs)
        from optuna.trial import TrialState

        waiting = sum(1 for t in trials if t.state == TrialState.WAITING)
        pending = sum(1 for c in self.children if c.number is None and self._token_number(c.token) is None)
        expired = self.cfg.timeout_minutes is not None and time.time() - self.t0 > self.cfg.timeout_minutes * 60
        fresh_left = 0 if expired else max(0, self.plan.n_slots - fresh)
        return max(0, fresh_left + waiting - pending)

    # ------------------------------------------------------------------ the loop
    def run(self, poll_s: float = 0.5) -> dict:
        self.recover()
        try:
            return self._loop(poll_s)
        except KeyboardInterrupt:  # the trials got the signal too: let them checkpoint, then stop
            for c in self.children:
                try:
                    c.proc.wait(120)
                except subprocess.TimeoutExpired:
                    c.proc.kill()
            self.echo("[tune] interrupted; running trials checkpointed and left RUNNING: rerun to resume them")
            raise

    def _loop(self, poll_s: float) -> dict:
        from lmforge.tune.report import progress_line, write_report

        while True:
            self.reap()
            self.recover()
            free = self.workers - len(self.children)
            for _ in range(min(free, self.want_new())):
                self.launch(None)
            done = self.settled()
            if done != self.reported:
                self.echo(progress_line(self.study, self.plan, self.t0))
                if done % self.cfg.report_every == 0 or done >= self.plan.n_slots:
                    write_report(self.study, self.plan)
                self.reported = done
            if not self.children and self.want_new() == 0 and not self._running_elsewhere():
                break
            time.sleep(poll_s)
        return write_report(self.study, self.plan)

    def _running_elsewhere(self) -> bool:
        from optuna.trial import TrialState

        return any(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in self.trials())


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no output)"
