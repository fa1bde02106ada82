"""API keys, per-key rate limits, and the ASGI gate every HTTP request passes first.

Keys come from a file (``--api-keys FILE``: one key per line, optionally ``name:key``; ``#`` comments) or
from env ``LMFORGE_API_KEYS`` (comma-separated, same forms). Only SHA-256 digests are kept; a presented key
is hashed and compared with *every* stored digest by ``hmac.compare_digest`` (no early exit), so timing says
nothing about which bytes matched. A key is identified in logs and metrics by its name or by
``key-<first 8 hex of its digest>``, never by the key.

The gate, for every route except the probes ``/health`` and ``/ready``: no ``Authorization: Bearer`` → 401;
an unknown key → 403; the key's token bucket empty → 429 + Retry-After (``/metrics`` is not metered); a declared body over the limit →
413. Then the request runs and one JSON access-log line is written.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import os
import time
import uuid
from pathlib import Path
from typing import Callable, Optional

from lmforge.errors import ConfigError
from lmforge.serve.api_errors import APIError

KEYS_ENV = "LMFORGE_API_KEYS"
OPEN_PATHS = frozenset({"/health", "/ready"})
UNMETERED_PATHS = frozenset({"/metrics"})  # authenticated, but scrapes never spend a key's request budget
access_log = logging.getLogger("lmforge.serve.access")


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


class APIKeys:
    def __init__(self, entries: list[tuple[str, str]]):
        self._keys = [(_digest(k), name or f"key-{_digest(k).hex()[:8]}") for name, k in entries]

    def __len__(self) -> int:
        return len(self._keys)

    @classmethod
    def parse(cls, lines: list[str], source: str) -> "APIKeys":
        entries = []
        for n, raw in enumerate(lines, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            name, sep, key = line.partition(":")
            name, key = (name.strip(), key.strip()) if sep else ("", name)
            if len(key) < 16 or any(c.isspace() for c in key):
                raise ConfigError(f"{source}:{n}: API key must be >= 16 characters without spaces")
            entries.append((name, key))
        return cls(entries)

    @classmethod
    def load(cls, path: Optional[str]) -> "APIKeys":
        if path:
            p = Path(path)
            try:
                return cls.parse(p.read_text(encoding="utf-8").splitlines(), str(p))
            except OSError as e:
                raise ConfigError(f"--api-keys {p}: cannot read ({e.strerror})") from None
        return cls.parse(os.environ.get(KEYS_ENV, "").split(","), f"env {KEYS_ENV}")

    def identify(self, presented: str) -> Optional[str]:
        d = _digest(presented)
        found = None
        for digest, name in self._keys:
            if hmac.compare_digest(d, digest) and found is None:
                found = name
        return found


class RateLimiter:
    """Token bucket per key: ``rate`` requests/s refill, at most ``burst`` saved up. rate 0 = unlimited."""

    def __init__(self, rate: float, burst: int):
        self.rate, self.burst = rate, burst
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, key_id: str) -> Optional[int]:
        """None when allowed, else the seconds to wait before a retry can succeed."""
        if self.rate <= 0:
            return None
        now = time.monotonic()
        tokens, last = self._buckets.get(key_id, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        if tokens >= 1.0:
            self._buckets[key_id] = (tokens - 1.0, now)
            return None
        self._buckets[key_id] = (tokens, now)
        return max(1, math.ceil((1.0 - tokens) / self.rate))


def authenticate(keys: Optional[APIKeys], headers: dict[str, str]) -> str:
    """The caller's key id, or raise 401 (no/odd credentials) / 403 (unknown key). ``keys`` None = no auth."""
    if keys is None:
        return "anonymous"
    value = headers.get("authorization", "")
    scheme, _, token = value.partition(" ")
    if not value or scheme.lower() != "bearer" or not token.strip():
        raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key",
                       headers={"WWW-Authenticate": "Bearer"})
    key_id = keys.identify(token.strip())
    if key_id is None:
        raise APIError(403, "invalid API key", code="invalid_api_key")
    return key_id


async def send_error(send, err: APIError, extra_headers: list[tuple[bytes, bytes]]) -> None:
    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()] + extra_headers
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _discard_body(receive, declared: Optional[str], cap: int) -> None:
    """Read and drop a refused request's body (up to ``cap`` bytes) so the client, still sending, reads our
    answer instead of a connection reset; a larger body is left unread and the connection is dropped."""
    if not declared or not declared.isdigit() or int(declared) > cap:
        return
    more = True
    while more:
        message = await receive()
        more = message.get("type") == "http.request" and message.get("more_body", False)


class Gate:
    """Pure ASGI middleware: request id, auth, rate limit, declared body size, access log."""

    def __init__(self, app, keys: Optional[APIKeys], limiter: RateLimiter, max_body: int, log_access: bool = True,
                 closing: Callable[[], bool] = lambda: False):
        self.app, self.keys, self.limiter, self.max_body, self.log_access = app, keys, limiter, max_body, log_access
        self.closing = closing  # True while draining: every response then says ``Connection: close``

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        rid = headers.get("x-request-id", "")[:64] or uuid.uuid4().hex
        rid = "".join(c for c in rid if c.isalnum() or c in "-_.") or uuid.uuid4().hex
        info = {"request_id": rid, "key_id": "-"}
        scope.setdefault("state", {})["access"] = info
        status = {"code": 500}
        t0 = time.monotonic()
        rid_header = [(b"x-request-id", rid.encode())]
        if self.closing():  # a draining replica: the client must not send its next request on this connection
            rid_header.append((b"connection", b"close"))

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message = {**message, "headers": list(message.get("headers", [])) + rid_header}
            await send(message)

        try:
            if scope["path"] not in OPEN_PATHS:
                self._check(headers, info, rate_limited=scope["path"] not in UNMETERED_PATHS)
            await self.app(scope, receive, send_wrapper)
        except APIError as err:
            status["code"] = err.status
            await _discard_body(receive, headers.get("content-length"), 4 * self.max_body)
            await send_error(send, err, rid_header)
        finally:
            if self.log_access and scope["path"] not in OPEN_PATHS:
                self._log(scope, info, status["code"], time.monotonic() - t0)

    def _check(self, headers: dict[str, str], info: dict, rate_limited: bool) -> None:
        info["key_id"] = authenticate(self.keys, headers)
        wait = self.limiter.take(info["key_id"]) if rate_limited else None
        if wait is not None:
            raise APIError(429, "rate limit exceeded for this API key", code="rate_limit_exceeded",
                           headers={"Retry-After": str(wait)})
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            raise APIError(413, f"request body is larger than the server's limit of {self.max_body} bytes "
                                f"(--max-body-bytes)", code="body_too_large")

    @staticmethod
    def _log(scope, info: dict, status: int, seconds: float) -> None:
        line = {"ts": round(time.time(), 3), **info, "method": scope["method"], "path": scope["path"],
                "status": status, "latency_ms": round(seconds * 1000, 2)}
        access_log.info(json.dumps(line, separators=(",", ":")))
