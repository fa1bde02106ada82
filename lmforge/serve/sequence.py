"""What the scheduler tracks per request: a ``Group`` (one prompt, n choices), its ``Sequence`` objects, the
``Sink`` that carries events back to the HTTP handler, and incremental detokenization with stop strings.

Thread model: handlers (asyncio loop) create groups and read events; the scheduler thread owns every
field of a running group and hands events over with ``loop.call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from lmforge.serve.sampling import SamplingParams, TokenChoice

_ids = itertools.count()


@dataclass
class Event:
    """One step's output for one choice. ``finish_reason`` set on the last event of a choice; ``error``
    (an ``APIError``) replaces everything when the server could not finish the choice."""
    index: int
    text: str = ""
    tokens: list[TokenChoice] = field(default_factory=list)
    finish_reason: Optional[str] = None
    error: Optional[Exception] = None
    completion_tokens: int = 0


class Sink:
    """Events of one HTTP request (all its prompts and choices) on the handler's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()  # set by the handler when the client goes away

    def push(self, events: list[Event]) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, events)
        except RuntimeError:  # loop closed: the client and its handler are gone
            self.cancelled.set()


class Detokenizer:
    """Turns a growing token list into text deltas that are final: no trailing partial UTF-8 character, and
    no tail that could still grow into a stop string. Stop strings are cut (not included), as in OpenAI."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tok, self.stop = tokenizer, [s for s in stop if s]
        self.longest = max((len(s) for s in self.stop), default=0)
        self.ids: list[int] = []
        self.emitted = 0  # characters of the text already handed out

    def add(self, token: Optional[int]) -> tuple[str, bool]:
        """Append ``token`` (None: just flush at the end); returns (new final text, hit a stop string)."""
        final = token is None
        if token is not None:
            self.ids.append(token)
        full = self.tok.decode(self.ids)
        if self.stop:
            hit = self._find_stop(full)
            if hit is not None:
                delta = full[self.emitted:hit]
                self.emitted = max(self.emitted, hit)
                return delta, True
        stable = full if final else full.rstrip("\ufffd")
        end = len(stable) if final else len(stable) - self._held(stable)
        delta = stable[self.emitted:end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return delta, False

    def _find_stop(self, full: str) -> Optional[int]:
        start = max(0, self.emitted - self.longest)
        hits = [i for i in (full.find(s, start) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _held(self, text: str) -> int:
        """Length of the longest tail of ``text`` that is a proper prefix of a stop string."""
        for k in range(min(self.longest - 1, len(text)), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0


class Sequence:
    """One choice: its tokens, KV block table, generator and detokenizer."""

    def __init__(self, group: "Group", index: int, gen: torch.Generator, detok: Detokenizer):
        self.group, self.index, self.gen, self.detok = group, index, gen, detok
        self.tokens: list[int] = list(group.prompt_ids)  # prompt + generated
        self.generated = 0
        self.cached = 0  # tokens whose keys/values are in the pool
        self.table: list[int] = []
        self.reserved = 0  # blocks still promised to this sequence by the pool
        self.finish_reason: Optional[str] = None
        self.last_token_time: Optional[float] = None

    @property
    def params(self) -> SamplingParams:
        return self.group.params


class Group:
    """One prompt and its ``n`` choices, admitted and freed together with the pool."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, n: int, sink: Sink, index_offset: int = 0,
                 key_id: str = "-", deadline: Optional[float] = None):
        self.id = next(_ids)
        self.prompt_ids, self.params, self.n, self.sink = list(prompt_ids), params, n, sink
        self.index_offset, self.key_id, self.deadline = index_offset, key_id, deadline
        self.arrival = time.monotonic()
        self.admitted_at: Optional[float] = None
        self.first_token_at: Optional[float] = None
        self.seqs: list[Sequence] = []

    @property
    def cancelled(self) -> bool:
        return self.sink.cancelled.is_set()

    def live(self) -> list[Sequence]:
        return [s for s in self.seqs if s.finish_reason is None]
