"""lm-evaluation-harness on an lmforge model: ``LMForgeLM`` is an ``lm_eval.api.model.LM``.

Legend: B requests per batch, T tokens, V vocab.

- ``loglikelihood((context, continuation))``: tokens of context + continuation (the continuation's tokens
  are those the full string adds after the context's own tokens; an empty context reads the EOS token),
  left-truncated to the model's context; Σ log p(continuation tokens) and whether each is the greedy
  choice. Requests are deduplicated, sorted by length and run in padded batches (right padding: causal
  attention never reads the pads of a row).
- ``loglikelihood_rolling((text,))``: the sliding-window log-likelihood of the whole text
  (``lm.token_logprobs``, window = model context, stride = window: disjoint windows, the harness's rule).
- ``generate_until((context, {until, max_gen_toks, temperature, do_sample}))``: the KV-cached decoder of
  ``lmforge.models.generate`` (greedy unless sampling is asked for), cut at the first stop string.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import yaml

from lmforge.errors import ConfigError

try:
    from lm_eval.api.model import LM as _LM
except ImportError:  # lm-eval is optional: pip install 'lmforge[tune]'
    _LM = object


class LMForgeLM(_LM):
    def __init__(self, model, tok, max_len: int, batch_size: int = 16, device="cpu"):
        if _LM is object:
            from lmforge.errors import SetupError

            raise SetupError("--harness-tasks needs lm-eval (pip install 'lmforge[tune]')")
        super().__init__()
        self.model, self.tok, self.max_len, self.batch_size, self._dev = model, tok, max_len, batch_size, device

    # ------------------------------------------------------------------ tokens
    def _prefix(self) -> list[int]:
        if self.tok.eos_id is None:
            raise ConfigError("an empty harness context needs an EOS token in the tokenizer")
        return [self.tok.eos_id]

    def split(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) with context + continuation = the tokens of the whole string."""
        if not context:
            return self._prefix(), self.tok.encode(continuation)
        whole, ctx = self.tok.encode(context + continuation), self.tok.encode(context)
        if whole[: len(ctx)] != ctx:  # the boundary merged into one token: score the continuation alone
            return ctx, self.tok.encode(continuation)
        return ctx, whole[len(ctx):]

    # ------------------------------------------------------------------ requests
    @torch.no_grad()
    def score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(Σ log p(continuation), greedy) for (context ids, continuation ids) pairs."""
        uniq = sorted(set((tuple(c), tuple(x)) for c, x in pairs), key=lambda p: -(len(p[0]) + len(p[1])))
        found: dict = {}
        for i in range(0, len(uniq), self.batch_size):
            chunk = uniq[i:i + self.batch_size]
            rows = [(list(c) + list(x))[-(self.max_len + 1):] for c, x in chunk]
            T = max(len(r) - 1 for r in rows)
            tokens_BT = torch.zeros(len(rows), T, dtype=torch.long)
            for r, row in enumerate(rows):
                tokens_BT[r, : len(row) - 1] = torch.tensor(row[:-1])
            logp_BTV = torch.log_softmax(self.model(tokens_BT.to(self._dev)).float(), -1).double().cpu()
            for r, (key, row) in enumerate(zip(chunk, rows)):
                n = len(key[1])
                pos = torch.arange(len(row) - 1 - n, len(row) - 1)
                targets = torch.tensor(row[-n:])
                lp = logp_BTV[r, pos].gather(1, targets[:, None])[:, 0]
                greedy = bool((logp_BTV[r, pos].argmax(-1) == targets).all())
                found[key] = (float(lp.sum()), greedy)
        return [found[(tuple(c), tuple(x))] for c, x in pairs]

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        return self.score([self.split(*r.args) for r in requests])

    def loglikelihood_rolling(self, requests) -> list[float]:
        from lmforge.evaluation.lm import token_logprobs

        out = []
        for r in requests:
            ids = self._prefix() + self.tok.encode(r.args[0])
            lp = token_logprobs(self.model, ids, self.max_len, self.max_len, self._dev, self.batch_size)
            out.append(float(lp.sum()))
        return out

    def generate_until(self, requests) -> list[str]:
        from lmforge.models.generate import generate

        out = []
        for r in requests:
            context, kw = r.args[0], dict(r.args[1] if len(r.args) > 1 else {})
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            ids = (self.tok.encode(context) or self._prefix())
            room = max(1, self.max_len - 1)
            ids = ids[-room:]
            n_new = min(int(kw.get("max_gen_toks", 64)), self.max_len - len(ids))
            sample = bool(kw.get("do_sample", False)) and float(kw.get("temperature", 0.0)) > 0
            temp = float(kw.get("temperature", 1.0)) if sample else 0.0
            new = generate(self.model, [ids], max_new_tokens=max(n_new, 1), temperature=temp,
                           eos_id=self.tok.eos_id, seed=0)[0]
            text = self.tok.decode(new)
            cut = [text.find(s) for s in until if s and text.find(s) >= 0]
            out.append(text[: min(cut)] if cut else text)
        return out


class _TolerantLoader(yaml.SafeLoader):
    """Parses lm-eval task YAML (``!function`` tags are read as plain strings) to check its syntax."""


_TolerantLoader.add_multi_constructor("!", lambda loader, suffix, node: str(getattr(node, "value", "")))


def task_names(paths: list[str]) -> tuple[list[str], list[str]]:
    """(task names, their folders) of local task YAML files; a file that does not parse → ConfigError."""
    names, dirs = [], []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise ConfigError(f"--harness-tasks: file not found: {p}")
        try:
            doc = yaml.load(path.read_text(encoding="utf-8"), Loader=_TolerantLoader)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
            raise ConfigError(f"{p}{where}: harness task file is not valid YAML "
                              f"({getattr(e, 'problem', None) or e})") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("task"), str):
            raise ConfigError(f"{p}: a harness task file needs a top-level 'task: NAME' (got "
                              f"{type(doc).__name__ if not isinstance(doc, dict) else sorted(doc)})")
        names.append(doc["task"])
        dirs.append(str(path.resolve().parent))
    return names, sorted(set(dirs))


def run_harness(model, tok, max_len: int, task_files: list[str], limit: Optional[int] = None,
                batch_size: int = 16, device="cpu") -> dict:
    """Run local harness tasks; → {task: {metric: value, metric_stderr: value}} plus the harness version."""
    import os

    names, dirs = task_names(task_files)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    lm = LMForgeLM(model, tok, max_len, batch_size, device)
    res = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=TaskManager(include_path=dirs),
                                  limit=limit, log_samples=False, bootstrap_iters=100)
    out = {}
    for task, metrics in (res.get("results") or {}).items():
        out[task] = {k.replace(",none", ""): v for k, v in metrics.items()
                     if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return {"tasks": out, "lm_eval_version": getattr(lm_eval, "__version__", "?"),
            "n_samples": res.get("n-samples", {})}
