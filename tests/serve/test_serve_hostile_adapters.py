"""Adapter folders dropped into a running server's --adapter-dir by someone else (issue 17, "Hardening"): a regex
that backtracks without end is a 422 naming it, and meanwhile /health answers and other adapters' streams go
on; configs that are not JSON objects, infinite alphas and oversized patterns are 422s too. A real uvicorn
server on the tiny Llama, driven with httpx and the `openai` client."""

from __future__ import annotations

import json
import shutil
import threading
import time

import httpx
import pytest
import torch
from conftest import LazyImport, LiveServer, tiny_llama

import peftkit
from peftkit.serve import AdapterRegistry, Engine
from peftkit.serve.app import create_app

openai = LazyImport("openai")

torch.set_num_threads(1)
# Eight groups matched back in reverse: minutes per module name for any backtracking matcher without a bound.
SLOW = "".join(f"(?P<g{i}>.*)" for i in range(8)) + "".join(f"(?P=g{i})" for i in reversed(range(8))) + r"\d"


@pytest.fixture(scope="module")
def served(tiny_model_dir, adapter_sources, tmp_path_factory):
    """(LiveServer, adapter_dir) with the session's 'alpha' adapter; tests add hostile ones next to it."""
    from peftkit.models import load_model
    from peftkit.train.infer import stop_ids

    root = tmp_path_factory.mktemp("hostile") / "adapters"
    root.mkdir()
    shutil.copytree(adapter_sources["alpha"], root / "alpha")
    model, tokenizer = load_model(tiny_model_dir, dtype=torch.float64)
    registry = AdapterRegistry(model, adapter_dir=root, max_loaded=4, max_rank=16)
    engine = Engine(model, registry, max_batch=8, max_queue=64)
    engine.start()
    app = create_app(engine, registry, tokenizer, model_name="tiny-llama",
                     context_length=model.config.max_position_embeddings, stop_token_ids=tuple(stop_ids(model, tokenizer)))
    live = LiveServer(app).__enter__()
    yield live, root
    live.__exit__(None, None, None)
    engine.close()


def drop_adapter(root, name, source, config=None, text=None):
    """Copy `source` into the adapter dir as `name`, with its config's fields updated by `config` or its whole
    config replaced by `text`."""
    shutil.copytree(source, root / name)
    path = root / name / "adapter_config.json"
    if config is not None:
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    if text is not None:
        path.write_text(text)
    return root / name


def complete(url, model, max_tokens=24) -> httpx.Response:
    return httpx.post(url + "/v1/completions", timeout=60,
                      json={"model": model, "prompt": "Count to three.", "max_tokens": max_tokens, "temperature": 0})


def streamed_text(url, model, max_tokens=24) -> str:
    parts = []
    with httpx.stream("POST", url + "/v1/completions", timeout=60,
                      json={"model": model, "prompt": "Count to three.", "max_tokens": max_tokens, "temperature": 0,
                            "stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                parts.append(json.loads(line[6:])["choices"][0]["text"])
    return "".join(parts)


def test_backtracking_pattern_is_a_422_while_the_server_keeps_serving(served, adapter_sources):
    live, root = served
    drop_adapter(root, "slowtarget", adapter_sources["alpha"], {"target_modules": SLOW})
    drop_adapter(root, "slowrank", adapter_sources["alpha"], {"rank_pattern": {SLOW: 2}})
    expected = complete(live.url, "alpha").json()["choices"][0]["text"]
    done = threading.Event()
    health: list[tuple[float, float]] = []  # (when, seconds to answer)
    streams: list[tuple[float, str]] = []  # (when finished, text)

    def poll_health():
        while not done.is_set():
            start = time.monotonic()
            assert httpx.get(live.url + "/health", timeout=10).json()["status"] == "ok"
            health.append((start, time.monotonic() - start))
            time.sleep(0.02)

    def stream_alpha():
        while not done.is_set():
            streams.append((time.monotonic(), streamed_text(live.url, "alpha")))

    workers = [threading.Thread(target=poll_health), threading.Thread(target=stream_alpha)]
    for w in workers:
        w.start()
    time.sleep(0.3)
    refused = {}
    try:
        for name, field in (("slowtarget", "target_modules"), ("slowrank", "rank_pattern key")):
            start = time.monotonic()
            r = complete(live.url, name)
            refused[name] = (start, time.monotonic())
            assert r.status_code == 422, r.text
            message = r.json()["error"]["message"]
            assert f"{field} {SLOW!r}" in message and "takes too long to match module names" in message, message
            assert str(root) not in message
    finally:
        done.set()
        for w in workers:
            w.join(timeout=60)
    print({name: round(end - start, 2) for name, (start, end) in refused.items()}, "s to refuse;",
          f"/health: {len(health)} answers, slowest {max(seconds for _, seconds in health):.3f} s;",
          f"{len(streams)} streams")
    for name, (start, end) in refused.items():
        assert end - start < 10, (name, end - start)  # 1 s of CPU time for the pattern; the rest is machine load
        during = [seconds for when, seconds in health if start <= when <= end]
        assert during and max(during) < 2.0, (name, during)  # /health answered all along
        assert any(start <= when <= end for when, _ in streams), name  # streams finished while it was matched
    assert max(seconds for _, seconds in health) < 2.0
    assert streams and all(text == expected for _, text in streams)
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
    start = time.monotonic()  # the refusal is remembered until the files change: no second matching
    with pytest.raises(openai.UnprocessableEntityError, match="takes too long"):
        client.completions.create(model="slowtarget", prompt="x", max_tokens=2)
    assert time.monotonic() - start < 1.0
    start = time.monotonic()  # the library refuses the same folder the same way
    with pytest.raises(ValueError, match="takes too long"):
        peftkit.load_adapter(tiny_llama(), root / "slowtarget")
    assert time.monotonic() - start < 10


@pytest.mark.parametrize("name, config, text, says", [
    ("listconfig", None, "[1, 2, 3]", "must hold a JSON object"),
    ("numberconfig", None, "42", "must hold a JSON object"),
    ("infalpha", {"lora_alpha": float("inf")}, None, "overflow"),
    ("deep", {"target_modules": "(" * 60 + "q" + ")" * 60}, None, "nests groups 60 deep"),
    ("bomb", {"rank_pattern": {"(?:a{65535}){65535}": 2}}, None, "counted repetitions"),
    ("long", {"target_modules": "q" * 1001}, None, "longer than 1000 characters"),
])
def test_hostile_configs_are_422s_naming_the_problem(served, adapter_sources, name, config, text, says):
    live, root = served
    drop_adapter(root, name, adapter_sources["alpha"], config, text)
    start = time.monotonic()
    r = complete(live.url, name)
    assert r.status_code == 422, r.text
    assert says in r.json()["error"]["message"] and repr(name) in r.json()["error"]["message"]
    assert time.monotonic() - start < 5
    assert httpx.get(live.url + "/health", timeout=5).status_code == 200
