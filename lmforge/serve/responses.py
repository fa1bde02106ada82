"""OpenAI response bodies and stream chunks for text completions and chat completions.

Stream chunks follow the API exactly: ``object`` "text_completion" (completions) or "chat.completion.chunk"
(chat, whose first chunk per choice carries ``delta.role`` = "assistant"); text arrives in chunks with
``finish_reason`` null, and a choice ends with a chunk of empty text/delta carrying its ``finish_reason``
(text held back because it could still be part of a stop string or a UTF-8 character is sent later); with ``stream_options.include_usage`` a last chunk has ``choices: []`` and
the usage; the stream ends with ``data: [DONE]``.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Optional

from lmforge.serve.sampling import TokenChoice
from lmforge.serve.sequence import Event


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


@dataclass
class ChoiceState:
    text: list[str] = field(default_factory=list)
    tokens: list[TokenChoice] = field(default_factory=list)
    finish_reason: Optional[str] = None
    completion_tokens: int = 0
    offset: int = 0  # characters emitted so far (text_offset of completions logprobs)


class Formatter:
    """Shared by both endpoints: ids, timestamps, usage, and the per-choice state."""

    object_final = ""
    object_chunk = ""
    prefix = ""

    def __init__(self, model: str, tokenizer, n_choices: int, prompt_tokens: int, logprobs: Optional[int]):
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model, self.tok, self.logprobs = model, tokenizer, logprobs
        self.prompt_tokens = prompt_tokens
        self.choices = [ChoiceState() for _ in range(n_choices)]

    def add(self, ev: Event) -> ChoiceState:
        c = self.choices[ev.index]
        c.text.append(ev.text)
        c.tokens.extend(ev.tokens)
        c.completion_tokens = max(c.completion_tokens, ev.completion_tokens)
        if ev.finish_reason:
            c.finish_reason = ev.finish_reason
        return c

    @property
    def done(self) -> bool:
        return all(c.finish_reason is not None for c in self.choices)

    def usage(self) -> dict:
        comp = sum(c.completion_tokens for c in self.choices)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": comp,
                "total_tokens": self.prompt_tokens + comp}

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def token_text(self, token: int) -> str:
        return self.tok.decode([token])

    def usage_chunk(self) -> dict:
        return {**self._head(self.object_chunk), "choices": [], "usage": self.usage()}


class CompletionFormatter(Formatter):
    object_final = object_chunk = "text_completion"
    prefix = "cmpl"

    def _logprobs(self, c: ChoiceState, tokens: list[TokenChoice]) -> Optional[dict]:
        if self.logprobs is None:
            return None
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for t in tokens:
            s = self.token_text(t.token)
            out["tokens"].append(s)
            out["token_logprobs"].append(t.logprob)
            out["top_logprobs"].append({self.token_text(i): lp for i, lp in (t.top or [])} if self.logprobs else None)
            out["text_offset"].append(c.offset)
            c.offset += len(s)
        return out

    def chunks(self, ev: Event) -> list[dict]:
        c = self.add(ev)
        out = []
        if ev.text or self.logprobs is not None:
            out.append({"index": ev.index, "text": ev.text, "logprobs": self._logprobs(c, ev.tokens),
                        "finish_reason": None})
        if ev.finish_reason is not None:
            out.append({"index": ev.index, "text": "", "logprobs": None, "finish_reason": ev.finish_reason})
        return [{**self._head(self.object_chunk), "choices": [ch]} for ch in out]

    def final(self) -> dict:
        choices = []
        for i, c in enumerate(self.choices):
            c.offset = 0
            choices.append({"index": i, "text": "".join(c.text), "logprobs": self._logprobs(c, c.tokens),
                            "finish_reason": c.finish_reason})
        return {**self._head(self.object_final), "choices": choices, "usage": self.usage()}


class ChatFormatter(Formatter):
    object_final = "chat.completion"
    object_chunk = "chat.completion.chunk"
    prefix = "chatcmpl"

    def _entry(self, token: int, logprob: float) -> dict:
        s = self.token_text(token)
        return {"token": s, "logprob": logprob, "bytes": list(s.encode("utf-8"))}

    def _logprobs(self, tokens: list[TokenChoice]) -> Optional[dict]:
        if self.logprobs is None:
            return None
        return {"content": [{**self._entry(t.token, t.logprob),
                             "top_logprobs": [self._entry(i, lp) for i, lp in (t.top or [])]} for t in tokens]}

    def role_chunks(self) -> list[dict]:
        return [{**self._head(self.object_chunk), "choices": [
            {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]}
            for i in range(len(self.choices))]

    def chunks(self, ev: Event) -> list[dict]:
        self.add(ev)
        out = []
        if ev.text or self.logprobs is not None:
            out.append({"index": ev.index, "delta": {"content": ev.text}, "logprobs": self._logprobs(ev.tokens),
                        "finish_reason": None})
        if ev.finish_reason is not None:
            out.append({"index": ev.index, "delta": {}, "logprobs": None, "finish_reason": ev.finish_reason})
        return [{**self._head(self.object_chunk), "choices": [ch]} for ch in out]

    def final(self) -> dict:
        choices = [{"index": i, "message": {"role": "assistant", "content": "".join(c.text)},
                    "logprobs": self._logprobs(c.tokens), "finish_reason": c.finish_reason}
                   for i, c in enumerate(self.choices)]
        return {**self._head(self.object_final), "choices": choices, "usage": self.usage()}
