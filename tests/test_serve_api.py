"""A live ``lmforge serve`` on 127.0.0.1 (tiny random-weight run folder), driven by the official ``openai``
client and by raw HTTP: completions, chat, streaming, n>1, logprobs, stop strings, auth, 30+ malformed
requests, and batched == unbatched at temperature 0."""

import json
import threading

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from tests.helpers.serve import API_KEY, OTHER_KEY, LiveServer, build_tiny, save_run

MODEL = "run"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve_api")
    srv = LiveServer(save_run(tmp / MODEL), tmp)
    try:
        srv.wait_ready()
        yield srv
    finally:
        code = srv.stop()
    assert code == 0, srv.log()
    log = srv.log()
    assert API_KEY not in log and OTHER_KEY not in log  # keys never logged
    access = [json.loads(line) for line in log.splitlines() if line.startswith('{"ts"')]
    assert access and all({"request_id", "key_id", "method", "path", "status", "latency_ms"} <= set(a) for a in access)
    assert all(a["key_id"] in ("-", "other") or a["key_id"].startswith("key-") for a in access)
    assert any(a.get("completion_tokens") for a in access)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def tok():
    return build_tiny()[1]


def test_completion_with_openai_client(client, tok):
    r = client.completions.create(model=MODEL, prompt="hello world", max_tokens=8, temperature=0)
    assert r.object == "text_completion" and r.model == MODEL and r.id.startswith("cmpl-")
    assert len(r.choices) == 1 and r.choices[0].finish_reason == "length" and isinstance(r.choices[0].text, str)
    assert r.usage.prompt_tokens == len(tok.encode("hello world"))
    assert r.usage.completion_tokens == 8 and r.usage.total_tokens == r.usage.prompt_tokens + 8
    again = client.completions.create(model=MODEL, prompt="hello world", max_tokens=8, temperature=0)
    assert again.choices[0].text == r.choices[0].text


def test_several_prompts_and_token_ids(client, tok):
    r = client.completions.create(model=MODEL, prompt=["hello", "the fox"], n=2, max_tokens=3, temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text and r.choices[2].text == r.choices[3].text  # greedy
    assert r.usage.prompt_tokens == len(tok.encode("hello")) + len(tok.encode("the fox"))
    by_ids = client.completions.create(model=MODEL, prompt=tok.encode("the fox"), max_tokens=3, temperature=0)
    assert by_ids.choices[0].text == r.choices[2].text


def test_chat_n_and_seed(client):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, n=3, temperature=1.0, seed=11, max_tokens=6)
    assert r.object == "chat.completion" and [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.message.role == "assistant" for c in r.choices)
    assert r.usage.completion_tokens == 18  # random weights: no EOS in 6 tokens, 3 choices
    texts = [c.message.content for c in r.choices]
    assert len(set(texts)) > 1  # each choice draws from seed + index
    again = client.chat.completions.create(model=MODEL, messages=msgs, n=3, temperature=1.0, seed=11, max_tokens=6)
    assert [c.message.content for c in again.choices] == texts


def test_streaming_equals_non_streaming(client):
    kw = dict(model=MODEL, max_tokens=10, temperature=0)
    full = client.completions.create(prompt="the quick", **kw).choices[0].text
    chunks = list(client.completions.create(prompt="the quick", stream=True, stream_options={"include_usage": True}, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    msgs = [{"role": "user", "content": "fox?"}]
    chat = client.chat.completions.create(messages=msgs, **kw).choices[0].message.content
    stream = list(client.chat.completions.create(messages=msgs, stream=True, n=2, **kw))
    assert stream[0].choices[0].delta.role == "assistant"
    for i in (0, 1):
        got = "".join(c.choices[0].delta.content or "" for c in stream if c.choices and c.choices[0].index == i)
        assert got == chat


def test_raw_sse_format(server):
    status, body, headers = server.post("/v1/chat/completions", {
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0,
        "stream": True})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    text = body.decode()
    assert text.endswith("data: [DONE]\n\n")
    events = [e for e in text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    objs = [json.loads(e[6:]) for e in events[:-1]]
    assert {o["object"] for o in objs} == {"chat.completion.chunk"}
    assert len({o["id"] for o in objs}) == 1
    assert objs[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert objs[-1]["choices"][0]["finish_reason"] == "length" and objs[-1]["choices"][0]["delta"] == {}


def test_logprobs_and_stop(client):
    r = client.completions.create(model=MODEL, prompt="hello", max_tokens=5, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 5 == len(lp.token_logprobs) == len(lp.top_logprobs)
    assert all(v <= 0 for v in lp.token_logprobs) and all(len(t) == 2 for t in lp.top_logprobs)
    assert "".join(lp.tokens) == r.choices[0].text
    c = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=3,
                                       temperature=0, logprobs=True, top_logprobs=3)
    assert len(c.choices[0].logprobs.content) == 3 and len(c.choices[0].logprobs.content[0].top_logprobs) == 3
    text = client.completions.create(model=MODEL, prompt="the lazy", max_tokens=20, temperature=0).choices[0].text
    stop = text[5:8]
    cut = client.completions.create(model=MODEL, prompt="the lazy", max_tokens=20, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == text[:text.find(stop)]


def test_models(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_auth(server):
    for path in ("/v1/models", "/metrics", "/v1/no-such-route"):
        status, body, headers = server.get(path, auth=False)
        assert status == 401 and json.loads(body)["error"]["type"] == "authentication_error", path
        assert headers.get("www-authenticate") == "Bearer"
        status, body, _ = server.get(path, auth=False, headers={"Authorization": "Bearer wrong-key-0000000000"})
        assert status == 403 and json.loads(body)["error"]["code"] == "invalid_api_key", path
        assert b"wrong-key" not in body
    assert server.get("/v1/models", auth=False, headers={"Authorization": "Basic abc"})[0] == 401
    assert server.get("/v1/models", auth=False, headers={"Authorization": f"Bearer {OTHER_KEY}"})[0] == 200
    for probe in ("/health", "/ready"):  # probes are open, with or without (any) key
        assert server.get(probe, auth=False)[0] == 200
        assert server.get(probe, auth=False, headers={"Authorization": "Bearer wrong-key-0000000000"})[0] == 200
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="not-a-real-key-123456", max_retries=0)
    with pytest.raises(openai.PermissionDeniedError):
        bad.completions.create(model=MODEL, prompt="x", max_tokens=1)


C, CH = "/v1/completions", "/v1/chat/completions"
OK = {"model": MODEL, "prompt": "hello", "max_tokens": 2}
MSG = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
MALFORMED = [  # (name, path, body dict | raw bytes, expected status)
    ("bad json", C, b'{"model": "run", "prompt": ', 400),
    ("invalid utf-8", C, b'{"model":"run","prompt":"\xff\xfe"}', 400),
    ("lone surrogate", C, b'{"model":"run","prompt":"\\ud800"}', 400),
    ("NaN constant", C, b'{"model":"run","prompt":"x","temperature":NaN}', 400),
    ("empty body", C, b"", 400),
    ("array body", C, b"[1, 2]", 400),
    ("missing model", C, {"prompt": "x"}, 400),
    ("missing prompt", C, {"model": MODEL}, 400),
    ("prompt number", C, {**OK, "prompt": 5}, 400),
    ("empty prompt", C, {**OK, "prompt": ""}, 400),
    ("empty token list", C, {**OK, "prompt": [[]]}, 400),
    ("token id outside vocab", C, {**OK, "prompt": [1, 99999]}, 400),
    ("max_tokens string", C, {**OK, "max_tokens": "5"}, 400),
    ("max_tokens negative", C, {**OK, "max_tokens": -1}, 400),
    ("max_tokens zero", C, {**OK, "max_tokens": 0}, 400),
    ("max_tokens float", C, {**OK, "max_tokens": 1.5}, 400),
    ("max_tokens bool", C, {**OK, "max_tokens": True}, 400),
    ("max_tokens past context", C, {**OK, "max_tokens": 500}, 400),
    ("huge prompt", C, {**OK, "prompt": "hello world " * 3000}, 400),
    ("temperature negative", C, {**OK, "temperature": -0.5}, 400),
    ("temperature too high", C, {**OK, "temperature": 3}, 400),
    ("temperature string", C, {**OK, "temperature": "hot"}, 400),
    ("top_p zero", C, {**OK, "top_p": 0}, 400),
    ("top_p above one", C, {**OK, "top_p": 1.5}, 400),
    ("top_k below -1", C, {**OK, "top_k": -2}, 400),
    ("n zero", C, {**OK, "n": 0}, 400),
    ("n too large", C, {**OK, "n": 100}, 400),
    ("unknown field", C, {**OK, "foo": 1}, 400),
    ("stream not bool", C, {**OK, "stream": "yes"}, 400),
    ("stop list of ints", C, {**OK, "stop": [1]}, 400),
    ("seed string", C, {**OK, "seed": "x"}, 400),
    ("logprobs too many", C, {**OK, "logprobs": 10}, 400),
    ("frequency_penalty unsupported", C, {**OK, "frequency_penalty": 0.5}, 400),
    ("echo unsupported", C, {**OK, "echo": True}, 400),
    ("logit_bias unsupported", C, {**OK, "logit_bias": {"1": 5}}, 400),
    ("stream_options unknown key", C, {**OK, "stream": True, "stream_options": {"x": 1}}, 400),
    ("unknown model", C, {**OK, "model": "gpt-4"}, 404),
    ("empty messages", CH, {**MSG, "messages": []}, 400),
    ("messages not a list", CH, {**MSG, "messages": "hi"}, 400),
    ("bad role", CH, {**MSG, "messages": [{"role": "robot", "content": "hi"}]}, 400),
    ("content number", CH, {**MSG, "messages": [{"role": "user", "content": 3}]}, 400),
    ("content missing", CH, {**MSG, "messages": [{"role": "user"}]}, 400),
    ("image content part", CH, {**MSG, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, 400),
    ("tools unsupported", CH, {**MSG, "tools": [{"type": "function"}]}, 400),
    ("top_logprobs too many", CH, {**MSG, "logprobs": True, "top_logprobs": 50}, 400),
    ("oversize body", C, {**OK, "prompt": "x" * (1 << 21)}, 413),
]


@pytest.mark.parametrize("name,path,body,status", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_request(server, name, path, body, status):
    raw = body if isinstance(body, bytes) else None
    got, data, _ = server.post(path, None if raw is not None else body, raw=raw)
    assert got == status, (name, data[:300])
    err = json.loads(data)["error"]
    assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str) and err["message"]
    assert "Traceback" not in err["message"] and API_KEY not in data.decode("utf-8", "replace")


def test_other_http_errors_and_still_serving(server, client):
    assert len(MALFORMED) >= 30
    for method, path, ctype, want in (("GET", C, None, 405), ("POST", "/v1/embeddings", "application/json", 404),
                                      ("POST", C, "text/plain", 415)):
        got, data, _ = server.request(method, path, raw=json.dumps(OK).encode() if ctype else None,
                                      headers={"Content-Type": ctype} if ctype else None)
        assert got == want and "error" in json.loads(data)
    r = client.completions.create(model=MODEL, prompt="still here", max_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3
    assert server.get("/ready", auth=False)[0] == 200


def test_context_limit_message_names_the_limit(server):
    status, data, _ = server.post(C, {**OK, "prompt": "hello world " * 4, "max_tokens": 125})
    err = json.loads(data)["error"]
    assert status == 400 and "maximum context length is 128 tokens" in err["message"]
    assert err["code"] == "context_length_exceeded" and err["param"] == "max_tokens"
    status, data, _ = server.post(C, {**OK, "max_tokens": 500})
    assert status == 400 and "limit of 128" in json.loads(data)["error"]["message"]


def test_batched_equals_unbatched_over_http(server):
    prompts = ["hello", "the quick brown fox", "def add(a, b):", "café", "lazy dog " * 5, "x"]
    body = {"model": MODEL, "max_tokens": 12, "temperature": 0, "logprobs": 0}

    def ask(p):
        status, data, _ = server.post(C, {**body, "prompt": p})
        assert status == 200
        ch = json.loads(data)["choices"][0]
        return ch["text"], ch["logprobs"]["token_logprobs"]

    alone = [ask(p) for p in prompts]
    together = [None] * len(prompts)

    def worker(i):
        together[i] = ask(prompts[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert together == alone  # text and logprobs exactly equal, whatever shared the batch


def test_refuses_to_start_without_keys_or_open_on_a_public_address(monkeypatch, tmp_path):
    from lmforge.errors import ConfigError, SetupError
    from lmforge.serve.security import KEYS_ENV, APIKeys
    from lmforge.serve.server import serve
    from lmforge.serve.settings import ServeSettings

    monkeypatch.delenv(KEYS_ENV, raising=False)
    with pytest.raises(SetupError, match="no API keys"):
        serve(str(tmp_path), ServeSettings())
    with pytest.raises(SetupError, match="loopback"):
        serve(str(tmp_path), ServeSettings(allow_no_auth=True, host="0.0.0.0"))
    with pytest.raises(ConfigError, match="16 characters"):
        APIKeys.parse(["short"], "keys.txt")
    keys = APIKeys.parse(["# comment", "", API_KEY, f"ops:{OTHER_KEY}"], "keys.txt")
    assert keys.identify(OTHER_KEY) == "ops" and keys.identify(API_KEY).startswith("key-")
    assert keys.identify(API_KEY[:-1]) is None and keys.identify("") is None
