"""The server's logs: one access line per request when it finishes (streams too), and one line per adapter
load, reload, eviction and refusal, naming the adapter and the reason."""

from __future__ import annotations

import logging
import re
import time

import httpx
import pytest
import torch
from conftest import LiveServer, make_tokenizer, tiny_llama
from serve_helpers import ADAPTERS, make_adapters, save_lora
from test_app import FakeEngine, FakeRegistry

from peftkit.serve import AdapterError, AdapterRegistry
from peftkit.serve import access
from peftkit.serve.access import shown
from peftkit.serve.app import create_app

torch.set_num_threads(1)
ACCESS, ADAPTER_LOG = "peftkit.serve.access", "peftkit.serve.adapters"
LINE = re.compile(r"(?P<method>\S+) (?P<path>\S+) model=(?P<model>\S+) status=(?P<status>\d+) "
                  r"prompt_tokens=(?P<prompt>\d+) completion_tokens=(?P<completion>\d+) latency_ms=(?P<ms>\d+)")


@pytest.fixture
def server(caplog):
    caplog.set_level(logging.INFO, logger="peftkit.serve")
    tokenizer = make_tokenizer()
    engine = FakeEngine(tokenizer, FakeRegistry())
    app = create_app(engine, engine.registry, tokenizer, model_name="tiny", context_length=256,
                     stop_token_ids=(tokenizer.eos_token_id,), max_tokens_limit=64)
    with LiveServer(app) as live:
        yield live


def access_lines(caplog, count: int) -> list[dict]:
    """The parsed access lines, once `count` of them are there (each is written just after its response)."""
    deadline = time.monotonic() + 10
    while True:
        lines = [r.getMessage() for r in caplog.records if r.name == ACCESS]
        if len(lines) >= count or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    parsed = [LINE.fullmatch(line) for line in lines]
    assert all(parsed), lines
    return [m.groupdict() for m in parsed]


def adapter_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == ADAPTER_LOG]


def test_one_access_line_per_completion_and_per_stream(server, caplog):
    body = {"model": "alpha", "prompt": "Say hi", "max_tokens": 5}
    reply = httpx.post(server.url + "/v1/completions", json=body, timeout=20).json()
    [line] = access_lines(caplog, 1)
    assert line["method"] == "POST" and line["path"] == "/v1/completions" and line["model"] == "alpha"
    assert line["status"] == "200" and int(line["prompt"]) == reply["usage"]["prompt_tokens"] > 0
    assert int(line["completion"]) == reply["usage"]["completion_tokens"] == 5

    chat = {"model": "tiny", "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=chat, timeout=20) as response:
        events = [e for e in response.iter_lines() if e.startswith("data: {")]
    usage = httpx.Response(200, content=events[-1][6:]).json()["usage"]
    lines = access_lines(caplog, 2)
    assert len(lines) == 2  # the stream's line is written once, at its end
    assert lines[1] == {**lines[1], "method": "POST", "path": "/v1/chat/completions", "model": "tiny", "status": "200",
                        "prompt": str(usage["prompt_tokens"]), "completion": "4"}


def test_refused_and_other_requests_get_a_line_too(server, caplog):
    assert httpx.post(server.url + "/v1/completions", json={"model": "nope", "prompt": "x"}).status_code == 404
    assert httpx.post(server.url + "/v1/completions", json={"model": "a\nb", "prompt": "x"}).status_code == 400
    assert httpx.get(server.url + "/health").status_code == 200
    unknown, forged, health = access_lines(caplog, 3)
    assert (unknown["model"], unknown["status"], unknown["completion"]) == ("nope", "404", "0")
    assert forged["model"] == "'a\\nb'" and forged["status"] == "400"  # quoted: no second line can be forged
    assert (health["method"], health["path"], health["model"], health["status"]) == ("GET", "/health", "-", "200")
    assert shown("plain-name") == "plain-name" and shown("two words") == "'two words'"


def test_adapter_load_reload_eviction_and_refusal_each_log_one_line(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="peftkit.serve")
    root = tmp_path / "adapters"
    make_adapters(root)
    registry = AdapterRegistry(tiny_llama().double(), root, max_loaded=1)

    registry.acquire("alpha").release()
    [load] = adapter_lines(caplog)
    assert load.startswith("adapter alpha loaded: rank 4")

    registry.acquire("alpha").release()  # unchanged: no line
    save_lora(root / "alpha", seed=99, **ADAPTERS["alpha"])  # rewritten with new weights
    registry.acquire("alpha").release()
    [reload] = adapter_lines(caplog)[1:]
    assert reload.startswith("adapter alpha reloaded, its files changed")

    registry.acquire("beta").release()  # max_loaded=1: alpha makes room
    evicted, loaded = adapter_lines(caplog)[2:]
    assert evicted.startswith("adapter alpha evicted") and "beta" in evicted and "--max-loaded 1" in evicted
    assert loaded.startswith("adapter beta loaded")

    weights = root / "gamma" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])  # corrupt
    for _ in range(2):  # the second refusal is remembered, not logged again
        with pytest.raises(AdapterError) as info:
            registry.acquire("gamma")
    [refused] = adapter_lines(caplog)[4:]
    assert refused == f"adapter gamma refused (422): {info.value.message}" and "corrupt" in refused
    assert [r.levelname for r in caplog.records if r.name == ADAPTER_LOG] == ["INFO"] * 4 + ["WARNING"]


def test_configure_logging_prints_to_stderr_once_and_respects_a_configured_logger(monkeypatch, capsys):
    logger = logging.getLogger("peftkit.serve")
    monkeypatch.setattr(logger, "handlers", [])
    monkeypatch.setattr(logger, "level", logging.NOTSET)
    access.configure_logging("info")
    access.configure_logging("info")  # a second app in the process adds no second handler
    assert len(logger.handlers) == 1 and logger.level == logging.INFO
    logging.getLogger(ACCESS).info("GET /health model=- status=200")
    assert capsys.readouterr().err.rstrip().endswith("INFO peftkit.serve.access: GET /health model=- status=200")
    monkeypatch.setattr(logger, "handlers", [logging.NullHandler()])
    monkeypatch.setattr(logger, "level", logging.NOTSET)
    access.configure_logging("info")  # configured by the application: left alone
    assert len(logger.handlers) == 1 and logger.level == logging.NOTSET
