"""Runs the model over the paged pool: prefill one sequence, decode a batch, a one-token health probe, and the
start-up check that makes decode rows batch-invariant.

Batch invariance. CPU BLAS picks its matmul kernel by the row count, so a row's logits can differ in the
last bits between a batch of 1 and a batch of 9, and a greedy pick could flip on a near tie. Measured on
this code's CPUs, once a step has >= 16 rows every row's result is bitwise independent of the row count, of
its position and of the other rows, and attention is independent of the key-view length as long as it is a
multiple of the block size (which StepCache guarantees). ``calibrate`` measures this for the loaded model:
it finds the smallest padded row count R such that one row's logits are identical for every batch size
from R to max_batch, with short and long neighbours, first and last in the batch. Decode steps are then
padded to at least R rows, so a request's output never depends on what shares its batch. If no R works the
server says so (``batch_invariant`` False) and decodes unpadded.

Legend: B rows, T tokens, V vocab.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Optional, Sequence

import torch

from lmforge.serve.kv_pool import SCRATCH_BLOCK, BlockPool, PagedKV, StepCache, blocks_for

log = logging.getLogger("lmforge.serve")

FAULT_ENV = "LMFORGE_SERVE_FAULT_FILE"


class FaultHook:
    """Test-only fault injection: when env ``LMFORGE_SERVE_FAULT_FILE`` names a file, each model step reads
    it: ``error`` makes the step raise, ``stall SECONDS`` makes it sleep. Absent env var: never consulted."""

    def __init__(self, path: Optional[str]):
        self.path = path

    @classmethod
    def from_env(cls) -> "FaultHook":
        return cls(os.environ.get(FAULT_ENV) or None)

    def check(self) -> None:
        if self.path is None or not os.path.exists(self.path):
            return
        try:
            words = open(self.path).read().split()
        except OSError:
            return
        if words[:1] == ["error"]:
            raise RuntimeError("injected decode fault")
        if words[:1] == ["stall"]:
            time.sleep(float(words[1]) if len(words) > 1 else 3600.0)


class ModelRunner:
    def __init__(self, model, kv: PagedKV, pool: BlockPool, max_rows: int, fault: Optional[FaultHook] = None):
        self.model, self.kv, self.pool, self.max_rows = model, kv, pool, max_rows
        self.fault = fault or FaultHook(None)
        self.min_rows = 1
        self.batch_invariant = False
        self.device = kv.device
        self.vocab = model.cfg.vocab_size
        self.max_len = model.cfg.max_seq_len

    # ------------------------------------------------------------------ steps
    def prefill(self, tokens: Sequence[int], table: Sequence[int], cached: int = 0) -> torch.Tensor:
        """Feed ``tokens[cached:]`` for one sequence; returns float32 logits [V] after the last token."""
        self.fault.check()
        step = StepCache(self.kv, [table], [cached], len(tokens) - cached)
        x_1T = torch.as_tensor([list(tokens[cached:])], dtype=torch.long, device=self.device)
        h_1TD = self.model.hidden_states(x_1T, cache=step, positions_BT=step.positions_BT)
        return self.model.output(h_1TD[:, -1]).float()[0]

    def decode(self, last_tokens: Sequence[int], ctx_lens: Sequence[int],
               tables: Sequence[Sequence[int]]) -> torch.Tensor:
        """One new token per row (row b has ``ctx_lens[b]`` tokens cached); float32 logits [B_pad, V] with
        B_pad = max(B, min_rows): padding rows point at the scratch block and are ignored by the caller."""
        self.fault.check()
        pad = max(len(last_tokens), self.min_rows) - len(last_tokens)
        toks = list(last_tokens) + [0] * pad
        lens = list(ctx_lens) + [0] * pad
        tabs = list(tables) + [[SCRATCH_BLOCK]] * pad
        step = StepCache(self.kv, tabs, lens, 1)
        x_B1 = torch.as_tensor(toks, dtype=torch.long, device=self.device)[:, None]
        h_B1D = self.model.hidden_states(x_B1, cache=step, positions_BT=step.positions_BT)
        return self.model.output(h_B1D[:, 0]).float()

    # ------------------------------------------------------------------ probe
    def probe(self, table: Sequence[int]) -> float:
        """One prefill token + one decode token through the real path, on the reserved probe block; raises
        when the step fails or the logits are not finite. Returns the seconds it took."""
        t0 = time.monotonic()
        logits_V = self.prefill([1 % self.vocab], table)
        logits_BV = self.decode([int(logits_V.argmax())], [1], [table])
        if not bool(torch.isfinite(logits_BV[0]).all()):
            raise RuntimeError("probe: decode produced non-finite logits")
        return time.monotonic() - t0

    # ------------------------------------------------------------------ batch invariance
    def calibrate(self, seed: int = 0) -> None:
        """Set ``min_rows`` (see the module docstring); blocks are borrowed from the pool and given back."""
        bs = self.kv.block_size
        P = max(1, min(2 * bs + 3, self.max_len - 2))
        ref_n = blocks_for(P + 1, bs)
        fill_tokens = min(self.max_len - 1, (self.pool.num_free - self.pool.reserved - ref_n) * bs)
        if fill_tokens < 1:
            log.warning("batch invariance not checked: KV pool too small")
            return
        fill_n = blocks_for(fill_tokens, bs)
        self.pool.reserve(ref_n + fill_n)
        ref_tab = [self.pool.allocate_reserved() for _ in range(ref_n)]
        fill_tab = [self.pool.allocate_reserved() for _ in range(fill_n)]
        try:
            R = self._find_min_rows(ref_tab, fill_tab, P, fill_tokens - 1, seed)
        finally:
            self.pool.release(ref_tab + fill_tab)
        self.batch_invariant = R is not None
        self.min_rows = R or 1
        if R is None:
            log.warning("batch invariance: no padded batch size up to %d gives bitwise-equal rows on this "
                        "machine; outputs may differ in the last float bits with what shares a batch", self.max_rows)
        else:
            log.info("batch invariance: decode steps padded to >= %d rows", R)

    def _find_min_rows(self, ref_tab, fill_tab, P: int, long_ctx: int, seed: int) -> Optional[int]:
        g = torch.Generator().manual_seed(seed)
        prompt = torch.randint(0, self.vocab, (P,), generator=g).tolist()
        self.prefill(prompt, ref_tab)
        tok = int(torch.randint(0, self.vocab, (1,), generator=g))
        fillers = torch.randint(0, self.vocab, (self.max_rows,), generator=g).tolist()
        saved = self.min_rows
        self.min_rows = 1

        def row_logits(M: int, ctx: int, last: bool) -> torch.Tensor:
            toks, lens, tabs = fillers[:M - 1], [ctx] * (M - 1), [fill_tab] * (M - 1)
            at = M - 1 if last else 0
            toks.insert(at, tok)
            lens.insert(at, P)
            tabs.insert(at, ref_tab)
            return self.decode(toks, lens, tabs)[at]

        try:
            ref = row_logits(self.max_rows, long_ctx, False)
            ok = {}
            for M in range(1, self.max_rows + 1):
                ok[M] = all(torch.equal(row_logits(M, ctx, last), ref)
                            for ctx in ((1, long_ctx) if M > 1 else (1,)) for last in ((False, True) if M > 1 else (False,)))
        finally:
            self.min_rows = saved
        if not ok[self.max_rows]:
            return None
        R = self.max_rows
        while R > 1 and ok[R - 1]:
            R -= 1
        return R
