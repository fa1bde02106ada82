"""Continuous batching: one thread owns the model and loops

    take new groups → drop cancelled/expired → admit + prefill (FCFS, within a token budget) → one decode step
    for every running sequence → emit tokens, free finished sequences → periodic health probe

so a request that arrives while others are decoding joins the batch at the next step. Prefill runs each
prompt alone (its own forward, so its keys never depend on the batch) and decode runs every running
sequence together. Admission reserves the KV blocks a group can ever need (prompt + max_tokens, the n
choices sharing the prompt's full blocks): a running sequence never waits for memory and is never
preempted, which keeps outputs independent of load. A sequence that finishes, is cancelled (client gone)
or times out releases its blocks in the same iteration.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Optional

import torch

from lmforge.serve.api_errors import APIError, bad_request, overloaded
from lmforge.serve.kv_pool import blocks_for
from lmforge.serve.metrics import ServeMetrics
from lmforge.serve.runner import ModelRunner
from lmforge.serve.sampling import TokenChoice, make_generator, sample_rows
from lmforge.serve.sequence import Detokenizer, Event, Group, Sequence
from lmforge.serve.settings import ServeSettings

log = logging.getLogger("lmforge.serve")


class Scheduler:
    def __init__(self, runner: ModelRunner, tokenizer, settings: ServeSettings, metrics: ServeMetrics):
        self.runner, self.pool, self.tok, self.s, self.m = runner, runner.pool, tokenizer, settings, metrics
        self.max_len = runner.max_len
        self.eos = tokenizer.eos_id
        self._cv = threading.Condition()
        self._inbox: deque[Group] = deque()
        self.waiting: deque[Group] = deque()
        self.running: list[Sequence] = []
        self.draining = False
        self._stop = False
        self.thread: Optional[threading.Thread] = None
        self._probe_table = [self.pool.pin()]  # never handed to a request
        self.probe_ok_at: Optional[float] = None
        self.probe_error: Optional[str] = None
        self._next_probe = 0.0
        # gauges are read at scrape time, so /metrics is current even while a step runs
        metrics.labels(metrics.running).set_function(lambda: len(self.running))
        metrics.labels(metrics.waiting).set_function(
            lambda: sum(g.n for g in list(self.waiting) + list(self._inbox)))
        metrics.labels(metrics.kv_usage).set_function(self.pool.usage)

    # ------------------------------------------------------------------ called from the HTTP side
    def blocks_needed(self, prompt_len: int, max_tokens: int, n: int) -> int:
        bs = self.pool.block_size
        total = blocks_for(min(prompt_len + max_tokens, self.max_len), bs)
        full = prompt_len // bs
        return full + n * (total - full)

    def submit(self, groups: list[Group]) -> None:
        """Queue the groups of one request, or raise 503 (draining / queue full) / 400 (can never fit)."""
        for g in groups:
            need = self.blocks_needed(len(g.prompt_ids), g.params.max_tokens, g.n)
            if need > self.pool.capacity or g.n > self.s.max_batch:
                raise bad_request(f"request needs {need} KV-cache blocks for {g.n} choice(s); the server holds "
                                  f"{self.pool.capacity} (--kv-cache-tokens) and {self.s.max_batch} sequences "
                                  f"(--max-batch)", param="max_tokens")
        with self._cv:
            if self.draining or self._stop:
                self.m.labels(self.m.rejected, reason="draining").inc()
                raise overloaded("server is shutting down; retry on another replica", retry_after=2)
            queued = sum(g.n for g in self.waiting) + sum(g.n for g in self._inbox)
            if queued + sum(g.n for g in groups) > self.s.max_queue:
                self.m.labels(self.m.rejected, reason="queue_full").inc()
                raise overloaded(f"server queue is full ({self.s.max_queue} sequences waiting)")
            self._inbox.extend(groups)
            self._cv.notify()

    def wake(self) -> None:
        with self._cv:
            self._cv.notify()

    def in_flight(self) -> int:
        with self._cv:
            return len(self._inbox) + len(self.waiting) + len(self.running)

    def ready(self) -> bool:
        ok_at = self.probe_ok_at
        fresh = ok_at is not None and time.monotonic() - ok_at < self.s.probe_interval + self.s.probe_timeout
        return fresh and self.probe_error is None and self.thread is not None and self.thread.is_alive()

    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="lmforge-scheduler", daemon=True)
        self.thread.start()

    def stop(self, join: float = 5.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self.thread is not None:
            self.thread.join(join)

    def abort_all(self, message: str) -> None:
        """End everything in flight with a 503 error event (drain timeout reached)."""
        with self._cv:
            self._abort = message
            self._cv.notify()

    # ------------------------------------------------------------------ the loop
    _abort: Optional[str] = None

    def _run(self) -> None:
        if self.s.threads:
            torch.set_num_threads(self.s.threads)
        with torch.inference_mode():
            while True:
                with self._cv:
                    if self._stop:
                        return
                    self.waiting.extend(self._inbox)
                    self._inbox.clear()
                    abort, self._abort = self._abort, None
                    if not self.waiting and not self.running and time.monotonic() < self._next_probe:
                        self._cv.wait(timeout=min(0.5, self._next_probe - time.monotonic()))
                        continue
                if abort is not None:
                    self._fail_all(APIError(503, abort, code="shutting_down"))
                try:
                    self._iteration()
                except Exception:  # a bug: end what is in flight (no client waits forever), stay not-ready
                    log.exception("scheduler iteration failed")
                    self.probe_error = "scheduler error"
                    self._fail_all(APIError(500, "internal error during generation"))

    def _iteration(self) -> None:
        self._reap()
        self._admit()
        if self.running:
            self._decode()
        if time.monotonic() >= self._next_probe:
            self._probe()

    def _reap(self) -> None:
        now = time.monotonic()
        for g in list(self.waiting):
            if g.cancelled or (g.deadline is not None and now > g.deadline):
                self.waiting.remove(g)
                self._end_waiting(g, "abort" if g.cancelled else "timeout")
        for s in list(self.running):
            g = s.group
            if g.cancelled:
                self._finish(s, "abort", notify=False)
            elif g.deadline is not None and now > g.deadline:
                self._finish(s, "timeout", notify=False)
                g.sink.push([Event(s.index, error=APIError(504, "request timed out (--request-timeout)"))])

    def _end_waiting(self, g: Group, reason: str) -> None:
        self.m.labels(self.m.success, finished_reason="abort").inc(g.n)
        if reason == "timeout":
            err = APIError(504, "request timed out waiting for a batch slot (--request-timeout)")
            g.sink.push([Event(g.index_offset + i, error=err) for i in range(g.n)])

    def _admit(self) -> None:
        budget = self.s.prefill_tokens_per_step
        while self.waiting and (budget > 0):
            g = self.waiting[0]
            need = self.blocks_needed(len(g.prompt_ids), g.params.max_tokens, g.n)
            if len(self.running) + g.n > self.s.max_batch or not self.pool.can_reserve(need):
                return
            self.waiting.popleft()
            budget -= len(g.prompt_ids)
            try:
                self._prefill(g, need)
            except Exception:
                log.exception("prefill failed (group %d)", g.id)
                self._fail(g.live(), APIError(500, "internal error while processing the prompt"))
                self._fail_unstarted(g)

    def _prefill(self, g: Group, need: int) -> None:
        now = time.monotonic()
        g.admitted_at = now
        self.m.labels(self.m.queue).observe(now - g.arrival)
        self.pool.reserve(need)
        p, bs = g.params, self.pool.block_size
        P = len(g.prompt_ids)
        total = blocks_for(min(P + p.max_tokens, self.max_len), bs)
        full = P // bs
        for i in range(g.n):
            s = Sequence(g, g.index_offset + i, make_generator(p.seed, i), Detokenizer(self.tok, p.stop))
            s.reserved = total if i == 0 else total - full
            g.seqs.append(s)
        first = g.seqs[0]
        for _ in range(blocks_for(P, bs)):
            self._grow(first)
        logits_V = self.runner.prefill(g.prompt_ids, first.table)
        for s in g.seqs:
            s.cached = P
            if s is not first:
                s.table = [self.pool.share(b) for b in first.table[:full]]
                if P % bs:
                    self._grow(s)
                    self.runner.kv.copy_block(first.table[full], s.table[-1])
        self.m.labels(self.m.prompt_tokens).inc(P)
        self.m.labels(self.m.prompt_len).observe(P)
        choices = sample_rows(logits_V[None].expand(g.n, -1), [p] * g.n, [s.gen for s in g.seqs])
        self.running.extend(g.seqs)
        self._emit(list(zip(g.seqs, choices)))

    def _grow(self, s: Sequence) -> None:
        s.table.append(self.pool.allocate_reserved())
        s.reserved -= 1

    def _decode(self) -> None:
        seqs = list(self.running)
        bs = self.pool.block_size
        for s in seqs:
            if s.cached // bs >= len(s.table):
                self._grow(s)
        try:
            logits_BV = self.runner.decode([s.tokens[-1] for s in seqs], [s.cached for s in seqs],
                                           [s.table for s in seqs])
        except Exception:
            log.exception("decode step failed (%d sequences)", len(seqs))
            self._fail(seqs, APIError(500, "internal error during generation"))
            return
        for s in seqs:
            s.cached += 1
        choices = sample_rows(logits_BV, [s.params for s in seqs], [s.gen for s in seqs])
        self._emit(list(zip(seqs, choices)))

    # ------------------------------------------------------------------ outputs
    def _emit(self, pairs: list[tuple[Sequence, TokenChoice]]) -> None:
        now = time.monotonic()
        by_sink: dict[int, tuple] = {}
        for s, c in pairs:
            ev = self._append(s, c, now)
            by_sink.setdefault(id(s.group.sink), (s.group.sink, []))[1].append(ev)
        for sink, events in by_sink.values():
            sink.push(events)

    def _append(self, s: Sequence, c: TokenChoice, now: float) -> Event:
        g, p = s.group, s.params
        s.tokens.append(c.token)
        s.generated += 1
        self.m.labels(self.m.generation_tokens).inc()
        if s.last_token_time is None:
            g.first_token_at = g.first_token_at or now
            self.m.labels(self.m.ttft).observe(now - g.arrival)
        else:
            self.m.labels(self.m.itl).observe(now - s.last_token_time)
            self.m.labels(self.m.tpot).observe(now - s.last_token_time)
        s.last_token_time = now
        reason = None
        if (c.token == self.eos and self.eos is not None) or c.token in p.stop_token_ids:
            text, _ = s.detok.add(None)
            reason = "stop"
        else:
            text, hit = s.detok.add(c.token)
            if hit:
                reason = "stop"
            elif s.generated >= p.max_tokens or len(s.tokens) >= self.max_len:
                more, _ = s.detok.add(None)
                text, reason = text + more, "length"
        ev = Event(s.index, text=text, tokens=[c], finish_reason=reason, completion_tokens=s.generated)
        if reason is not None:
            self._finish(s, reason, notify=False)
        return ev

    def _finish(self, s: Sequence, reason: str, notify: bool) -> None:
        s.finish_reason = reason
        self.running.remove(s)
        self.pool.unreserve(s.reserved)
        s.reserved = 0
        self.pool.release(s.table)
        s.table = []
        self.m.labels(self.m.success, finished_reason=reason).inc()
        self.m.labels(self.m.gen_len).observe(s.generated)
        if reason in ("stop", "length"):
            self.m.labels(self.m.e2e).observe(time.monotonic() - s.group.arrival)

    def _fail(self, seqs: list[Sequence], err: APIError) -> None:
        for s in seqs:
            if s.finish_reason is None and s in self.running:
                self._finish(s, "error", notify=False)
            s.group.sink.push([Event(s.index, error=err)])

    def _fail_unstarted(self, g: Group) -> None:
        """After a failed prefill: release what the group holds and tell every choice not yet told."""
        started = {s.index for s in g.seqs}
        for s in g.seqs:
            if s.finish_reason is None:
                s.finish_reason = "error"
                self.pool.unreserve(s.reserved)
                s.reserved = 0
                self.pool.release(s.table)
                s.table = []
        err = APIError(500, "internal error while processing the prompt")
        g.sink.push([Event(g.index_offset + i, error=err) for i in range(g.n) if g.index_offset + i not in started])

    def _fail_all(self, err: APIError) -> None:
        self._fail(list(self.running), err)
        while self.waiting:
            g = self.waiting.popleft()
            g.sink.push([Event(g.index_offset + i, error=err) for i in range(g.n)])

    # ------------------------------------------------------------------ health
    def _probe(self) -> None:
        self._next_probe = time.monotonic() + self.s.probe_interval
        try:
            dt = self.runner.probe(self._probe_table)
        except Exception as e:
            log.error("decode probe failed: %s", e)
            self.probe_error = "decode probe failed"
            self.m.labels(self.m.probe_failures).inc()
            return
        self.probe_ok_at, self.probe_error = time.monotonic(), None
        self.m.labels(self.m.probe_latency).observe(dt)
