"""The HTTP layer on its own: a real uvicorn server around a scripted fake Engine and Registry that follow the
serve contract, so limits, error shapes, streaming, stop strings, cancellation, admin auth and metrics are
checked exactly and fast. The real engine and model are driven in test_openai_client.py."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import pytest
from conftest import LazyImport, LiveServer, make_tokenizer

from peftkit.serve.app import create_app
from peftkit.serve import QueueFull
from peftkit.serve.registry import AdapterError, check_name
from peftkit.serve.textstream import TextStream

openai = LazyImport("openai")  # imported by the first test that uses it

SCRIPT = "The sky is blue. one two three, hi there! An apple."


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


class FakeHandle:
    def __init__(self, engine: FakeEngine, req, ids: list[int]) -> None:
        self.engine, self.req, self.ids = engine, req, ids
        self.prompt_tokens, self.completion_tokens = len(req.prompt_ids), 0
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.cancelled = False

    async def stream(self):
        try:
            for token in self.ids[:self.req.max_tokens]:
                await asyncio.sleep(self.engine.delay)
                if self.cancelled:
                    self.finish_reason = "cancelled"
                    return
                self.completion_tokens += 1
                yield token
                if token in self.req.stop_token_ids:
                    self.finish_reason = "stop"
                    return
            self.finish_reason = "length"
        finally:
            self.engine.running.discard(self)

    def cancel(self) -> None:
        if not self.cancelled and self.finish_reason is None:
            self.engine.cancelled.append(self)
        self.cancelled = True


class FakeRegistry:
    def __init__(self, names=("alpha", "beta"), broken=("broken",)) -> None:
        self.known, self.broken, self.loaded = set(names), set(broken), {}

    def names(self) -> list[str]:
        return sorted(self.known | self.broken)

    def has(self, name: str) -> bool:
        return name in self.known | self.broken

    def acquire(self, name: str) -> None:
        check_name(name)
        if name in self.broken:
            raise AdapterError(422, f"adapter {name!r}: adapter_model.safetensors is corrupt; save the adapter again")
        if name not in self.known:
            raise AdapterError(404, f"unknown adapter {name!r}; GET /v1/models lists the adapters served")
        self.loaded[name] = {"name": name, "rank": 4, "slot": len(self.loaded)}

    def load(self, name: str) -> dict:
        self.acquire(name)
        return self.loaded[name]

    def unload(self, name: str) -> bool:
        check_name(name)
        return self.loaded.pop(name, None) is not None

    def info(self) -> list[dict]:
        return list(self.loaded.values())

    def stats(self) -> dict:
        return {"loaded": len(self.loaded), "loads": 7, "evictions": 2, "reloads": 1, "load_errors": 3, "bytes": 10}


class FakeEngine:
    """Replies with SCRIPT (an adapter prefixes its name), one token per `delay` seconds."""

    def __init__(self, tokenizer, registry: FakeRegistry, max_queue: int = 64, delay: float = 0.001) -> None:
        self.tokenizer, self.registry, self.max_queue, self.delay = tokenizer, registry, max_queue, delay
        self.running: set[FakeHandle] = set()
        self.cancelled: list[FakeHandle] = []
        self.submitted: list = []

    def submit(self, req) -> FakeHandle:
        if req.adapter is not None:
            self.registry.acquire(req.adapter)
        if len(self.running) >= self.max_queue:
            raise QueueFull(f"{len(self.running)} requests queued, limit {self.max_queue}")
        text = (f"{req.adapter}: " if req.adapter else "") + SCRIPT
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
        handle = FakeHandle(self, req, ids)
        self.running.add(handle)
        self.submitted.append(req)
        return handle

    def stats(self) -> dict:
        return {"queue_depth": 0, "active": len(self.running), "steps": 5, "batched_rows": 9}


@pytest.fixture
def serve(tokenizer):
    """serve(**create_app options) -> (LiveServer, FakeEngine); servers stop at the end of the test."""
    opened = []

    def start(max_queue: int = 64, delay: float = 0.001, **options):
        engine = FakeEngine(tokenizer, FakeRegistry(), max_queue=max_queue, delay=delay)
        options = {"model_name": "tiny", "context_length": 256, "stop_token_ids": (tokenizer.eos_token_id,),
                   "max_tokens_limit": 64, **options}
        server = LiveServer(create_app(engine, engine.registry, tokenizer, **options)).__enter__()
        opened.append(server)
        return server, engine

    yield start
    for server in opened:
        server.__exit__(None, None, None)


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=20)


def expected(tokenizer, adapter: str | None = None, n: int | None = None) -> str:
    text = (f"{adapter}: " if adapter else "") + SCRIPT
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer.decode(ids[:n] if n else ids)


# --- text streams -----------------------------------------------------------------------------------------
def test_textstream_equals_full_decode(tokenizer):
    for text in [SCRIPT, "héllo wörld — ünïcode ✓ 日本語 🙂 done", "   spaces\n\nand\ttabs  "]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        stream = TextStream(tokenizer)
        pieces = [stream.push(t) for t in ids] + [stream.finish()]
        assert "".join(pieces) == tokenizer.decode(ids) == text
        assert "\ufffd" not in "".join(pieces[:-1])  # an incomplete character is never shown


def test_textstream_stop_strings_are_cut_and_held_back(tokenizer):
    ids = tokenizer(SCRIPT, add_special_tokens=False)["input_ids"]
    stream = TextStream(tokenizer, ["two three", "apple"])
    shown = ""
    for t in ids:
        shown += stream.push(t)
        assert "two" not in shown  # held back while it may begin the stop sequence
        if stream.stopped:
            break
    shown += stream.finish()
    assert stream.stopped and shown == "The sky is blue. one " == stream.text
    assert stream.push(ids[-1]) == ""  # nothing after a stop
    earliest = TextStream(tokenizer, ["apple", "sky"])
    assert "".join(earliest.push(t) for t in ids) + earliest.finish() == "The "
    assert "".join(TextStream(tokenizer, ["zzz"]).push(t) for t in ids[:3]) == tokenizer.decode(ids[:3])


# --- generation through the app ---------------------------------------------------------------------------
def test_completion_chat_and_models(serve, tokenizer):
    server, engine = serve()
    c = client(server)
    assert [m.id for m in c.models.list().data] == ["tiny", "alpha", "beta", "broken"]
    assert c.models.retrieve("alpha").id == "alpha"
    out = c.completions.create(model="tiny", prompt="Say hi", max_tokens=64, temperature=0)
    assert out.choices[0].text == expected(tokenizer) and out.choices[0].finish_reason == "stop"
    n_prompt = len(tokenizer("Say hi", add_special_tokens=False)["input_ids"])
    n_reply = len(tokenizer(SCRIPT, add_special_tokens=False)["input_ids"]) + 1  # and the end token
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == \
        (n_prompt, n_reply, n_prompt + n_reply)
    short = c.completions.create(model="alpha", prompt="Say hi", max_tokens=3, temperature=0)
    assert short.choices[0].text == expected(tokenizer, "alpha", 3) and short.choices[0].finish_reason == "length"
    assert engine.submitted[-1].adapter == "alpha" and engine.submitted[-1].max_tokens == 3
    chat = c.chat.completions.create(model="beta", messages=[{"role": "system", "content": "Be brief."},
                                                            {"role": "user", "content": "Say hi"}], temperature=0)
    assert chat.choices[0].message.content == expected(tokenizer, "beta")
    rendered = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\n"
    assert engine.submitted[-1].prompt_ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert engine.submitted[-1].stop_token_ids == (tokenizer.eos_token_id,)
    assert engine.submitted[-1].max_tokens == 64  # chat default: the server's limit (within the context)


def test_streaming_equals_non_streamed_and_ends_with_done(serve, tokenizer):
    server, _ = serve()
    c = client(server)
    for stop in (None, ["two three"]):
        full = c.completions.create(model="alpha", prompt="x", max_tokens=40, stop=stop).choices[0]
        chunks = list(c.completions.create(model="alpha", prompt="x", max_tokens=40, stop=stop, stream=True))
        assert "".join(ch.choices[0].text for ch in chunks) == full.text
        assert chunks[-1].choices[0].finish_reason == full.finish_reason == "stop"
        chat_full = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], stop=stop)
        chat_chunks = list(c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                                     stop=stop, stream=True, stream_options={"include_usage": True}))
        assert chat_chunks[0].choices[0].delta.role == "assistant"
        assert "".join(ch.choices[0].delta.content or "" for ch in chat_chunks if ch.choices) \
            == chat_full.choices[0].message.content
        assert chat_chunks[-1].usage.completion_tokens == chat_full.usage.completion_tokens
    assert full.text == "alpha: The sky is blue. one "
    with httpx.stream("POST", server.url + "/v1/completions",
                      json={"model": "tiny", "prompt": "x", "max_tokens": 2, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("text/event-stream") and lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)


def test_n_and_prompt_lists_give_indexed_choices(serve, tokenizer):
    server, engine = serve()
    out = client(server).completions.create(model="alpha", prompt=["a", "b c"], n=2, max_tokens=4, seed=5)
    assert [ch.index for ch in out.choices] == [0, 1, 2, 3]
    assert [r.seed for r in engine.submitted] == [5, 6, 5, 6]  # choice j of each prompt samples with seed + j
    assert out.usage.prompt_tokens == sum(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in ["a", "b c"])
    ids = client(server).completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=2)
    assert engine.submitted[-1].prompt_ids == [5, 6, 7] and ids.usage.prompt_tokens == 3


def test_client_disconnect_cancels_the_request(serve):
    server, engine = serve(delay=0.05)
    with httpx.stream("POST", server.url + "/v1/completions",
                      json={"model": "alpha", "prompt": "x", "max_tokens": 60, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # leave after the first chunk
    deadline = time.monotonic() + 5
    while not engine.cancelled and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(engine.cancelled) == 1 and engine.cancelled[0].completion_tokens < 10
    # a non-streamed request whose client goes away is cancelled too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json={"model": "beta", "prompt": "x", "max_tokens": 60},
                   timeout=0.3)
    deadline = time.monotonic() + 5
    while len(engine.cancelled) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(engine.cancelled) == 2 and engine.cancelled[1].req.adapter == "beta"


# --- errors and limits ------------------------------------------------------------------------------------
def post(server, path: str, body, **kw) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=10, **kw)


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and {"message", "type", "code"} <= set(body["error"]), body
    return body["error"]


def test_adapter_errors_keep_their_status(serve):
    server, _ = serve()
    c = client(server)
    with pytest.raises(openai.NotFoundError, match="unknown adapter 'nope'"):
        c.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.UnprocessableEntityError, match="corrupt"):
        c.chat.completions.create(model="broken", messages=[{"role": "user", "content": "x"}])
    for bad in ["../alpha", "/etc/passwd", "a/b", "..", "%2e%2e"]:
        r = post(server, "/v1/completions", {"model": bad, "prompt": "x"})
        assert r.status_code in (400, 404), bad
        assert "plain name" in error_of(r)["message"] or "unknown adapter" in error_of(r)["message"]
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("nope")


@pytest.mark.parametrize("body, field", [
    ({"model": "tiny", "prompt": "x", "max_tokens": 65}, "max_tokens"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"model": "tiny", "prompt": "x", "temperature": 3}, "temperature"),
    ({"model": "tiny", "prompt": "x", "n": 17}, "n"),
    ({"model": "tiny", "prompt": "x", "frobnicate": 1}, "frobnicate"),
    ({"model": "tiny", "prompt": "x", "logprobs": 2}, "logprobs"),
    ({"model": "tiny", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"model": "tiny", "prompt": ""}, "prompt"),
    ({"model": "tiny", "prompt": []}, "prompt"),
    ({"model": "tiny", "prompt": [1, 99999]}, "prompt"),
    ({"model": "tiny", "prompt": [5] * 250, "max_tokens": 10, "stream": True}, "max_tokens"),  # context 256
    ({"prompt": "x"}, "model"),
    ({"model": "tiny", "messages": []}, "messages"),
])
def test_bad_fields_are_400_naming_the_field(serve, body, field):
    server, _ = serve()
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    r = post(server, path, body)
    assert r.status_code == 400, r.text
    assert field in error_of(r)["message"]


def test_invalid_json_and_unknown_routes(serve):
    server, _ = serve()
    r = httpx.post(server.url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in error_of(r)["message"]
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and "/v1/models" in error_of(r)["message"]


def test_body_limit_by_header_and_by_bytes(serve):
    server, _ = serve(max_body_bytes=2000)
    big = {"model": "tiny", "prompt": "x" * 3000}
    r = post(server, "/v1/completions", big)
    assert r.status_code == 413 and "--max-body-bytes" in error_of(r)["message"]
    with pytest.raises(openai.APIStatusError) as info:
        client(server).completions.create(model="tiny", prompt="x" * 3000)
    assert info.value.status_code == 413

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(10):
            yield b" " * 500
    r = httpx.post(server.url + "/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "counted as received" in error_of(r)["message"]
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:  # refused before any body byte
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100000000\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 413")
    under = {"model": "tiny", "prompt": [5] * 200, "max_tokens": 4, "user": "u" * 1200}  # ~1.8 kB: served
    assert 1500 < len(json.dumps(under)) < 2000 and post(server, "/v1/completions", under).status_code == 200


def test_queue_full_is_429(serve):
    server, engine = serve(max_queue=1, delay=0.05)
    with httpx.stream("POST", server.url + "/v1/completions",
                      json={"model": "tiny", "prompt": "x", "max_tokens": 30, "stream": True}) as r:
        lines = r.iter_lines()  # kept: dropping the iterator would close the connection
        next(lines)
        with pytest.raises(openai.RateLimitError, match="queue is full"):
            client(server).completions.create(model="tiny", prompt="x")
    # a request with several choices that does not fit is refused whole, and what it started is cancelled
    server2, engine2 = serve(max_queue=2)
    r = post(server2, "/v1/completions", {"model": "tiny", "prompt": "x", "n": 3})
    assert r.status_code == 429 and len(engine2.cancelled) == 2


# --- admin, health, metrics -------------------------------------------------------------------------------
def test_admin_routes_are_absent_without_a_token(serve):
    server, _ = serve()
    assert httpx.get(server.url + "/admin/adapters", headers={"Authorization": "Bearer x"}).status_code == 404
    assert httpx.post(server.url + "/admin/adapters/alpha/load").status_code == 404


def test_admin_needs_the_bearer_token(serve):
    server, engine = serve(admin_token="s3cret")
    url = server.url + "/admin/adapters"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}, {"Authorization": "Basic s3cret"}):
        r = httpx.post(url + "/alpha/load", headers=headers)
        assert r.status_code == 401 and error_of(r)["type"] == "authentication_error"
    auth = {"Authorization": "Bearer s3cret"}
    r = httpx.post(url + "/alpha/load", headers=auth)
    assert r.status_code == 200 and r.json()["name"] == "alpha"
    listing = httpx.get(url, headers=auth).json()
    assert [a["name"] for a in listing["data"]] == ["alpha"] and "beta" in listing["available"]
    assert httpx.delete(url + "/alpha", headers=auth).json() == {"name": "alpha", "unloaded": True}
    assert httpx.delete(url + "/alpha", headers=auth).status_code == 404
    assert httpx.post(url + "/nope/load", headers=auth).status_code == 404
    assert httpx.post(url + "/broken/load", headers=auth).status_code == 422
    assert httpx.post(url + "/%2e%2e/load", headers=auth).status_code == 400
    assert httpx.post(url + "/..%2Fx/load", headers=auth).status_code == 404  # never reaches a name


def test_api_key_guards_the_v1_endpoints_for_openai_clients_and_leaves_probes_open(serve):
    server, _ = serve(api_key="k3y-for-v1", admin_token="s3cret")
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0, timeout=20)
    with pytest.raises(openai.AuthenticationError, match="--api-key"):
        bad.completions.create(model="tiny", prompt="Say hi", max_tokens=5)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    for headers in ({}, {"Authorization": "k3y-for-v1"}, {"Authorization": "Bearer k3y-for-v1x"}):
        r = httpx.post(server.url + "/v1/chat/completions", json={"model": "tiny", "messages": "not a list"},
                       headers=headers)  # refused before the body is validated
        assert r.status_code == 401 and error_of(r)["code"] == "invalid_api_key", headers
    good = openai.OpenAI(base_url=server.url + "/v1", api_key="k3y-for-v1", max_retries=0, timeout=20)
    assert good.completions.create(model="tiny", prompt="Say hi", max_tokens=5).choices[0].text
    assert [m.id for m in good.models.list().data][0] == "tiny"
    for probe in ("/health", "/metrics"):
        assert httpx.get(server.url + probe).status_code == 200
    admin = httpx.get(server.url + "/admin/adapters", headers={"Authorization": "Bearer k3y-for-v1"})
    assert admin.status_code == 401  # the admin endpoints keep their own token


def test_api_key_guards_the_app_mounted_under_a_prefix_or_behind_a_root_path(tokenizer):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    engine = FakeEngine(tokenizer, FakeRegistry(), max_queue=8, delay=0.001)
    app = create_app(engine, engine.registry, tokenizer, model_name="tiny", context_length=256, max_tokens_limit=64,
                     api_key="k3y-for-v1", log_level=None)
    outer = FastAPI()
    outer.mount("/api/play", app)  # as peftkit ui mounts it
    with TestClient(outer) as c:
        assert c.get("/api/play/v1/models").status_code == 401 and c.get("/api/play/health").status_code == 200
    with TestClient(app, root_path="/proxy") as c:
        assert c.get("/proxy/v1/models").status_code == 401
        key = {"Authorization": "Bearer k3y-for-v1"}
        assert c.get("/proxy/v1/models", headers=key).status_code == 200


def test_health_and_metrics(serve):
    server, _ = serve()
    c = client(server)
    c.completions.create(model="alpha", prompt="Say hi", max_tokens=5)
    list(c.completions.create(model="tiny", prompt="Say hi", max_tokens=5, stream=True))
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="zzz", prompt="x")
    post(server, "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 999})
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["adapters_loaded"] == 1
    r = httpx.get(server.url + "/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text
    for line in ['peftkit_requests_total{endpoint="completions",model="alpha",status="200"} 1.0',
                 'peftkit_requests_total{endpoint="completions",model="tiny",status="200"} 1.0',
                 'peftkit_requests_total{endpoint="completions",model="_invalid",status="404"} 1.0',
                 'peftkit_requests_total{endpoint="completions",model="tiny",status="400"} 1.0',
                 'peftkit_completion_tokens_total{model="alpha"} 5.0',
                 'peftkit_adapters_loaded 1.0', 'peftkit_adapter_loads_total 7.0', 'peftkit_adapter_evictions_total 2.0',
                 'peftkit_adapter_reloads_total 1.0', 'peftkit_adapter_load_errors_total 3.0', 'peftkit_queue_depth 0.0',
                 'peftkit_active_rows 0.0', 'peftkit_request_duration_seconds_count{endpoint="completions"} 4.0']:
        assert line in text, line
    assert 'peftkit_prompt_tokens_total{model="alpha"}' in text


# --- command-line helpers ---------------------------------------------------------------------------------
def test_cli_helpers():
    from peftkit.serve.cli import is_loopback, parse_adapters, served_name

    assert all(is_loopback(h) for h in ["127.0.0.1", "127.3.2.1", "::1", "[::1]", "localhost"])
    assert not any(is_loopback(h) for h in ["0.0.0.0", "10.1.2.3", "::", "example.com", "192.168.0.1"])
    assert parse_adapters(["a=/x/y", "b=rel/dir=odd"]) == {"a": "/x/y", "b": "rel/dir=odd"}
    for bad in (["noequals"], ["=path"], ["name="], ["a=x", "a=y"]):
        with pytest.raises(ValueError, match="--adapter"):
            parse_adapters(bad)
    assert served_name("smollm2", None) == "smollm2" and served_name("/models/my-base/", None) == "my-base"
    assert served_name("/models/my-base", "prod") == "prod"


def test_serve_help_names_every_option():
    from peftkit.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["serve"]
    text = sub.format_help()
    for option in ["--model", "--adapter-dir", "--adapter", "--host", "--port", "--allow-remote", "--max-loaded",
                   "--max-rank", "--max-batch", "--max-queue", "--max-tokens-limit", "--max-body-bytes",
                   "--admin-token", "--dtype", "--quantize"]:
        assert option in text
    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.max_loaded, args.max_rank, args.max_batch, args.max_queue,
            args.max_tokens_limit, args.max_body_bytes, args.dtype) == \
        ("127.0.0.1", 8000, 64, 64, 16, 256, 2048, 1 << 20, "auto")
