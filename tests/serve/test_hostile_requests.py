"""Hostile and careless clients (issue 17, "Hardening"), each through a real uvicorn server set up as `peftkit
serve` sets it up (serve.cli.server_config: the read deadline, keep-alive), on 127.0.0.1 only. Every test checks
the status the client gets and that the server goes on serving everyone else meanwhile. A scripted engine
keeps the HTTP layer's timing exact; the real engine and tiny Llama check the sampling edge cases."""

from __future__ import annotations

import asyncio
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from conftest import LazyImport, LiveServer, make_tokenizer

from peftkit.serve import QueueFull
from peftkit.serve.app import create_app
from peftkit.serve.cli import server_config

openai = LazyImport("openai")  # imported by the first test that uses it

BIG = 1_000_000  # characters: a prompt just under the default --max-body-bytes (1 MiB)


# --- a real uvicorn server around a scripted engine ---------------------------------------------------------
def Served(app, **config) -> LiveServer:  # noqa: N802 - used like the class it was
    """uvicorn configured by serve.cli.server_config (read deadline, keep-alive), as `peftkit serve` runs it."""
    return LiveServer(app, server_config(app, lifespan="off", **config))


class TickHandle:
    """An engine request that yields the same token every `delay` seconds, max_tokens times."""

    def __init__(self, engine: TickEngine, req) -> None:
        self.engine, self.req = engine, req
        self.prompt_tokens, self.completion_tokens = len(req.prompt_ids), 0
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.cancelled = False

    async def stream(self):
        try:
            for _ in range(self.req.max_tokens):
                await asyncio.sleep(self.engine.delay)
                if self.cancelled:
                    self.finish_reason = "cancelled"
                    return
                self.completion_tokens += 1
                yield self.engine.token
            self.finish_reason = "length"
        finally:
            self.engine.running.discard(self)

    def cancel(self) -> None:
        self.cancelled = True


class TickEngine:
    """Follows the engine's contract: QueueFull beyond max_queue, and (to reach the 500 path) a RuntimeError
    for max_tokens == 13."""

    def __init__(self, tokenizer, delay: float = 0.01, max_queue: int = 64) -> None:
        self.token = tokenizer(" one", add_special_tokens=False)["input_ids"][0]
        self.delay, self.max_queue = delay, max_queue
        self.running: set[TickHandle] = set()
        self.submitted: list = []

    def submit(self, req) -> TickHandle:
        if req.max_tokens == 13:
            raise RuntimeError("the engine exploded")
        if len(self.running) >= self.max_queue:
            raise QueueFull(f"{len(self.running)} requests queued, limit {self.max_queue}")
        handle = TickHandle(self, req)
        self.running.add(handle)
        self.submitted.append(req)
        return handle

    def stats(self) -> dict:
        return {"queue_depth": 0, "active": len(self.running)}


class NoAdapters:
    """A registry without adapters (enough for the admin routes' listing)."""

    def names(self) -> list[str]:
        return []

    def has(self, name: str) -> bool:
        return False

    def info(self) -> list[dict]:
        return []

    def stats(self) -> dict:
        return {"loaded": 0}


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def serve(tokenizer):
    """serve(delay=..., max_queue=..., config={...}, **create_app options) -> (Served, TickEngine)."""
    opened = []

    def start(delay: float = 0.01, max_queue: int = 64, config: dict | None = None, **options):
        engine = TickEngine(tokenizer, delay=delay, max_queue=max_queue)
        options = {"model_name": "tiny", "context_length": 256, "stop_token_ids": (tokenizer.eos_token_id,),
                   "max_tokens_limit": 512, **options}
        server = Served(create_app(engine, NoAdapters(), tokenizer, **options), **(config or {})).__enter__()
        opened.append(server)
        return server, engine

    yield start
    for server in opened:
        server.__exit__(None, None, None)


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and {"message", "type", "code"} <= set(body["error"]), body
    return body["error"]


class Watch:
    """While running: a stream of `max_tokens` tokens read in a thread (the time of every chunk kept), and
    GET /health polled every 0.1 s (the latency of each kept). stop() ends both; the stream is closed."""

    def __init__(self, url: str, max_tokens: int) -> None:
        self.url, self.max_tokens = url, max_tokens
        self.chunks: list[float] = []
        self.health: list[float] = []
        self.errors: list[BaseException] = []
        self.done = threading.Event()
        self.threads = [threading.Thread(target=self._stream, daemon=True),
                        threading.Thread(target=self._poll, daemon=True)]

    def _stream(self) -> None:
        body = {"model": "tiny", "prompt": "x", "max_tokens": self.max_tokens, "stream": True}
        try:
            with httpx.stream("POST", self.url + "/v1/completions", json=body, timeout=30) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        self.chunks.append(time.monotonic())
                    if self.done.is_set():
                        return
        except BaseException as err:  # noqa: BLE001 - reported by the test
            self.errors.append(err)

    def _poll(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self.done.is_set():
                t0 = time.monotonic()
                try:
                    assert client.get(self.url + "/health").status_code == 200
                except BaseException as err:  # noqa: BLE001 - reported by the test
                    self.errors.append(err)
                    return
                self.health.append(time.monotonic() - t0)
                time.sleep(0.1)

    def __enter__(self) -> Watch:
        for thread in self.threads:
            thread.start()
        deadline = time.monotonic() + 10
        while len(self.chunks) < 3 and not self.errors and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(self.chunks) >= 3 and self.health, f"the stream or /health did not start: {self.errors}"
        return self

    def __exit__(self, *exc) -> None:
        self.until = time.monotonic()
        self.done.set()
        for thread in self.threads:
            thread.join(timeout=30)

    def longest_gap(self) -> float:
        """The longest wait for the stream's next chunk while the load ran."""
        times = [t for t in self.chunks if t <= self.until] + [self.until]
        return max(b - a for a, b in zip(times, times[1:]))


def hostile_bodies(n: int) -> list[tuple[str, dict]]:
    """n requests of about 1 MB of text each: completions (one prompt, two prompts) and chat."""
    words = "lorem ipsum dolor sit amet " * (BIG // 27)
    kinds = [("/v1/completions", {"model": "tiny", "prompt": words, "max_tokens": 1}),
             ("/v1/chat/completions", {"model": "tiny", "max_tokens": 1,
                                       "messages": [{"role": "user", "content": words}]}),
             ("/v1/completions", {"model": "tiny", "prompt": [words[:BIG // 2], words[BIG // 2:]], "max_tokens": 1})]
    return [kinds[i % len(kinds)] for i in range(n)]


def send_all(url: str, bodies: list[tuple[str, dict]]) -> list[tuple[httpx.Response, float]]:
    """The requests sent at once (one connection each); (response, seconds) per request."""
    def one(item):
        path, body = item
        t0 = time.monotonic()
        r = httpx.post(url + path, json=body, timeout=120)
        return r, time.monotonic() - t0

    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(one, bodies))


# --- item 2: huge prompts stall nobody --------------------------------------------------------------------
def test_oversized_prompts_are_refused_before_tokenizing_while_a_stream_runs(serve):
    server, engine = serve(delay=0.03)  # context 256: at most 256 x 32 = 8192 characters are tokenized
    with Watch(server.url, max_tokens=200) as watch:
        for _ in range(2):
            results = send_all(server.url, hostile_bodies(3))
            for r, seconds in results:
                assert r.status_code == 400, r.text
                assert "8192 characters" in error_of(r)["message"] and seconds < 2, (seconds, r.text)
    print(f"\noversized prompts: /health at most {max(watch.health):.3f} s, longest stream gap "
          f"{watch.longest_gap():.3f} s")
    assert not watch.errors and max(watch.health) < 2 and watch.longest_gap() < 2
    assert engine.submitted[-1].max_tokens == 200  # none of them reached the engine
    within = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "a" * 8000})
    assert within.status_code == 400 and "context length of 256" in error_of(within)["message"]  # judged by tokens
    short = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "hello", "max_tokens": 2})
    assert short.status_code == 200


def test_tokenizing_long_prompts_stalls_no_stream_and_no_health_check(serve):
    """A context so large that 1 MB prompts are tokenized (seconds each, one at a time): the event loop never
    waits for that, so streams keep flowing and /health answers."""
    server, engine = serve(delay=0.02, context_length=10**6, max_tokens_limit=10**6)
    with Watch(server.url, max_tokens=2000) as watch:
        results = send_all(server.url, hostile_bodies(3))
    print(f"\ntokenizing 3 x 1 MB: took {max(s for _, s in results):.1f} s; /health at most {max(watch.health):.3f} s, "
          f"longest stream gap {watch.longest_gap():.3f} s")
    assert [r.status_code for r, _ in results] == [200, 200, 200], [r.text[:200] for r, _ in results]
    assert not watch.errors and max(watch.health) < 2 and watch.longest_gap() < 2
    assert len(engine.submitted) == 1 + 1 + 1 + 2  # the stream, then 4 prompts: each was tokenized and served


# --- item 7: lone surrogates ------------------------------------------------------------------------------
SURROGATES = [
    ("/v1/completions", b'{"model": "tiny", "prompt": "a\\ud800b"}', "prompt"),
    ("/v1/completions", b'{"model": "tiny", "prompt": ["fine", "\\udfff"]}', "prompt"),
    ("/v1/completions", b'{"model": "tiny", "prompt": "x", "stop": ["\\ud83d"]}', "stop"),
    ("/v1/completions", b'{"model": "tiny\\ud800", "prompt": "x"}', "model"),
    ("/v1/completions", b'{"model": "tiny", "prompt": "x", "logit_bias": {"\\ud800": 1}}', "logit_bias"),
    ("/v1/completions", b'{"model": "tiny", "prompt": "raw \xed\xa0\x80 bytes"}', "prompt"),  # CESU-8 in the body
    ("/v1/chat/completions", b'{"model": "tiny", "messages": [{"role": "user", "content": "hi \\ud800"}]}',
     "messages"),
    ("/v1/chat/completions",
     b'{"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\udc00"}]}]}',
     "messages"),
]


def test_lone_surrogates_are_400_and_the_connection_stays_usable(serve):
    server, _ = serve()
    with httpx.Client(base_url=server.url, timeout=10, limits=httpx.Limits(max_connections=1)) as client:
        first = client.get("/health")
        connection = first.extensions["network_stream"]
        for path, body, field in SURROGATES:
            r = client.post(path, content=body, headers={"content-type": "application/json"})
            assert r.status_code == 400, (body, r.text)
            error = error_of(r)
            assert "lone UTF-16 surrogate" in error["message"] and error["param"] == field, (body, error)
            ok = client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2})
            assert ok.status_code == 200 and ok.extensions["network_stream"] is connection, body
        # an unexpected error (500) answers in OpenAI's shape and keeps the connection too
        r = client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 13})
        assert r.status_code == 500 and "engine exploded" in error_of(r)["message"]
        ok = client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2})
        assert ok.status_code == 200 and ok.extensions["network_stream"] is connection
    metrics = httpx.get(server.url + "/metrics").text
    assert metric(metrics, 500) == 1 and 'status="500"} 1.0' in metrics and 'status="500"} 2.0' not in metrics


# --- item 8: temperature and top_p near zero -------------------------------------------------------------
@pytest.fixture(scope="module")
def real_server(tiny_model_dir):
    """The real registry and engine on the tiny Llama in float32 (`peftkit serve`'s default dtype)."""
    from peftkit.models import load_model
    from peftkit.serve import AdapterRegistry, Engine
    from peftkit.train.infer import stop_ids

    model, tokenizer = load_model(tiny_model_dir, dtype=torch.float32)
    registry = AdapterRegistry(model, max_loaded=2, max_rank=16)
    engine = Engine(model, registry, max_batch=8, max_queue=64)
    engine.start()
    app = create_app(engine, registry, tokenizer, model_name="tiny", stop_token_ids=tuple(stop_ids(model, tokenizer)),
                     context_length=model.config.max_position_embeddings, max_tokens_limit=64)
    with Served(app) as server:
        yield server
    engine.close()


@pytest.mark.parametrize("sampling", [
    {"temperature": 1e-6}, {"temperature": 1e-39}, {"temperature": 1e-45}, {"temperature": 5e-324},
    {"temperature": 0.7, "top_p": 1e-9}, {"temperature": 1.0, "top_p": 1e-45}, {"temperature": 2.0, "top_p": 5e-324},
])
def test_tiny_temperature_or_top_p_is_greedy(real_server, sampling):
    client = openai.OpenAI(base_url=real_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    greedy = client.completions.create(model="tiny", prompt="Say hi", max_tokens=12, temperature=0)
    with ThreadPoolExecutor(2) as pool:  # the edge case next to an ordinary sampled request in the same batch
        other = pool.submit(client.completions.create, model="tiny", prompt="one two", max_tokens=12,
                            temperature=0.8, seed=3)
        out = client.completions.create(model="tiny", prompt="Say hi", max_tokens=12, seed=1, **sampling)
        chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Say hi"}],
                                              max_tokens=6, n=2, **sampling)
        assert other.result().choices[0].finish_reason in ("stop", "length")
    assert out.choices[0].text == greedy.choices[0].text and out.usage.completion_tokens >= 1
    assert chat.choices[0].message.content == chat.choices[1].message.content  # greedy: both choices agree
    assert httpx.get(real_server.url + "/health", timeout=10).status_code == 200


# --- item 9: connections, schema, retry hints, auth, accounting -----------------------------------------
def read_response(sock: socket.socket) -> bytes:
    """One whole HTTP response (with a Content-Length) from `sock`."""
    sock.settimeout(5)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(4096)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"content-length: (\d+)", head, re.IGNORECASE).group(1))
    while len(body) < length:
        body += sock.recv(4096)
    return head + b"\r\n\r\n" + body


def read_until_closed(sock: socket.socket, limit: float) -> tuple[bytes, float]:
    """What the server sent before closing `sock`, and how long it took to close (inf: not within `limit`)."""
    sock.settimeout(limit)
    data, t0 = b"", time.monotonic()
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except (TimeoutError, socket.timeout):
        return data, float("inf")
    except ConnectionResetError:
        pass
    return data, time.monotonic() - t0


def test_slow_and_silent_connections_are_closed_and_others_served(serve):
    server, _ = serve(delay=0.05, config={"read_timeout": 1.0, "keep_alive": 1.0})
    addr = ("127.0.0.1", server.port)
    silent = [socket.create_connection(addr) for _ in range(8)]
    partial = [socket.create_connection(addr) for _ in range(8)]
    for s in partial:
        s.sendall(b"GET /health HTT")
    no_body = [socket.create_connection(addr) for _ in range(4)]
    for s in no_body:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{\"model\":")
    trickle = socket.create_connection(addr)  # a byte every 0.2 s: always active, never done
    stop = threading.Event()

    def drip():
        for byte in b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200:
            if stop.wait(0.2):
                return
            try:
                trickle.sendall(bytes([byte]))
            except OSError:
                return
    dripper = threading.Thread(target=drip, daemon=True)
    dripper.start()
    t0 = time.monotonic()
    with httpx.Client(base_url=server.url, timeout=10) as client:
        # served meanwhile, including a stream that lasts longer than the read deadline
        assert client.get("/health").status_code == 200
        with client.stream("POST", "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 40,
                                                            "stream": True}) as r:
            assert r.status_code == 200 and [line for line in r.iter_lines() if line][-1] == "data: [DONE]"
        assert time.monotonic() - t0 > 1.5
        assert client.get("/health").status_code == 200  # the same kept-alive connection, idle less than 1 s
    try:
        for s in silent + partial:
            data, _ = read_until_closed(s, 5)
            assert data.startswith(b"HTTP/1.1 408"), data
        data, seconds = read_until_closed(trickle, 5)  # its next byte may meet a reset before the 408 is read
        assert seconds < 5 and (data.startswith(b"HTTP/1.1 408") or data == b""), data
        for s in no_body:  # headers in, body stalled: the app sees a disconnect, the connection closes
            data, _ = read_until_closed(s, 5)
            assert data == b"", data
        assert time.monotonic() - t0 < 6
    finally:
        stop.set()
        for s in silent + partial + no_body + [trickle]:
            s.close()
    assert httpx.get(server.url + "/health", timeout=5).status_code == 200


def test_each_connection_closes_within_the_read_deadline(serve):
    server, _ = serve(config={"read_timeout": 0.5, "keep_alive": 5.0})
    s = socket.create_connection(("127.0.0.1", server.port))
    s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
    data, seconds = read_until_closed(s, 5)
    s.close()
    assert data.startswith(b"HTTP/1.1 408") and 0.4 < seconds < 2, (data, seconds)
    # a kept-alive connection: its next request gets the deadline afresh from its first byte
    s = socket.create_connection(("127.0.0.1", server.port))
    s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert read_response(s).startswith(b"HTTP/1.1 200")
    time.sleep(0.8)  # longer than the deadline, while idle after a complete request: fine
    s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert read_response(s).startswith(b"HTTP/1.1 200")
    s.sendall(b"GET /hea")
    data, seconds = read_until_closed(s, 5)
    s.close()
    assert data.startswith(b"HTTP/1.1 408") and seconds < 2, (data, seconds)


def test_openapi_does_not_list_admin_routes(serve):
    for token in (None, "s3cret"):
        server, _ = serve(admin_token=token)
        paths = httpx.get(server.url + "/openapi.json").json()["paths"]
        assert "/v1/completions" in paths and not [p for p in paths if p.startswith("/admin")], paths
        listed = httpx.get(server.url + "/admin/adapters", headers={"Authorization": f"Bearer {token}"})
        assert listed.status_code == (200 if token else 404)


def test_queue_full_429_says_when_to_retry(serve):
    server, engine = serve(delay=0.05, max_queue=1)
    with httpx.stream("POST", server.url + "/v1/completions",
                      json={"model": "tiny", "prompt": "x", "max_tokens": 30, "stream": True}) as r:
        lines = r.iter_lines()
        next(lines)
        full = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "x"})
        assert full.status_code == 429 and full.headers["retry-after"] == "1"
        with pytest.raises(openai.RateLimitError) as info:
            openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0).completions.create(
                model="tiny", prompt="x")
        assert info.value.response.headers["retry-after"] == "1"
        assert httpx.get(server.url + "/health").status_code == 200
    deadline = time.monotonic() + 5
    while engine.running and time.monotonic() < deadline:  # the stream's client left: its request ends
        time.sleep(0.02)
    assert httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "x"}).status_code == 200


def test_bearer_scheme_is_case_insensitive(serve):
    server, _ = serve(admin_token="s3cret")
    url = server.url + "/admin/adapters"
    for header in ("Bearer s3cret", "bearer s3cret", "BEARER s3cret", "BeArEr   s3cret"):
        assert httpx.get(url, headers={"Authorization": header}).status_code == 200, header
    for header in ("Bearers3cret", "Basic s3cret", "bearer", "bearer S3CRET", "s3cret"):
        r = httpx.get(url, headers={"Authorization": header})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", header


def metric(text: str, status: int) -> float:
    found = re.search(rf'peftkit_requests_total{{endpoint="completions",model="tiny",status="{status}"}} (\S+)', text)
    return float(found.group(1)) if found else 0.0


def test_a_non_streamed_client_that_leaves_is_counted_499(serve):
    server, engine = serve(delay=0.05)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 60},
                   timeout=0.3)
    deadline = time.monotonic() + 5
    while metric(httpx.get(server.url + "/metrics").text, 499) < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    handle_gone = engine.submitted[-1]
    text = httpx.get(server.url + "/metrics").text
    assert metric(text, 499) == 1 and metric(text, 200) == 0, text
    assert not engine.running, "the engine request was not cancelled"
    r = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 3})
    assert r.status_code == 200 and handle_gone is not engine.submitted[-1]
    assert metric(httpx.get(server.url + "/metrics").text, 200) == 1
