"""Per-request sampling for a batch whose rows each carry their own parameters and random generator.

A row's draw uses only its own logits and its own ``torch.Generator`` (seeded from the request's ``seed``
plus the choice index), so what else shares the step never changes which token a row picks. Greedy rows
(temperature 0, or top_k 1) take the argmax. Logprobs are those of the model's raw distribution
(log_softmax of the unprocessed logits, as vLLM reports them).

Legend: B rows, V vocab.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Optional

import torch

from lmforge.models.generate import filter_logits


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: Optional[int] = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    seed: Optional[int] = None
    logprobs: Optional[int] = None  # None: none; k >= 0: the chosen token's logprob plus the top k

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def make_generator(seed: Optional[int], choice: int) -> torch.Generator:
    """Choice ``i`` of a seeded request draws from seed + i; unseeded requests draw fresh entropy."""
    g = torch.Generator(device="cpu")
    g.manual_seed((seed + choice) % (2 ** 63) if seed is not None else random.SystemRandom().getrandbits(63))
    return g


@dataclass
class TokenChoice:
    token: int
    logprob: Optional[float] = None
    top: Optional[list[tuple[int, float]]] = None  # [(token, logprob)] best first


def sample_rows(logits_BV: torch.Tensor, params: list[SamplingParams],
                gens: list[torch.Generator]) -> list[TokenChoice]:
    """One token per row. ``logits_BV`` float32 (rows past ``len(params)`` are padding and ignored)."""
    out: list[TokenChoice] = []
    want_lp = [p.logprobs is not None for p in params]
    logp_BV = torch.log_softmax(logits_BV[:len(params)], -1) if any(want_lp) else None
    greedy_B = logits_BV[:len(params)].argmax(-1).tolist()
    for b, p in enumerate(params):
        if p.greedy:
            tok = greedy_B[b]
        else:
            row_1V = filter_logits(logits_BV[b:b + 1] / p.temperature, p.top_k,
                                   p.top_p if p.top_p < 1.0 else None)
            tok = int(torch.multinomial(row_1V.softmax(-1), 1, generator=gens[b]))
        choice = TokenChoice(tok)
        if logp_BV is not None and want_lp[b]:
            choice.logprob = float(logp_BV[b, tok])
            if p.logprobs:
                vals, idx = logp_BV[b].topk(p.logprobs)
                choice.top = list(zip(idx.tolist(), vals.tolist()))
        out.append(choice)
    return out
