"""Shared by the serving tests: a tiny random-weight model saved as an lmforge run folder and as an HF
folder, and a live ``lmforge serve`` subprocess on 127.0.0.1 with bounded waits."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Optional

API_KEY = "test-key-0123456789abcdef"
OTHER_KEY = "other-key-0123456789abcdef"
TEXTS = ["hello world, this is lmforge serving text.", "the quick brown fox jumps over the lazy dog!",
         "def add(a, b):\n    return a + b\n", "café naïve — ünïcödé ✓ 日本語"] * 30


def build_tiny(seed: int = 1):
    from lmforge.config import build_config
    from lmforge.data.tokenizer import train_tokenizer
    from lmforge.models import build_model

    tok = train_tokenizer(TEXTS, vocab_size=300)
    cfg = build_config({"model": {"preset": "tiny", "vocab_size": tok.vocab_size}})
    return build_model(cfg.model, seed=seed).eval(), tok, cfg


def save_run(folder: Path, seed: int = 1, chat: bool = True) -> Path:
    """An lmforge run folder (config.yaml, tokenizer.json, one checkpoint, optional chat template)."""
    from lmforge.config import build_config, save_config
    from lmforge.serve.chat import save_chat_template

    model, tok, cfg = build_tiny(seed)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = build_config({"run_dir": str(folder), "model": {"preset": "tiny", "vocab_size": tok.vocab_size}})
    save_config(cfg, folder / "config.yaml")
    tok.save(folder / "tokenizer.json")
    from lmforge.checkpoint import CheckpointManager

    CheckpointManager(folder, model=model).save(1)
    if chat:
        save_chat_template(folder)
    return folder


def save_hf_folder(folder: Path, seed: int = 1, chat: bool = False) -> Path:
    from lmforge.models.hf import save_hf
    from lmforge.serve.chat import save_chat_template

    model, tok, _ = build_tiny(seed)
    save_hf(model, folder)
    tok.save(folder / "tokenizer.json")
    if chat:
        save_chat_template(folder)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """``python -m lmforge serve`` in a subprocess; ``url``, ``get``, ``post`` and ``stop`` with timeouts."""

    def __init__(self, model: Path, tmp: Path, extra: Optional[list[str]] = None, env: Optional[dict] = None,
                 keys: tuple[str, ...] = (API_KEY, f"other:{OTHER_KEY}")):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        keyfile = tmp / f"keys-{self.port}.txt"
        keyfile.write_text("# test keys\n" + "\n".join(keys) + "\n")
        self.log_path = tmp / f"server-{self.port}.log"
        cmd = [sys.executable, "-m", "lmforge", "serve", str(model), "--port", str(self.port),
               "--api-keys", str(keyfile), "--threads", "1", "--probe-interval", "0.5", "--probe-timeout", "2",
               *(extra or [])]
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=full_env)

    def wait_ready(self, timeout: float = 60.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}:\n{self.log()}")
            try:
                if self.get("/ready", auth=False)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.log()}")

    def request(self, method: str, path: str, body=None, auth=True, headers=None, raw: Optional[bytes] = None,
                timeout: float = 30.0):
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        h = {"Content-Type": "application/json"} if data is not None else {}
        if auth:
            h["Authorization"] = f"Bearer {API_KEY}"
        h.update(headers or {})
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=h)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read(), {k.lower(): v for k, v in r.headers.items()}
        except urllib.error.HTTPError as e:
            return e.code, e.read(), {k.lower(): v for k, v in e.headers.items()}

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def post(self, path, body=None, **kw):
        return self.request("POST", path, body, **kw)

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels`` (0.0 when there is none yet)."""
        text = self.get("/metrics")[1].decode()
        total = 0.0
        for line in text.splitlines():
            m = re.match(r"^([^{\s]+)(?:\{(.*)\})? (\S+)$", line)
            if not m or m.group(1) != name:
                continue
            have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
            if all(have.get(k) == v for k, v in labels.items()):
                total += float(m.group(3))
        return total

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()

    def stop(self, sig=signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise
        finally:
            self._log.close()
