"""Process lifecycle of ``lmforge serve``: listen at once, load the model in the background (``/ready`` is 503
until it is loaded, calibrated and has passed its first decode probe), serve, and drain on SIGTERM/SIGINT:
stop admitting (new requests and ``/ready`` answer 503, and every response says ``Connection: close``), let
in-flight requests finish for up to ``--drain-timeout`` seconds, end any left with an error, linger a second
so a request already on its way gets its 503, then close the listener and exit 0. A second signal exits at
once."""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
import time
from typing import Optional

import uvicorn

from lmforge.errors import SetupError, UserError
from lmforge.serve.settings import ServeSettings

log = logging.getLogger("lmforge.serve")
DRAIN_LINGER_S = 1.0


def kv_heads(cfg) -> int:
    return (cfg.n_kv_heads or cfg.n_heads) if cfg.arch == "llama" else cfg.n_heads


def build_scheduler(loaded, settings: ServeSettings, metrics):
    """Pool + runner + scheduler for a loaded model; runs the batch-invariance calibration."""
    import torch

    from lmforge.serve.kv_pool import BlockPool, PagedKV, blocks_for
    from lmforge.serve.runner import FaultHook, ModelRunner
    from lmforge.serve.scheduler import Scheduler

    cfg = loaded.model.cfg
    tokens = settings.kv_cache_tokens or settings.max_batch * cfg.max_seq_len
    num_blocks = blocks_for(tokens, settings.block_size) + 2  # + scratch block + probe block
    dtype = next(loaded.model.parameters()).dtype
    kv = PagedKV(cfg.n_layers, kv_heads(cfg), cfg.d_model // cfg.n_heads, num_blocks, settings.block_size, dtype)
    pool = BlockPool(num_blocks, settings.block_size)
    runner = ModelRunner(loaded.model, kv, pool, settings.max_batch, FaultHook.from_env())
    sched = Scheduler(runner, loaded.tokenizer, settings, metrics)
    if settings.batch_invariant == "auto":
        with torch.inference_mode():
            runner.calibrate()
    metrics.labels(metrics.batch_invariant).set(1 if runner.batch_invariant else 0)
    metrics.labels(metrics.min_decode_rows).set(runner.min_rows)
    log.info("KV pool: %d blocks × %d tokens (%.1f MiB), max batch %d", num_blocks - 2, settings.block_size,
             kv.bytes() / 2 ** 20, settings.max_batch)
    return sched


def _configure_logging() -> None:
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    err = logging.StreamHandler(sys.stderr)
    err.setFormatter(fmt)
    root = logging.getLogger("lmforge.serve")
    root.handlers[:] = [err]
    root.setLevel(logging.INFO)
    root.propagate = False
    out = logging.StreamHandler(sys.stdout)
    out.setFormatter(logging.Formatter("%(message)s"))
    access = logging.getLogger("lmforge.serve.access")
    access.handlers[:] = [out]
    access.propagate = False


def serve(model_path: str, settings: ServeSettings) -> int:
    """Run the server until drained; returns the process exit code."""
    from lmforge.serve.app import ServerState, create_app
    from lmforge.serve.metrics import ServeMetrics
    from lmforge.serve.security import APIKeys

    settings.check()
    _configure_logging()
    keys = None if settings.allow_no_auth else APIKeys.load(settings.api_keys_file)
    if keys is not None and len(keys) == 0:
        raise SetupError("no API keys: pass --api-keys FILE or set LMFORGE_API_KEYS (or --allow-no-auth on a "
                         "trusted host)")
    if keys is None and settings.host not in ("127.0.0.1", "localhost", "::1"):
        raise SetupError(f"--allow-no-auth only on a loopback address, not --host {settings.host}")
    name = settings.served_model_name or _default_name(model_path)
    state = ServerState(settings, ServeMetrics(name))
    config = uvicorn.Config(create_app(state, keys), host=settings.host, port=settings.port, log_level="warning",
                            access_log=False, timeout_graceful_shutdown=5, timeout_keep_alive=5, lifespan="off")
    server = DrainingServer(config, state)
    loader = threading.Thread(target=server.load, args=(model_path, name), name="lmforge-loader", daemon=True)
    loader.start()
    server.run()
    if state.scheduler is not None:
        state.scheduler.stop()
    return server.exit_code


def _default_name(model_path: str) -> str:
    from pathlib import Path

    return Path(model_path).resolve().name


class DrainingServer(uvicorn.Server):
    """uvicorn.Server with lmforge's own signal handling (uvicorn's would re-raise the signal at exit, so the
    process would not exit 0) and the background model load."""

    def __init__(self, config: uvicorn.Config, state):
        super().__init__(config)
        self.state, self.exit_code = state, 0

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        old = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)

    def _on_signal(self, sig, frame) -> None:
        if self.state.phase == "draining":
            log.warning("second signal: exiting without waiting")
            self.should_exit = self.force_exit = True
            return
        threading.Thread(target=self._drain, name="lmforge-drain", daemon=True).start()

    def _drain(self) -> None:
        drain(self.state, self.state.settings.drain_timeout)
        self.should_exit = True

    def load(self, model_path: str, name: str) -> None:
        code = load_into(self.state, model_path, name)
        if code:
            self.exit_code = code
            self.should_exit = True


def drain(state, timeout: float) -> None:
    previous, state.phase = state.phase, "draining"
    sched = state.scheduler
    log.info("draining: %d request(s) in flight, up to %.0fs", sched.in_flight() if sched else 0, timeout)
    end = time.monotonic() + timeout
    while sched is not None and sched.in_flight() and time.monotonic() < end:
        time.sleep(0.05)
    if sched is not None and sched.in_flight():
        log.warning("drain timeout: ending %d request(s) with an error", sched.in_flight())
        sched.abort_all("server shut down before the request finished (drain timeout)")
        time.sleep(0.5)
    # Linger: a client whose stream just ended may already be sending its next request on that kept-alive
    # connection; it gets a 503 + Connection: close now, not a reset when the listener closes.
    time.sleep(DRAIN_LINGER_S)
    if previous == "loading":
        log.info("drained while loading")


def load_into(state, model_path: str, name: str) -> Optional[int]:
    """Background load; on failure logs the reason and returns the exit code (2 user error, 1 bug)."""
    from lmforge.serve.loader import load_model

    s = state.settings
    try:
        if s.threads:
            import torch

            torch.set_num_threads(s.threads)
        loaded = load_model(model_path, s.dtype, s.checkpoint, name)
        sched = build_scheduler(loaded, s, state.metrics)
        sched.start()
        deadline = time.monotonic() + max(s.probe_timeout, 60.0)
        while sched.probe_ok_at is None and sched.probe_error is None and time.monotonic() < deadline:
            time.sleep(0.02)
    except UserError as e:
        log.error("cannot serve %s: %s%s", model_path, e, f" ({e.hint})" if e.hint else "")
        state.phase = "failed"
        return 2
    except Exception:
        log.exception("loading %s failed", model_path)
        state.phase = "failed"
        return 1
    state.loaded, state.scheduler = loaded, sched
    if state.phase == "loading":
        state.phase = "ready"
        log.info("serving '%s' on http://%s:%d", name, s.host, s.port)
    return None
