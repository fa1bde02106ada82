"""Live-server lifecycle: an HF folder without a chat template, client disconnect frees the slot, a full
queue answers 503 + Retry-After, per-key rate limit, /ready goes 503 when decode fails or stalls (fault hook),
and SIGTERM drains in-flight streams then exits 0."""

import http.client
import json
import signal
import threading
import time

import pytest

pytest.importorskip("fastapi")

from lmforge.serve.runner import FAULT_ENV
from tests.helpers.serve import API_KEY, OTHER_KEY, LiveServer, save_hf_folder, save_run

MODEL = "hf"


def _until(cond, timeout=15.0, every=0.1):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(every)
    return False


def _open_stream(srv, body, key=API_KEY) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    conn.request("POST", "/v1/completions", json.dumps({**body, "stream": True}),
                 {"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    return conn, conn.getresponse()


def _read_events(resp) -> list[str]:
    return [e for e in resp.read().decode().split("\n\n") if e]


@pytest.fixture(scope="module")
def slow(tmp_path_factory):
    """Serves an HF folder; FAULT_ENV points at a file the tests write to slow or break decode."""
    tmp = tmp_path_factory.mktemp("serve_life")
    fault = tmp / "fault"
    srv = LiveServer(save_hf_folder(tmp / MODEL), tmp, env={FAULT_ENV: str(fault)},
                     extra=["--max-batch", "4", "--max-queue", "2", "--rate-limit-rps", "0.2",
                            "--rate-limit-burst", "30"])
    srv.fault = fault
    try:
        srv.wait_ready()
        yield srv
    finally:
        fault.unlink(missing_ok=True)
        code = srv.stop()
    assert code == 0, srv.log()


def test_hf_folder_serves_and_chat_without_template_is_400(slow):
    status, data, _ = slow.post("/v1/completions", {"model": MODEL, "prompt": "hello", "max_tokens": 4,
                                                    "temperature": 0})
    assert status == 200 and json.loads(data)["usage"]["completion_tokens"] == 4
    status, data, _ = slow.post("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}]})
    err = json.loads(data)["error"]
    assert status == 400 and err["code"] == "no_chat_template" and "chat template" in err["message"]


def test_disconnect_mid_stream_frees_the_slot(slow):
    slow.fault.write_text("stall 0.03")
    try:
        aborted0 = slow.metric("vllm:request_success_total", finished_reason="abort")
        conn, resp = _open_stream(slow, {"model": MODEL, "prompt": "hello", "max_tokens": 100, "temperature": 0})
        assert resp.status == 200 and resp.readline().startswith(b"data: ")
        assert slow.metric("vllm:num_requests_running") == 1 and slow.metric("vllm:kv_cache_usage_perc") > 0
        conn.sock.close()  # the client goes away mid-stream (100 tokens would take ~3 s)
        conn.close()
        assert _until(lambda: slow.metric("vllm:num_requests_running") == 0
                      and slow.metric("vllm:kv_cache_usage_perc") == 0, timeout=10)
        assert slow.metric("vllm:request_success_total", finished_reason="abort") == aborted0 + 1
    finally:
        slow.fault.unlink(missing_ok=True)


def test_disconnect_of_a_non_streaming_request_frees_the_slot(slow):
    slow.fault.write_text("stall 0.03")
    try:
        conn = http.client.HTTPConnection("127.0.0.1", slow.port, timeout=30)
        conn.request("POST", "/v1/completions", json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 100,
                                                            "temperature": 0}),
                     {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})
        assert _until(lambda: slow.metric("vllm:num_requests_running") == 1, timeout=5)
        conn.sock.close()
        conn.close()
        assert _until(lambda: slow.metric("vllm:num_requests_running") == 0
                      and slow.metric("vllm:kv_cache_usage_perc") == 0, timeout=2.5)  # 100 tokens take ~3 s
    finally:
        slow.fault.unlink(missing_ok=True)


def test_full_queue_answers_503_with_retry_after(slow):
    slow.fault.write_text("stall 0.2")  # every request outlives the arrivals, even on a loaded machine
    results = []

    def ask():
        results.append(slow.post("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 8}))

    try:
        threads = [threading.Thread(target=ask) for _ in range(9)]  # 4 running + 2 queued + 3 refused
        for t in threads:
            t.start()
            time.sleep(0.02)
        for t in threads:
            t.join(30)
    finally:
        slow.fault.unlink(missing_ok=True)
    codes = sorted(r[0] for r in results)
    assert set(codes) <= {200, 503} and 503 in codes, codes
    # never more admitted than batch + queue at any moment (how many of the first arrivals make the first
    # batch before decode starts stalling depends on the machine's load)
    assert 1 <= codes.count(200) <= 6, codes
    refused = [r for r in results if r[0] == 503][0]
    assert int(refused[2]["retry-after"]) >= 1 and json.loads(refused[1])["error"]["type"] == "server_error"


def test_rate_limit_per_key(slow):
    other = {"Authorization": f"Bearer {OTHER_KEY}"}
    codes = [slow.get("/v1/models", auth=False, headers=other)[0] for _ in range(32)]
    assert codes[:30] == [200] * 30 and codes[-1] == 429
    status, data, headers = slow.get("/v1/models", auth=False, headers=other)
    assert status == 429 and int(headers["retry-after"]) >= 1 and json.loads(data)["error"]["type"] == "rate_limit_error"
    assert slow.get("/v1/models")[0] == 200  # another key keeps its own bucket


def test_ready_goes_503_when_decode_fails_or_stalls(slow):
    assert slow.get("/ready", auth=False)[0] == 200
    slow.fault.write_text("error")
    try:
        assert _until(lambda: slow.get("/ready", auth=False)[0] == 503, timeout=10)
        assert json.loads(slow.get("/ready", auth=False)[1])["reason"] == "decode probe failed"
        assert slow.get("/health", auth=False)[0] == 200  # alive: a restart is not what fixes a bad step
        assert slow.metric("lmforge:probe_failures_total") >= 1
        status, data, _ = slow.post("/v1/completions", {"model": MODEL, "prompt": "hello", "max_tokens": 4})
        err = json.loads(data)["error"]
        assert status == 500 and err["type"] == "server_error" and "Traceback" not in err["message"]
    finally:
        slow.fault.unlink()
    assert _until(lambda: slow.get("/ready", auth=False)[0] == 200, timeout=10)
    slow.fault.write_text("stall 4")  # the engine hangs in a step: the probe goes stale
    try:
        assert _until(lambda: slow.get("/ready", auth=False)[0] == 503, timeout=10)
    finally:
        slow.fault.unlink()
    assert _until(lambda: slow.get("/ready", auth=False)[0] == 200, timeout=15)


def _stream_worker(srv, out: list, i: int, max_tokens: int):
    conn, resp = _open_stream(srv, {"model": "run", "prompt": f"hello {i}", "max_tokens": max_tokens,
                                    "temperature": 0})
    first = resp.readline()
    out.append((resp.status, [first.decode().strip()] + _read_events(resp)))
    conn.close()


@pytest.mark.parametrize("drain_timeout,finishes", [(20, True), (0.5, False)])
def test_sigterm_drains_in_flight_then_exits_0(tmp_path, drain_timeout, finishes):
    fault = tmp_path / "fault"
    srv = LiveServer(save_run(tmp_path / "run"), tmp_path, env={FAULT_ENV: str(fault)},
                     extra=["--drain-timeout", str(drain_timeout)])
    try:
        srv.wait_ready()
        fault.write_text("stall 0.03")
        out: list = []
        tokens = 40 if finishes else 110  # ~1.5 s vs ~4 s of decoding at 30 ms a step
        threads = [threading.Thread(target=_stream_worker, args=(srv, out, i, tokens)) for i in range(4)]
        for t in threads:
            t.start()
        assert _until(lambda: srv.metric("vllm:num_requests_running") == 4, timeout=10)
        srv.proc.send_signal(signal.SIGTERM)
        assert _until(lambda: srv.get("/ready", auth=False)[0] == 503, timeout=5)
        late = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)  # HTTP/1.1: keep-alive unless told
        late.request("POST", "/v1/completions", json.dumps({"model": "run", "prompt": "late", "max_tokens": 2}),
                     {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
        resp = late.getresponse()
        message = json.loads(resp.read())["error"]["message"]
        assert resp.status == 503 and resp.getheader("retry-after") and "shutting down" in message
        assert resp.getheader("connection") == "close"  # the client takes its next request to another replica
        late.close()
        for t in threads:
            t.join(30)
        assert srv.proc.wait(30) == 0
    finally:
        fault.unlink(missing_ok=True)
        if srv.proc.poll() is None:
            srv.stop(signal.SIGKILL)
    assert len(out) == 4 and all(status == 200 for status, _ in out)
    done = [ev for _, ev in out if ev[-1] == "data: [DONE]"]
    for events in done:  # a stream that ended normally ran to its own end (length, or EOS)
        assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] in ("length", "stop")
    cut = [ev for _, ev in out if ev[-1] != "data: [DONE]"]
    for events in cut:  # past the drain timeout a stream ends with an error event, never silently
        assert json.loads(events[-1][6:])["error"]["code"] == "shutting_down", events[-3:]
    if finishes:
        assert len(done) == 4  # 0 failed, 0 lost
    else:
        assert cut  # 110 tokens at 30 ms a step cannot all finish within 0.5 s
