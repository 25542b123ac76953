"""End to end: the real registry, engine and app on a tiny Llama (float64, so greedy tokens are exact), PEFT-format
adapters in an --adapter-dir, driven by the official `openai` client. Every greedy reply is checked against a
reference computed without the server (peftkit.load_adapter, a full forward per token, no KV cache)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from conftest import ADAPTERS, LazyImport, LiveServer

import peftkit
from peftkit.serve import AdapterRegistry, Engine
from peftkit.serve.app import create_app
from peftkit.train.infer import chat_prompt

openai = LazyImport("openai")  # imported by the first test that uses it

torch.set_num_threads(1)
BASE = "tiny-llama"
PROMPTS = ["What colour is the sky?", "Count to three.", "Name a fruit.", "Say hi", "one two"]


class Reference:
    """Greedy replies of base and adapters, computed alone with peftkit's own LoRA layers."""

    def __init__(self, model_dir: str, adapters: dict) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
        for name, path in adapters.items():
            peftkit.load_adapter(self.model, path, name)
        self.stop = {self.tokenizer.eos_token_id}
        self.cache: dict = {}

    @torch.no_grad()
    def ids(self, adapter: str | None, prompt: list[int], max_tokens: int) -> list[int]:
        key = (adapter, tuple(prompt), max_tokens)
        if key not in self.cache:
            peftkit.set_active(self.model, [adapter] if adapter else [])
            seq, out = list(prompt), []
            for _ in range(max_tokens):
                token = int(self.model(torch.tensor([seq])).logits[0, -1].argmax())
                if token in self.stop:
                    break
                out.append(token)
                seq.append(token)
            self.cache[key] = out
        return self.cache[key]

    def text(self, model: str, prompt: str, max_tokens: int, chat: bool = False) -> str:
        rendered = chat_prompt(self.tokenizer, [{"role": "user", "content": prompt}]) if chat else prompt
        prompt_ids = self.tokenizer(rendered, add_special_tokens=False)["input_ids"]
        ids = self.ids(None if model == BASE else model, prompt_ids, max_tokens)
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


@pytest.fixture(scope="module")
def served_dir(adapter_sources, tmp_path_factory):
    root = tmp_path_factory.mktemp("served") / "adapters"
    root.mkdir()
    for name, src in adapter_sources.items():
        shutil.copytree(src, root / name)
    return root


@pytest.fixture(scope="module")
def reference(tiny_model_dir, adapter_sources):
    return Reference(tiny_model_dir, adapter_sources)


def start_server(model_dir: str, adapter_dir, **kw):
    """(LiveServer, engine, registry) for the real stack on the tiny model in float64."""
    from peftkit.models import load_model
    from peftkit.train.infer import stop_ids

    model, tokenizer = load_model(model_dir, dtype=torch.float64)
    registry = AdapterRegistry(model, adapter_dir=adapter_dir, max_loaded=kw.pop("max_loaded", 8), max_rank=16)
    engine = Engine(model, registry, max_batch=kw.pop("max_batch", 16), max_queue=kw.pop("max_queue", 64))
    engine.start()
    app = create_app(engine, registry, tokenizer, model_name=BASE, context_length=model.config.max_position_embeddings,
                     stop_token_ids=tuple(stop_ids(model, tokenizer)), **kw)
    return LiveServer(app).__enter__(), engine, registry


@pytest.fixture(scope="module")
def server(tiny_model_dir, served_dir):
    live, engine, registry = start_server(tiny_model_dir, served_dir, admin_token="tok")
    live.engine, live.registry = engine, registry
    yield live
    live.__exit__(None, None, None)
    engine.close()


def client_for(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture
def client(server):
    return client_for(server.url)


def test_models_list(client):
    assert [m.id for m in client.models.list().data] == [BASE, *sorted(ADAPTERS)]


@pytest.mark.parametrize("model", [BASE, *ADAPTERS])
def test_completion_and_chat_equal_the_reference(client, reference, model):
    out = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=12, temperature=0)
    assert out.choices[0].text == reference.text(model, PROMPTS[0], 12)
    assert out.usage.prompt_tokens == len(reference.tokenizer(PROMPTS[0], add_special_tokens=False)["input_ids"])
    assert 1 <= out.usage.completion_tokens <= 12
    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPTS[1]}],
                                          max_tokens=12, temperature=0)
    assert chat.choices[0].message.content == reference.text(model, PROMPTS[1], 12, chat=True)
    assert chat.model == model and chat.object == "chat.completion"


def test_adapters_change_the_output(reference):
    texts = {m: reference.text(m, PROMPTS[0], 12) for m in [BASE, *ADAPTERS]}
    assert len(set(texts.values())) == len(texts), texts  # otherwise the equality checks prove little


def test_streaming_equals_non_streamed(client):
    for model in (BASE, "beta"):
        full = client.completions.create(model=model, prompt=PROMPTS[2], max_tokens=20, temperature=0)
        chunks = list(client.completions.create(model=model, prompt=PROMPTS[2], max_tokens=20, temperature=0,
                                                stream=True))
        assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
        assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
        messages = [{"role": "user", "content": PROMPTS[3]}]
        chat = client.chat.completions.create(model=model, messages=messages, max_tokens=20, temperature=0)
        parts = list(client.chat.completions.create(model=model, messages=messages, max_tokens=20, temperature=0,
                                                    stream=True))
        assert "".join(p.choices[0].delta.content or "" for p in parts) == chat.choices[0].message.content


def test_seeded_sampling_and_n_choices_repeat(client):
    def sample():
        out = client.completions.create(model="gamma", prompt=PROMPTS[0], max_tokens=16, temperature=1.5, top_p=0.95,
                                        seed=7, n=2)
        return [c.text for c in out.choices]

    with ThreadPoolExecutor(3) as pool:  # alone or side by side, the same seed draws the same tokens
        first, *others = pool.map(lambda _: sample(), range(3))
    assert all(o == first for o in others) and first[0] != first[1]  # choice j samples with seed + j


def test_stop_sequences_cut_the_text(client, reference):
    full = reference.text("alpha", PROMPTS[4], 24)
    cut_at = full[3:6]  # a piece of the reply itself: the reply must end just before its first occurrence
    out = client.completions.create(model="alpha", prompt=PROMPTS[4], max_tokens=24, temperature=0, stop=[cut_at])
    assert out.choices[0].text == full[:full.index(cut_at)] and out.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="alpha", prompt=PROMPTS[4], max_tokens=24, temperature=0,
                                         stop=cut_at, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == out.choices[0].text


def test_concurrent_mixed_requests_equal_single_references(server, client, reference):
    jobs = [(model, PROMPTS[i % len(PROMPTS)], 8 + 3 * (i % 5), i % 3 == 0)
            for i, model in enumerate([BASE, *ADAPTERS] * 5)]
    expected = [reference.text(m, p, n, chat) for m, p, n, chat in jobs]  # before the clock starts
    steps, rows = server.engine.stats()["steps"], server.engine.stats()["batched_rows"]
    barrier = threading.Barrier(len(jobs))

    def run(job):
        model, prompt, n, chat = job
        barrier.wait()
        if chat:
            reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                                   max_tokens=n, temperature=0)
            return reply.choices[0].message.content
        return client.completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0).choices[0].text

    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(run, jobs))
    assert got == expected
    stats = server.engine.stats()
    assert (stats["batched_rows"] - rows) > (stats["steps"] - steps)  # rows really shared forwards


def test_unknown_adapter_and_bad_names(server, client, served_dir, adapter_sources, tmp_path):
    with pytest.raises(openai.NotFoundError, match="unknown adapter"):
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    outside = tmp_path / "outside"
    shutil.copytree(adapter_sources["alpha"], outside)
    os.symlink(outside, served_dir / "escape")  # a link out of the adapter directory
    try:
        assert "escape" not in [m.id for m in client.models.list().data]
        for bad in ["../alpha", "..", "%2e%2e", "%2e%2e%2falpha", "/etc/passwd", str(served_dir / "alpha"),
                    "alpha/../beta", "escape", "a\\b", ""]:
            r = httpx.post(server.url + "/v1/completions", json={"model": bad, "prompt": "x", "max_tokens": 2})
            assert r.status_code in (400, 404), (bad, r.status_code)
            assert set(r.json()) == {"error"}
            assert str(served_dir) not in r.text or str(served_dir) in bad  # no host path unless it was sent
    finally:
        os.unlink(served_dir / "escape")


def test_corrupt_adapter_while_others_run(server, client, reference, served_dir, adapter_sources):
    shutil.copytree(adapter_sources["gamma"], served_dir / "delta")
    assert client.completions.create(model="delta", prompt=PROMPTS[0], max_tokens=6, temperature=0).choices[0].text \
        == reference.text("gamma", PROMPTS[0], 6)
    jobs = [(model, PROMPTS[i % len(PROMPTS)]) for i, model in enumerate([BASE, "alpha", "beta", "gamma"] * 3)]
    expected = [reference.text(m, p, 30) for m, p in jobs]
    started = threading.Barrier(len(jobs) + 1)

    def run(job):
        started.wait()
        return client.completions.create(model=job[0], prompt=job[1], max_tokens=30, temperature=0).choices[0].text

    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(run, job) for job in jobs]
        started.wait()
        (served_dir / "delta" / "adapter_model.safetensors").write_bytes(b"\x00garbage, not safetensors" * 3)
        with pytest.raises(openai.UnprocessableEntityError, match="delta"):
            client.completions.create(model="delta", prompt=PROMPTS[0], max_tokens=6)
        got = [f.result() for f in futures]
    assert got == expected  # nobody else noticed
    shutil.copy(adapter_sources["beta"] / "adapter_model.safetensors", served_dir / "delta")
    shutil.copy(adapter_sources["beta"] / "adapter_config.json", served_dir / "delta")
    assert client.completions.create(model="delta", prompt=PROMPTS[0], max_tokens=6, temperature=0).choices[0].text \
        == reference.text("beta", PROMPTS[0], 6)  # fixed files are picked up by content
    metrics = httpx.get(server.url + "/metrics").text
    assert re.search(r"^peftkit_adapter_load_errors_total [1-9]", metrics, re.M)
    assert re.search(r"^peftkit_adapter_reloads_total [1-9]", metrics, re.M)


def test_admin_on_the_real_registry(server):
    url, auth = server.url + "/admin/adapters", {"Authorization": "Bearer tok"}
    assert httpx.get(url).status_code == 401
    info = httpx.post(url + "/gamma/load", headers=auth).json()
    assert info["name"] == "gamma" and info["rank"] == 2
    assert "gamma" in [a["name"] for a in httpx.get(url, headers=auth).json()["data"]]
    assert httpx.delete(url + "/gamma", headers=auth).json()["unloaded"] is True
    assert "gamma" not in [a["name"] for a in httpx.get(url, headers=auth).json()["data"]]
    assert httpx.post(url + "/%2e%2e/load", headers=auth).status_code == 400


def test_queue_full_evictions_and_metrics(tiny_model_dir, served_dir, reference):
    live, engine, registry = start_server(tiny_model_dir, served_dir, max_batch=1, max_queue=1, max_loaded=2,
                                          max_body_bytes=4096)
    try:
        c = client_for(live.url)
        for model in ["alpha", "beta", "gamma"]:  # three adapters through two slots
            assert c.completions.create(model=model, prompt="Say hi", max_tokens=4, temperature=0).choices[0].text \
                == reference.text(model, "Say hi", 4)
        barrier = threading.Barrier(8)

        def run(i):
            barrier.wait()
            try:
                return c.completions.create(model=BASE, prompt=PROMPTS[i % 5], max_tokens=80, temperature=0)
            except openai.RateLimitError as err:
                return err

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(run, range(8)))
        refused = [r for r in results if isinstance(r, openai.RateLimitError)]
        served = [(i, r) for i, r in enumerate(results) if not isinstance(r, Exception)]
        assert refused and served
        assert all(r.choices[0].text == reference.text(BASE, PROMPTS[i % 5], 80) for i, r in served)
        with pytest.raises(openai.APIStatusError) as too_big:
            c.completions.create(model=BASE, prompt="x " * 3000)
        assert too_big.value.status_code == 413
        text = httpx.get(live.url + "/metrics").text
        for pattern in [r'peftkit_requests_total\{endpoint="completions",model="tiny-llama",status="429"\} [1-9]',
                        r'peftkit_requests_total\{endpoint="completions",model="alpha",status="200"\} 1\.0',
                        r"peftkit_adapter_evictions_total [1-9]", r"peftkit_adapter_loads_total 3\.0",
                        r"peftkit_adapters_loaded 2\.0", r"peftkit_queue_depth 0\.0", r"peftkit_active_rows 0\.0",
                        r'peftkit_completion_tokens_total\{model="beta"\} 4\.0',
                        r'peftkit_request_duration_seconds_bucket\{endpoint="completions",le="\+Inf"\} [1-9]']:
            assert re.search(pattern, text), pattern
        assert httpx.get(live.url + "/health").json() == {"status": "ok", "model": BASE, "adapters_loaded": 2,
                                                          "queue_depth": 0}
    finally:
        live.__exit__(None, None, None)
        engine.close()


@pytest.mark.slow
def test_cli_serves_a_model_directory(tiny_model_dir, adapter_sources, tmp_path):
    """`peftkit serve` as a user runs it: a subprocess on port 0, an explicit --adapter, admin on."""
    cmd = [sys.executable, "-m", "peftkit.cli", "serve", "--model", tiny_model_dir, "--port", "0",
           "--adapter", f"mine={adapter_sources['beta']}", "--admin-token", "t", "--threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "listening on" in line:
                break
        found = re.search(r"listening on (http://127\.0\.0\.1:\d+)", "".join(lines))
        assert found, "".join(lines)
        c = client_for(found.group(1))
        name = os.path.basename(tiny_model_dir)
        assert [m.id for m in c.models.list().data] == [name, "mine"]
        out = c.chat.completions.create(model="mine", messages=[{"role": "user", "content": "Say hi"}], max_tokens=5)
        assert out.usage.completion_tokens >= 1
        assert httpx.get(found.group(1) + "/admin/adapters", headers={"Authorization": "Bearer t"}).status_code == 200
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C: a graceful stop
        rest = proc.communicate(timeout=20)[0]
    assert proc.returncode == 0 and "stopped" in rest and "Traceback" not in rest, rest


def test_cli_refuses_a_remote_host_without_the_flag(tiny_model_dir):
    from peftkit.cli import main

    assert main(["serve", "--model", tiny_model_dir, "--host", "0.0.0.0", "--port", "0"]) == 2
