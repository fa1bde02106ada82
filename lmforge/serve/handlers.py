"""The two generation endpoints: body → validated request → prompt token ids → limits → groups queued on
the scheduler → a JSON response or an SSE stream. Every refusal is an ``APIError`` naming the limit."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Optional

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse

from lmforge.serve.api_errors import APIError, bad_request
from lmforge.serve.protocol import ChatRequest, CompletionRequest, check_text, model_not_found, parse
from lmforge.serve.responses import SSE_DONE, ChatFormatter, CompletionFormatter, sse
from lmforge.serve.sampling import SamplingParams
from lmforge.serve.sequence import Group, Sink

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
DISCONNECT_CHECK_S = 0.5  # how often a non-streaming handler asks whether its client is still there


def _no_constants(name: str):
    raise ValueError(f"{name} is not valid JSON")


async def read_json(request: Request, max_body: int):
    ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise APIError(415, f"Content-Type must be application/json, got '{ctype[:40]}'", code="unsupported_media_type")
    size, parts = 0, []
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_body:
            raise APIError(413, f"request body is larger than the server's limit of {max_body} bytes "
                                f"(--max-body-bytes)", code="body_too_large")
        parts.append(chunk)
    try:
        text = b"".join(parts).decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad_request(f"request body is not valid UTF-8 (byte {e.start})", code="invalid_utf8") from None
    try:
        return json.loads(text, parse_constant=_no_constants)
    except ValueError as e:
        where = f" at line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError) else ""
        raise bad_request(f"request body is not valid JSON{where}", code="invalid_json") from None


def _completion_prompts(req: CompletionRequest, tok, vocab: int) -> list[list[int]]:
    p = req.prompt
    if isinstance(p, str) or (isinstance(p, list) and p and isinstance(p[0], str)):
        texts = [p] if isinstance(p, str) else p
        for t in texts:
            check_text(t, "prompt")
        ids = [tok.encode(t) for t in texts]
    else:
        ids = [p] if isinstance(p[0], int) else p
        for row in ids:
            bad = [t for t in row if not 0 <= t < vocab]
            if bad:
                raise bad_request(f"prompt token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", param="prompt")
    if any(len(x) == 0 for x in ids):
        raise bad_request("prompt is empty (it encodes to zero tokens)", param="prompt")
    return ids


def _chat_prompt(req: ChatRequest, tok, template) -> list[list[int]]:
    msgs = []
    for i, m in enumerate(req.messages):
        text = m.text()
        check_text(text, f"messages.{i}.content")
        msgs.append({"role": m.role, "content": text})
    return [template.encode(tok, msgs)]


class Limits:
    def __init__(self, settings, context: int):
        self.s, self.ctx = settings, context
        self.max_prompt = min(settings.max_prompt_tokens or context - 1, context - 1)
        self.cap = min(settings.max_tokens_cap or context, context)

    def check(self, prompts: list[list[int]], max_tokens: int, n: int) -> None:
        s = self.s
        if n > s.max_n:
            raise bad_request(f"n={n} is more than this server's limit of {s.max_n} (--max-n)", param="n")
        if n * len(prompts) > s.max_batch:
            raise bad_request(f"{len(prompts)} prompt(s) × n={n} is more sequences than the batch holds "
                              f"({s.max_batch}, --max-batch)", param="n")
        if max_tokens > self.cap:
            raise bad_request(f"max_tokens={max_tokens} is more than this server's limit of {self.cap} "
                              f"(model context {self.ctx} tokens, --max-tokens-cap)", param="max_tokens")
        for ids in prompts:
            if len(ids) > self.max_prompt:
                raise bad_request(f"the prompt has {len(ids)} tokens; this server accepts at most {self.max_prompt} "
                                  f"prompt tokens (model context {self.ctx})", param="prompt", code="context_length_exceeded")
            if len(ids) + max_tokens > self.ctx:
                raise bad_request(f"This model's maximum context length is {self.ctx} tokens. However, you requested "
                                  f"{len(ids) + max_tokens} tokens ({len(ids)} in the prompt, {max_tokens} for the "
                                  f"completion). Reduce the prompt or max_tokens.", param="max_tokens",
                                  code="context_length_exceeded")


async def generate(request: Request, state, chat: bool):
    """POST /v1/completions and /v1/chat/completions."""
    loaded, sched = state.require_ready()
    body = await read_json(request, state.settings.max_body_bytes)
    req = parse(ChatRequest if chat else CompletionRequest, body)
    if req.model != loaded.name:
        raise model_not_found(req.model)
    tok, vocab = loaded.tokenizer, loaded.model.cfg.vocab_size
    if chat:
        if loaded.chat_template is None:
            raise bad_request(f"model '{loaded.name}' has no chat template (no chat_template.json next to its "
                              f"tokenizer; SFT exports write one); use /v1/completions", code="no_chat_template")
        prompts = await run_in_threadpool(_chat_prompt, req, tok, loaded.chat_template)
    else:
        prompts = await run_in_threadpool(_completion_prompts, req, tok, vocab)
    limits = Limits(state.settings, loaded.model.cfg.max_seq_len)
    asked = req.limit() if chat else req.max_tokens
    max_tokens = asked if asked is not None else (
        min(limits.cap, limits.ctx - max(len(p) for p in prompts)) if chat else DEFAULT_COMPLETION_MAX_TOKENS)
    limits.check(prompts, max(max_tokens, 1), req.n)
    for s in req.stops():
        check_text(s, "stop")
    lp = (req.top_logprobs or 0) if chat and req.logprobs else (None if chat else req.logprobs)
    params = SamplingParams(max_tokens=max_tokens, temperature=1.0 if req.temperature is None else float(req.temperature),
                            top_p=1.0 if req.top_p is None else float(req.top_p),
                            top_k=None if req.top_k in (None, -1) else req.top_k, stop=req.stops(),
                            seed=req.seed, logprobs=lp)
    sink = Sink(asyncio.get_running_loop())
    access = request.scope.get("state", {}).get("access", {})
    deadline = time.monotonic() + state.settings.request_timeout
    groups = [Group(ids, params, req.n, sink, index_offset=i * req.n, key_id=access.get("key_id", "-"),
                    deadline=deadline) for i, ids in enumerate(prompts)]
    fmt_cls = ChatFormatter if chat else CompletionFormatter
    fmt = fmt_cls(loaded.name, tok, req.n * len(prompts), sum(len(p) for p in prompts), lp)
    sched.submit(groups)
    access.update(prompt_tokens=fmt.prompt_tokens, n=len(fmt.choices), stream=req.stream)
    if req.stream:
        usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(_stream(fmt, sink, sched, chat, usage, access), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await _collect(request, fmt, sink, sched, access)


def _note(access: dict, fmt, t0: float, first: Optional[float]) -> None:
    access.update(completion_tokens=fmt.usage()["completion_tokens"],
                  finish_reasons=[c.finish_reason for c in fmt.choices],
                  ttft_ms=round((first - t0) * 1000, 2) if first else None)


async def _stream(fmt, sink: Sink, sched, chat: bool, include_usage: bool, access: dict):
    t0, first = time.monotonic(), None
    try:
        if chat:
            for c in fmt.role_chunks():
                yield sse(c)
        while not fmt.done:
            events = await sink.queue.get()
            first = first or time.monotonic()
            for ev in events:
                if ev.error is not None:
                    yield sse(ev.error.body())
                    return
                for chunk in fmt.chunks(ev):
                    yield sse(chunk)
        if include_usage:
            yield sse(fmt.usage_chunk())
        yield SSE_DONE
    finally:
        if not fmt.done:  # client went away, or an error ended the stream: free the slots now
            sink.cancelled.set()
            sched.wake()
        _note(access, fmt, t0, first)


async def _collect(request: Request, fmt, sink: Sink, sched, access: dict):
    t0, first = time.monotonic(), None
    next_check = t0 + DISCONNECT_CHECK_S
    try:
        while not fmt.done:
            try:
                events = await asyncio.wait_for(sink.queue.get(), timeout=DISCONNECT_CHECK_S)
            except asyncio.TimeoutError:
                events = []
            if time.monotonic() >= next_check:  # a client that left frees its slots within ~0.5 s
                next_check = time.monotonic() + DISCONNECT_CHECK_S
                if await request.is_disconnected():
                    raise APIError(499, "client closed the request", code="client_closed")
            first = first or (time.monotonic() if events else None)
            for ev in events:
                if ev.error is not None:
                    raise ev.error
                fmt.add(ev)
    finally:
        if not fmt.done:
            sink.cancelled.set()
            sched.wake()
        _note(access, fmt, t0, first)
    return JSONResponse(fmt.final())
