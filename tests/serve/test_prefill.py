"""Prefill: chunked prefill equals the whole-prompt prefill exactly, a long prompt does not stall the running
rows, and a request whose client left costs no prefill (before it starts) or stops at the next chunk.
Tiny models built from configs; the long-context one is tiny_llama's weights with 8448 positions."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
import torch
from conftest import LiveServer, make_tokenizer, tiny_gpt2, tiny_llama
from serve_helpers import greedy, make_adapters, reference_model

from peftkit.serve import AdapterRegistry, Engine, GenRequest
from peftkit.serve.app import create_app
from peftkit.serve.prefill import admit_count

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    return make_adapters(tmp_path_factory.mktemp("adapters"))


def long_llama(vocab_size: int = 128, positions: int = 8448):
    """tiny_llama's architecture with room for an 8k-token prompt (the same weights when vocab_size=128:
    RoPE has none)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=positions,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def prompt(n: int, seed: int, vocab: int = 128) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run(engine: Engine, cases) -> list:
    """Submit (adapter, prompt, max_tokens) cases in two waves (the second joins while the first decodes)."""
    engine.start()
    try:
        first = [engine.submit(GenRequest(p, a, m)) for a, p, m in cases[:3]]
        tokens = first[0].tokens()
        next(tokens)
        handles = first + [engine.submit(GenRequest(p, a, m)) for a, p, m in cases[3:]]
        for h in handles:
            h.wait(60)
    finally:
        engine.close()
    return handles


def record_forwards(engine: Engine, monkeypatch) -> list[tuple[int, int]]:
    shapes: list[tuple[int, int]] = []
    real = engine._forward
    monkeypatch.setattr(engine, "_forward", lambda ids, *a: shapes.append(tuple(ids.shape)) or real(ids, *a))
    return shapes


def test_admit_count_keeps_each_whole_prefill_within_the_chunk():
    assert admit_count([5, 5, 5, 5], room=8, chunk=None) == 4  # chunking off: no budget
    assert admit_count([5, 5, 5, 5], room=3, chunk=None) == 3
    assert admit_count([5, 5, 5, 5], room=8, chunk=12) == 2  # 3 x 5 > 12: the third waits
    assert admit_count([3, 100, 4, 5], room=8, chunk=15) == 4  # 100 is chunked: taken as it comes; 3 x 5 fit
    assert admit_count([3, 100, 4, 5], room=8, chunk=12) == 3  # 3 x 5 do not
    assert admit_count([2, 9, 1], room=8, chunk=12) == 1  # 2 x 9 > 12, and the order is kept
    assert admit_count([12, 1], room=8, chunk=12) == 1  # the first always fits
    assert admit_count([], room=8, chunk=12) == 0


# (adapter, prompt length, max_tokens): prompts of one to five chunks of 8 tokens, and short ones
CASES = [("alpha", 37, 6), (None, 5, 12), ("beta", 17, 9), ("gamma", 40, 7), (None, 8, 5), ("alpha", 3, 10),
         ("beta", 9, 8)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_chunked_prefill_equals_the_whole_prefill_and_the_references(adapters, dtype, monkeypatch):
    cases = [(a, prompt(n, i), m) for i, (a, n, m) in enumerate(CASES)]
    runs, shapes = {}, {}
    for chunk in (8, None):
        model = tiny_llama().to(dtype)
        engine = Engine(model, AdapterRegistry(model, adapters=adapters, max_loaded=4), max_batch=8,
                        prefill_chunk=chunk)
        shapes[chunk] = record_forwards(engine, monkeypatch)
        runs[chunk] = run(engine, cases)
        if chunk:
            assert engine.stats()["prefill_chunks"] == 5 + 3 + 5 + 2  # the 37-, 17-, 40- and 9-token prompts
            assert engine.stats()["prefill_tokens"] == sum(len(p) for _, p, _ in cases)
    assert all(b * t <= 8 for b, t in shapes[8] if t > 1)  # no prefill forward above the chunk
    assert max(t for _, t in shapes[None]) == 40  # unchunked: whole prompts
    reference = reference_model(adapters, dtype=dtype)
    tol = 1e-6 if dtype == torch.float64 else 1e-4  # the reference takes log_softmax in float32
    for (adapter, p, m), chunked, whole in zip(cases, runs[8], runs[None]):
        assert chunked.token_ids == whole.token_ids == greedy(reference, adapter, p, m)[0], (adapter, len(p))
        assert chunked.finish_reason == whole.finish_reason == "length"
        torch.testing.assert_close(torch.tensor(chunked.token_logprobs), torch.tensor(whole.token_logprobs),
                                   atol=1e-12 if dtype == torch.float64 else 1e-5, rtol=0)
        torch.testing.assert_close(torch.tensor(chunked.token_logprobs, dtype=torch.float64),
                                   torch.tensor(greedy(reference, adapter, p, m)[1], dtype=torch.float64),
                                   atol=tol, rtol=0)


def test_gpt2_chunked_prefill_equals_the_whole_prefill():
    """Absolute position embeddings: the chunks' positions continue from the cache."""
    runs = {}
    for chunk in (4, None):
        model = tiny_gpt2().double()
        runs[chunk] = run(Engine(model, AdapterRegistry(model, adapters={}), prefill_chunk=chunk),
                          [(None, prompt(n, n), 6) for n in (23, 5, 14, 9)])
    reference = tiny_gpt2().double()
    for n, chunked, whole in zip((23, 5, 14, 9), runs[4], runs[None]):
        assert chunked.token_ids == whole.token_ids == greedy(reference, None, prompt(n, n), 6)[0]
        torch.testing.assert_close(torch.tensor(chunked.token_logprobs), torch.tensor(whole.token_logprobs),
                                   atol=1e-12, rtol=0)


def test_cancel_during_a_chunked_prefill_stops_at_the_next_chunk_and_later_ones_cost_nothing(adapters):
    """A is cancelled while its second chunk runs: no third chunk. B, waiting behind A, is cancelled then
    too: it is dropped without a prefill. C behind them is served as usual."""
    model = tiny_llama().double()
    engine = Engine(model, AdapterRegistry(model, adapters=adapters), prefill_chunk=8)
    a = engine.submit(GenRequest(prompt(40, 1), "alpha", 5))
    b = engine.submit(GenRequest(prompt(30, 2), "beta", 5))
    chunks = []

    def hook(module, args):
        if threading.current_thread().name == "peftkit-engine" and args[0].shape[1] > 1:
            chunks.append(args[0][0].tolist())
            if len(chunks) == 2:
                a.cancel(), b.cancel()

    model.model.embed_tokens.register_forward_pre_hook(hook)
    engine.start()
    try:
        a.wait(30), b.wait(30)
        c = engine.submit(GenRequest(prompt(20, 3), None, 4))
        c.wait(30)
    finally:
        engine.close()
    assert (a.finish_reason, a.token_ids, b.finish_reason, b.token_ids) == ("cancelled", [], "cancelled", [])
    assert chunks[:2] == [prompt(40, 1)[:8], prompt(40, 1)[8:16]]  # A's first two chunks, then C's
    assert chunks[2:] == [prompt(20, 3)[i:i + 8] for i in (0, 8, 16)]
    assert c.finish_reason == "length" and len(c.token_ids) == 4
    assert engine.stats()["prefill_tokens"] == 16 + 20
    assert all(e["leases"] == 0 for e in engine.registry.info())


def test_a_running_stream_keeps_producing_tokens_while_an_8k_prompt_is_prefilled():
    """Between two chunks of the 8k prompt the running row decodes one token; the long prompt's reply equals
    the one prefilled whole (chunking off)."""
    long_prompt, chunk = prompt(8192, 5), 512
    results = {}
    for prefill_chunk in (chunk, None):
        model = long_llama().double()
        engine = Engine(model, AdapterRegistry(model, adapters={}), prefill_chunk=prefill_chunk)
        engine.start()
        try:
            running = engine.submit(GenRequest(prompt(5, 6), None, 4000))
            stream = running.tokens()
            next(stream), next(stream)
            before = running.completion_tokens
            long = engine.submit(GenRequest(long_prompt, None, 3))
            next(long.tokens())
            during = running.completion_tokens - before
            long.wait(60)
            running.cancel()
            running.wait(30)
        finally:
            engine.close()
        results[prefill_chunk] = (long, during)
    (chunked, during), (whole, _) = results[chunk], results[None]
    assert during >= 8192 // chunk - 1  # a decode step after every chunk but the last
    assert chunked.token_ids == whole.token_ids and len(chunked.token_ids) == 3
    torch.testing.assert_close(torch.tensor(chunked.token_logprobs), torch.tensor(whole.token_logprobs),
                               atol=1e-12, rtol=0)


def test_clients_that_left_cost_no_prefill_and_the_server_keeps_serving():
    """Through HTTP: a stream runs; four 4000-token requests arrive and their clients leave within a second.
    Meanwhile /health answers within 2 s and the stream keeps producing text; afterwards a 4-token request
    is answered at once, and the four prompts were prefilled only until their clients left. A hook makes the
    model as slow as a real one (1 ms per token of a forward, about SmolLM2-135M's prefill on a 2-core CPU),
    so one whole 4000-token prefill takes 4 s: without chunks, the first hostile prompt alone stalls the
    stream and the next request for that long (the other three are cancelled while queued)."""
    tokenizer = make_tokenizer()
    model = long_llama(vocab_size=len(tokenizer), positions=4200)
    engine = Engine(model, AdapterRegistry(model, adapters={}), prefill_chunk=256)

    def slow(module, args):
        if threading.current_thread().name == "peftkit-engine":
            time.sleep(args[0].numel() * 1e-3)

    model.model.embed_tokens.register_forward_pre_hook(slow)
    engine.start()
    live = LiveServer(create_app(engine, engine.registry, tokenizer, model_name="tiny", context_length=4200,
                                 max_tokens_limit=4096)).__enter__()
    events: list[float] = []
    stop = threading.Event()

    def stream():
        body = {"model": "tiny", "prompt": "Hello there", "max_tokens": 4000, "stream": True, "temperature": 1.0,
                "seed": 7}
        with httpx.stream("POST", live.url + "/v1/completions", json=body, timeout=30) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    events.append(time.perf_counter())
                if stop.is_set():
                    return  # the client leaves: the stream's row is cancelled

    left = []

    def hostile(i: int):
        try:
            httpx.post(live.url + "/v1/completions", timeout=0.5,
                       json={"model": "tiny", "prompt": prompt(4000, 10 + i, len(tokenizer)), "max_tokens": 4})
        except httpx.ReadTimeout:
            left.append(i)  # the client gave up and closed its connection

    reader = threading.Thread(target=stream)
    reader.start()
    try:
        deadline = time.monotonic() + 20
        while len(events) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(events) >= 3, "the stream did not start"
        t0 = time.perf_counter()
        clients = [threading.Thread(target=hostile, args=(i,)) for i in range(4)]
        for c in clients:
            c.start()
        health = []
        while any(c.is_alive() for c in clients):
            t = time.perf_counter()
            assert httpx.get(live.url + "/health", timeout=5).status_code == 200
            health.append(time.perf_counter() - t)
            time.sleep(0.05)
        for c in clients:
            c.join()
        t = time.perf_counter()
        reply = httpx.post(live.url + "/v1/completions", timeout=30,
                           json={"model": "tiny", "prompt": [5, 6, 7, 8], "max_tokens": 4})
        next_latency = time.perf_counter() - t
        time.sleep(0.3)
        t1 = time.perf_counter()
        stop.set()
        reader.join(30)
        stats = engine.stats()
    finally:
        stop.set()
        live.__exit__(None, None, None)
        engine.close()
    assert sorted(left) == [0, 1, 2, 3]
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 4
    assert health and max(health) < 2.0, health
    window = [t0] + [e for e in events if t0 < e < t1] + [t1]
    gaps = [b - a for a, b in zip(window, window[1:])]
    assert len(window) > 4 and max(gaps) < 2.0, max(gaps)  # the stream went on while the prompts came and went
    assert next_latency < 2.0, next_latency
    assert stats["prefill_tokens"] < 4000, stats  # not even one of the four prompts was prefilled whole


def test_prefill_chunk_option_and_flag():
    from peftkit.cli import build_parser

    model = tiny_llama()
    registry = AdapterRegistry(model, adapters={})
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="prefill_chunk"):
            Engine(model, registry, prefill_chunk=bad)
    assert build_parser().parse_args(["serve"]).prefill_chunk == 512
    assert build_parser().parse_args(["serve", "--prefill-chunk", "0"]).prefill_chunk == 0  # off: Engine gets None
    serve = next(a for a in build_parser()._actions if a.dest == "command").choices["serve"]
    assert "--prefill-chunk" in serve.format_help()


def test_a_row_that_cannot_join_after_its_chunked_prefill_ends_with_an_error(adapters, monkeypatch):
    """Joining the batch fails (say, no memory for the new cache): the request ends, it is never lost."""
    model = tiny_llama().double()
    engine = Engine(model, AdapterRegistry(model, adapters=adapters), prefill_chunk=8)
    real = engine._join

    def join(joining):
        if joining:
            raise RuntimeError("no memory for the new cache")
        return real(joining)

    monkeypatch.setattr(engine, "_join", join)
    handle = engine.submit(GenRequest(prompt(20, 4), "alpha", 5))
    engine.start()
    try:
        handle.wait(10)
        after = engine.submit(GenRequest(prompt(20, 4), None, 1))  # the loop goes on
        after.wait(10)
    finally:
        engine.close()
    assert handle.finish_reason == "error" and "no memory" in handle.error
    assert after.finish_reason == "length"  # a max_tokens=1 request needs no join
    assert all(e["leases"] == 0 for e in engine.registry.info())
