"""Engine: continuous batching with a KV cache; every response equals the same request served alone."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch
from conftest import tiny_llama
from serve_helpers import ADAPTERS, greedy, make_adapters, reference_model, save_lora

from peftkit.serve import AdapterError, AdapterRegistry, Engine, GenRequest, QueueFull

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    return make_adapters(tmp_path_factory.mktemp("adapters"))


@pytest.fixture(scope="module")
def reference(adapters):
    return reference_model(adapters)


def engine_for(adapters, dtype=torch.float64, start=True, **kw) -> Engine:
    model = tiny_llama().to(dtype)
    engine = Engine(model, AdapterRegistry(model, adapters=adapters, max_loaded=4), **kw)
    if start:
        engine.start()
    return engine


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# (adapter, prompt length, max_tokens): base + 3 adapters, different lengths, joining at different times
CASES = [(None, 5, 12), ("alpha", 9, 7), ("beta", 3, 15), ("gamma", 12, 10), ("alpha", 1, 9), (None, 7, 4),
         ("gamma", 4, 14), ("beta", 10, 6)]


def serve_mixed(engine: Engine) -> list:
    """Submit CASES in three waves, each after the previous wave has produced tokens."""
    handles = []
    for wave in (CASES[:3], CASES[3:6], CASES[6:]):
        for i, (adapter, n, max_tokens) in enumerate(wave, start=len(handles)):
            handles.append(engine.submit(GenRequest(prompt(n, i), adapter, max_tokens)))
        first = handles[-1].tokens()
        next(first), next(first)  # the wave is running before the next one joins
    for h in handles:
        h.wait(30)
    return handles


def test_concurrent_mixed_requests_equal_single_request_references(adapters, reference):
    engine = engine_for(adapters, max_batch=8)
    try:
        handles = serve_mixed(engine)
        stats = engine.stats()
    finally:
        engine.close()
    assert stats["batched_rows"] > 2 * stats["steps"]  # rows really shared forwards
    for i, ((adapter, n, max_tokens), h) in enumerate(zip(CASES, handles)):
        expected, logprobs = greedy(reference, adapter, prompt(n, i), max_tokens)
        assert h.token_ids == expected, (adapter, n)
        assert (h.finish_reason, h.prompt_tokens, h.completion_tokens) == ("length", n, max_tokens)
        # the reference takes log_softmax in float32 (as the batched-prefill test says): 1e-9 held on AVX-512
        # machines only; an AVX2 one differs by 5e-7
        torch.testing.assert_close(torch.tensor(h.token_logprobs), torch.tensor(logprobs), atol=1e-6, rtol=0)
    outs = {tuple(h.token_ids) for h in handles}
    assert len(outs) == len(handles)  # the adapters really differ


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_requests_admitted_together_share_one_prefill_and_equal_the_references(adapters, dtype, monkeypatch):
    """Queued before the loop starts, all CASES are prefilled in one left-padded forward; the padding is
    masked (no NaN from the padding rows' fully masked queries leaks into real rows) and cut from the cache."""
    engine = engine_for(adapters, dtype=dtype, start=False, max_batch=8)
    forwards = []
    real = engine._forward
    monkeypatch.setattr(engine, "_forward", lambda ids, *a: forwards.append(tuple(ids.shape)) or real(ids, *a))
    handles = [engine.submit(GenRequest(prompt(n, i), adapter, max_tokens)) for i, (adapter, n, max_tokens)
               in enumerate(CASES)]
    engine.start()
    try:
        for h in handles:
            h.wait(30)
    finally:
        engine.close()
    assert forwards[0] == (len(CASES), max(n for _, n, _ in CASES))  # one prefill for all of them
    reference = reference_model(adapters, dtype=dtype)
    for i, ((adapter, n, max_tokens), h) in enumerate(zip(CASES, handles)):
        expected, logprobs = greedy(reference, adapter, prompt(n, i), max_tokens)
        assert h.token_ids == expected, (adapter, n)
        tol = 1e-6 if dtype == torch.float64 else 1e-4  # the reference takes log_softmax in float32
        torch.testing.assert_close(torch.tensor(h.token_logprobs, dtype=torch.float64), torch.tensor(logprobs, dtype=torch.float64),
                                   atol=tol, rtol=0)


def test_float32_matches_the_reference_closely(adapters):
    reference = reference_model(adapters, dtype=torch.float32)
    engine = engine_for(adapters, dtype=torch.float32, max_batch=4)  # fewer slots: rows queue and join later
    try:
        handles = serve_mixed(engine)
    finally:
        engine.close()
    for i, ((adapter, n, max_tokens), h) in enumerate(zip(CASES, handles)):
        expected, logprobs = greedy(reference, adapter, prompt(n, i), max_tokens)
        assert h.token_ids == expected
        torch.testing.assert_close(torch.tensor(h.token_logprobs), torch.tensor(logprobs), atol=1e-4, rtol=0)


def test_seeded_sampling_is_the_same_whatever_shares_the_batch(adapters, reference):
    engine = engine_for(adapters, max_batch=8)
    req = GenRequest(prompt(6, 1), "beta", max_tokens=12, temperature=0.9, top_p=0.9, seed=1234)
    try:
        alone = engine.submit(req).wait(30)
        crowd = [engine.submit(GenRequest(prompt(4 + k, 10 + k), a, 10, temperature=1.0, seed=k))
                 for k, a in enumerate([None, "alpha", "gamma", "beta"])]
        crowd.insert(2, engine.submit(req))
        together = [h.wait(30) for h in crowd]
        other_seed = engine.submit(GenRequest(**{**req.__dict__, "seed": 4321})).wait(30)
    finally:
        engine.close()
    assert together[2] == alone
    assert other_seed != alone
    assert alone != greedy(reference, "beta", prompt(6, 1), 12)[0]  # it really sampled


def test_stop_tokens_end_a_row(adapters, reference):
    expected = greedy(reference, "alpha", prompt(5, 3), 10)[0]
    stop = expected[3]
    cut = expected.index(stop)
    engine = engine_for(adapters)
    try:
        h = engine.submit(GenRequest(prompt(5, 3), "alpha", 10, stop_token_ids=(stop, 127 if stop != 127 else 126)))
        h.wait(30)
    finally:
        engine.close()
    assert h.finish_reason == "stop" and h.token_ids == expected[:cut] and h.completion_tokens == cut + 1


def test_a_request_can_end_at_its_first_token(adapters, reference):
    expected = greedy(reference, "beta", prompt(6, 4), 1)[0]
    engine = engine_for(adapters)
    try:
        one = engine.submit(GenRequest(prompt(6, 4), "beta", 1))
        stopped = engine.submit(GenRequest(prompt(6, 4), "beta", 5, stop_token_ids=tuple(expected)))
        one.wait(30), stopped.wait(30)
    finally:
        engine.close()
    assert (one.finish_reason, one.token_ids, one.completion_tokens) == ("length", expected, 1)
    assert (stopped.finish_reason, stopped.token_ids, stopped.completion_tokens) == ("stop", [], 1)


def test_cancel_running_and_queued_requests(adapters):
    engine = engine_for(adapters, start=False, max_batch=2)
    registry = engine.registry
    queued = engine.submit(GenRequest(prompt(3, 0), "gamma", 5))
    queued.cancel()
    assert queued.finish_reason == "cancelled" and queued.token_ids == []
    engine.start()
    try:
        running = engine.submit(GenRequest(prompt(3, 1), "alpha", 60))
        other = engine.submit(GenRequest(prompt(3, 2), "beta", 20))
        stream = running.tokens()
        next(stream), next(stream)
        running.cancel()
        running.wait(30)
        other.wait(30)
    finally:
        engine.close()
    assert running.finish_reason == "cancelled" and 2 <= running.completion_tokens < 60
    assert other.finish_reason == "length" and len(other.token_ids) == 20
    assert all(e["leases"] == 0 for e in registry.info())  # every lease was released


def test_rows_are_ended_when_rejoining_after_a_failed_step_fails(adapters, monkeypatch):
    engine = engine_for(adapters, start=False, max_batch=4)
    real_forward, real_join = engine._forward, engine._join
    calls = {"forward": 0}

    def forward(ids, *args):
        calls["forward"] += 1
        if ids.shape[0] > 1 and ids.shape[1] == 1:  # the batched decode step fails ...
            raise RuntimeError("injected")
        return real_forward(ids, *args)

    def join(joining):
        if any(len(kv[0][0]) == 1 for _, kv in joining) and calls["forward"] > 2 and len(joining) > 1:
            raise RuntimeError("no memory for the new cache")  # ... and so does rejoining the survivors
        return real_join(joining)

    monkeypatch.setattr(engine, "_forward", forward)
    monkeypatch.setattr(engine, "_join", join)
    handles = [engine.submit(GenRequest(prompt(3, i), "alpha" if i else None, 5)) for i in range(3)]
    engine.start()
    try:
        for h in handles:
            assert h.wait(10), "a request was lost"
    finally:
        engine.close()
    assert [h.finish_reason for h in handles] == ["error"] * 3
    assert all("rejoining" in h.error for h in handles)
    assert all(e["leases"] == 0 for e in engine.registry.info())


def test_queue_full_and_bad_requests(adapters):
    engine = engine_for(adapters, start=False, max_queue=2)
    try:
        with pytest.raises(AdapterError) as err:
            engine.submit(GenRequest([1, 2], "nope", 4))
        assert err.value.status == 404
        for bad, match in [(GenRequest([], None, 4), "non-empty"), (GenRequest([1], None, 0), "max_tokens"),
                           (GenRequest([1] * 60, None, 10), "context of 64"), (GenRequest([500], None), "0..127"),
                           (GenRequest([1], None, temperature=-1), "temperature"),
                           (GenRequest([1], None, top_p=0), "top_p"),
                           (GenRequest([1], "alpha", temperature=1.0, seed=2**64), "seed"),  # before any lease
                           (GenRequest([1], "alpha", temperature=1.0, seed=-1), "seed")]:
            with pytest.raises(ValueError, match=match):
                engine.submit(bad)
        assert engine.stats()["queue_depth"] == 0
        engine.submit(GenRequest([1, 2], "alpha", 4))
        engine.submit(GenRequest([1, 2], None, 4))
        with pytest.raises(QueueFull, match="max_queue 2"):
            engine.submit(GenRequest([1, 2], "beta", 4))
        assert engine.stats()["queue_depth"] == 2
    finally:
        engine.close()
    assert all(e["leases"] == 0 for e in engine.registry.info())  # also for the request QueueFull refused


def test_an_error_in_one_row_fails_only_that_row(adapters, reference):
    """A hook makes any forward fail whose input holds the poison token: the batched step fails, the engine
    retries row by row, and only the poisoned row ends with "error"."""
    victim = prompt(4, 7)
    poison = greedy(reference, "gamma", victim, 6)[0][2]  # fed back at the victim's third decode step
    others = [(None, prompt(5, 8), 12), ("alpha", prompt(6, 9), 12)]
    engine = engine_for(adapters, start=False, max_batch=4)

    def hook(module, args):
        if args[0].shape[1] == 1 and (args[0] == poison).any() and threading.current_thread().name == "peftkit-engine":
            raise RuntimeError("poisoned")

    engine.model.model.embed_tokens.register_forward_pre_hook(hook)
    for adapter, p, n in others:
        assert poison not in greedy(reference, adapter, p, n)[0][:-1], "pick prompts whose replies avoid the poison"
    handles = [engine.submit(GenRequest(p, a, n)) for a, p, n in others]
    bad = engine.submit(GenRequest(victim, "gamma", 6))
    engine.start()
    try:
        for h in handles + [bad]:
            h.wait(30)
        after = engine.submit(GenRequest(prompt(5, 8), None, 12)).wait(30)  # the loop is still alive
    finally:
        engine.close()
    assert bad.finish_reason == "error" and "poisoned" in bad.error
    assert bad.token_ids == greedy(reference, "gamma", victim, 6)[0][:3]
    for (adapter, p, n), h in zip(others, handles):
        assert h.finish_reason == "length" and h.token_ids == greedy(reference, adapter, p, n)[0]
    assert after == handles[0].token_ids


def test_stream_does_not_block_the_event_loop(adapters, reference):
    engine = engine_for(adapters)

    async def main():
        ticks = 0
        done = asyncio.Event()

        async def ticker():
            nonlocal ticks
            while not done.is_set():
                ticks += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(ticker())
        h = engine.submit(GenRequest(prompt(5, 4), "beta", 10))
        got = [t async for t in h.stream()]
        done.set()
        await task
        return got, ticks, h

    try:
        got, ticks, h = asyncio.run(main())
    finally:
        engine.close()
    assert got == greedy(reference, "beta", prompt(5, 4), 10)[0] == h.token_ids
    assert ticks > len(got)  # the loop kept running while tokens were awaited


def test_close_cancels_what_is_left(adapters):
    engine = engine_for(adapters, start=False)
    h = engine.submit(GenRequest([1, 2, 3], "alpha", 5))
    engine.close()
    assert h.finish_reason == "cancelled" and engine.registry.info()[0]["leases"] == 0
    with pytest.raises(RuntimeError, match="closed"):
        engine.submit(GenRequest([1], None, 2))
    started = engine_for(adapters)
    t = time.perf_counter()
    started.close()
    assert time.perf_counter() - t < 5


def test_in_flight_rows_keep_their_weights_while_adapters_reload_and_evict(tmp_path):
    root = tmp_path / "adapters"
    old_paths = make_adapters(root)
    old_reference = reference_model({name: str(p) for name, p in old_paths.items()})
    model = tiny_llama().double()
    registry = AdapterRegistry(model, root, max_loaded=3)
    engine = Engine(model, registry, max_batch=4)
    registry.acquire("gamma").release()  # loaded, unpinned: the one to evict
    gate, reached, calls = threading.Event(), threading.Event(), []

    def hold(module, args):  # the engine's 6th forward (two prefills, then decode steps) waits for the gate
        if threading.current_thread().name == "peftkit-engine":
            calls.append(1)
            if len(calls) == 6:
                reached.set()
                gate.wait(30)

    model.model.embed_tokens.register_forward_pre_hook(hold)
    running = [engine.submit(GenRequest(prompt(4, 1), "alpha", 30)),
               engine.submit(GenRequest(prompt(5, 2), "beta", 30))]
    engine.start()
    try:
        assert reached.wait(30)  # both rows are in flight, the engine inside a forward
        new_path = save_lora(root / "alpha", seed=77, **ADAPTERS["alpha"])  # new content for alpha
        fresh = engine.submit(GenRequest(prompt(4, 1), "alpha", 10))  # reload: a new slot, gamma evicted
        assert registry.stats()["reloads"] == 1 and registry.stats()["evictions"] == 1
        assert not any(h.done for h in running)
        assert [(e["name"], e["slot"]) for e in registry.info()] == [("beta", 2), ("alpha", 0)]  # old alpha: 1
        gate.set()
        for h in running + [fresh]:
            h.wait(30)
    finally:
        gate.set()
        engine.close()
    assert running[0].token_ids == greedy(old_reference, "alpha", prompt(4, 1), 30)[0]
    assert running[1].token_ids == greedy(old_reference, "beta", prompt(5, 2), 30)[0]
    new_reference = reference_model({"alpha": str(new_path)})
    assert fresh.token_ids == greedy(new_reference, "alpha", prompt(4, 1), 10)[0] != running[0].token_ids[:10]
    assert registry.stats()["retired"] == 0


def test_gpt2_in_the_engine(tmp_path):
    import peftkit
    from conftest import tiny_gpt2

    source = tiny_gpt2()
    torch.manual_seed(2)
    peftkit.inject(source, peftkit.LoraConfig(r=4, target_modules=["c_attn", "c_fc"], init_lora_weights=False))
    path = peftkit.save_adapter(source, tmp_path / "g")
    model = tiny_gpt2().double()
    engine = Engine(model, AdapterRegistry(model, adapters={"g": path}))
    engine.start()
    try:
        handles = [engine.submit(GenRequest(prompt(n, n), a, 8)) for n, a in [(3, "g"), (7, None), (5, "g")]]
        got = [h.wait(30) for h in handles]
    finally:
        engine.close()
    reference = tiny_gpt2().double()
    peftkit.load_adapter(reference, path, "g")
    for (n, a), tokens in zip([(3, "g"), (7, None), (5, "g")], got):
        assert tokens == greedy(reference, a, prompt(n, n), 8)[0]
