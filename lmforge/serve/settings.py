"""Every knob of ``lmforge serve`` in one dataclass (the CLI fills it; tests build it directly)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from lmforge.errors import ConfigError


@dataclass
class ServeSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys_file: Optional[str] = None  # else env LMFORGE_API_KEYS
    allow_no_auth: bool = False
    served_model_name: Optional[str] = None
    dtype: str = "auto"  # or float32, bfloat16, float16 (loader.serving_dtype)
    checkpoint: Optional[str] = None
    threads: Optional[int] = None
    # batching and memory
    max_batch: int = 16  # concurrent sequences (every choice of every request counts)
    max_queue: int = 64  # waiting requests before 503 + Retry-After
    block_size: int = 16
    kv_cache_tokens: Optional[int] = None  # None: max_batch × context length
    prefill_tokens_per_step: int = 2048  # prompt tokens prefilled between two decode steps (>= 1 prompt)
    batch_invariant: str = "auto"  # "auto": pad decode rows so outputs never depend on the batch; "off"
    # limits
    max_prompt_tokens: Optional[int] = None  # None: context length - 1
    max_tokens_cap: Optional[int] = None  # None: context length
    max_n: int = 8
    request_timeout: float = 300.0
    max_body_bytes: int = 1 << 20
    rate_limit_rps: float = 0.0  # per API key; 0 = off
    rate_limit_burst: int = 20
    # lifecycle
    probe_interval: float = 5.0
    probe_timeout: float = 20.0
    drain_timeout: float = 30.0
    access_log: bool = True

    def check(self) -> "ServeSettings":
        positive = {"max_batch": self.max_batch, "max_queue": self.max_queue, "block_size": self.block_size,
                    "prefill_tokens_per_step": self.prefill_tokens_per_step, "max_n": self.max_n,
                    "request_timeout": self.request_timeout, "max_body_bytes": self.max_body_bytes,
                    "probe_interval": self.probe_interval, "probe_timeout": self.probe_timeout,
                    "rate_limit_burst": self.rate_limit_burst}
        for key, value in positive.items():
            if value <= 0:
                raise ConfigError(f"--{key.replace('_', '-')} must be > 0, got {value}")
        if self.drain_timeout < 0 or self.rate_limit_rps < 0:
            raise ConfigError("--drain-timeout and --rate-limit-rps must be >= 0")
        if self.batch_invariant not in ("auto", "off"):
            raise ConfigError(f"--batch-invariant must be 'auto' or 'off', got {self.batch_invariant!r}")
        from lmforge.hardware.precision import check_dtype_name

        check_dtype_name(self.dtype, "--dtype")
        if not 0 < self.port < 65536:
            raise ConfigError(f"--port must be in 1..65535, got {self.port}")
        return self
