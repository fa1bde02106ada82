"""The HTTP surface: FastAPI routes behind the security ``Gate``, with every error in the OpenAI shape.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models[/{id}]``, ``GET /metrics``
(all behind a Bearer key), ``GET /health`` (liveness: the process and its scheduler thread are alive) and
``GET /ready`` (readiness: loaded, not draining, and the periodic one-token decode probe passed recently).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Optional

from fastapi import FastAPI
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from lmforge.serve.api_errors import APIError, overloaded
from lmforge.serve.handlers import generate
from lmforge.serve.loader import Loaded
from lmforge.serve.metrics import ServeMetrics
from lmforge.serve.protocol import model_not_found
from lmforge.serve.scheduler import Scheduler
from lmforge.serve.security import APIKeys, Gate, RateLimiter
from lmforge.serve.settings import ServeSettings

log = logging.getLogger("lmforge.serve")


@dataclass
class ServerState:
    settings: ServeSettings
    metrics: ServeMetrics
    phase: str = "loading"  # loading → ready → draining; "failed" when loading failed
    loaded: Optional[Loaded] = None
    scheduler: Optional[Scheduler] = None
    started: float = field(default_factory=time.time)

    def require_ready(self) -> tuple[Loaded, Scheduler]:
        if self.phase == "loading" or self.loaded is None or self.scheduler is None:
            raise overloaded("model is still loading", retry_after=5)
        if self.phase == "draining":
            self.metrics.labels(self.metrics.rejected, reason="draining").inc()
            raise overloaded("server is shutting down; retry on another replica", retry_after=2)
        return self.loaded, self.scheduler

    def readiness(self) -> tuple[bool, str]:
        if self.phase != "ready" or self.scheduler is None:
            return False, self.phase
        if not self.scheduler.ready():
            return False, self.scheduler.probe_error or "decode probe stale (engine stalled)"
        return True, "ready"


def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError):
        return _error_response(err)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        msg = {404: "no such route", 405: "method not allowed on this route"}.get(exc.status_code, "request refused")
        return _error_response(APIError(exc.status_code, msg, headers=dict(exc.headers or {})))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return _error_response(APIError(500, "internal server error"))


def create_app(state: ServerState, keys: Optional[APIKeys]):
    """The ASGI application (FastAPI wrapped in the Gate). ``keys`` None disables auth (--allow-no-auth)."""
    s, m = state.settings, state.metrics
    app = FastAPI(title="lmforge serve", docs_url=None, redoc_url=None, openapi_url=None)
    _install_error_handlers(app)

    @app.get("/health")
    async def health():
        if state.phase == "failed" or (state.scheduler is not None and not state.scheduler.alive()):
            return JSONResponse({"status": "dead"}, status_code=503)
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        ok, why = state.readiness()
        m.labels(m.ready).set(1 if ok else 0)
        return JSONResponse({"status": "ready" if ok else "not_ready", "reason": why}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics():
        ok, _ = state.readiness()
        m.labels(m.ready).set(1 if ok else 0)
        return Response(m.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def model_card() -> dict:
        if state.loaded is None:
            raise overloaded("model is still loading", retry_after=5)
        return {"id": state.loaded.name, "object": "model", "created": int(state.started), "owned_by": "lmforge",
                "max_model_len": state.loaded.model.cfg.max_seq_len,
                "dtype": state.loaded.precision.dtype_name if state.loaded.precision else None}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        card = model_card()
        if model_id != card["id"]:
            raise model_not_found(model_id)
        return card

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, state, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, state, chat=True)

    return Gate(app, keys, RateLimiter(s.rate_limit_rps, s.rate_limit_burst), s.max_body_bytes, s.access_log,
                closing=lambda: state.phase == "draining")
