"""More than one process: data-parallel LoRA equals one process, broadcast syncs ranks, FSDP2 shards the base.

The multi-process checks share ONE start of two gloo ranks on 127.0.0.1 (a module fixture). The ranks are
forked from this process after it ran the single-process references, so they inherit torch, transformers
and their lazy imports warm (a spawned interpreter pays ~12 s of imports on two cores). The ranks only use
the CPU and one thread each, which is what makes forking safe. Each rank writes its results to a file;
the tests compare them with the references.
"""

from __future__ import annotations

import os
import socket
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp

import peftkit
from peftkit.train import distributed as D
from peftkit.train.distributed import Dist


def tiny_llama():
    """The suite's 2-layer Llama (as in tests/conftest.py, which tests/train/conftest.py shadows as a module)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


TARGETS = ["q_proj", "v_proj", "down_proj", "embed_tokens"]
WORLD = 2
LR = 1e-2


def _batch() -> torch.Tensor:
    """The global batch: 4 sequences of equal length, so every rank's loss averages the same token count."""
    return torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(3))


def _lora_model(seed: int = 0, init: bool | str = True):
    model = tiny_llama().train()  # base seeded inside: identical on every rank
    torch.manual_seed(seed)
    return peftkit.inject(model, peftkit.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                    init_lora_weights=init))


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def _train(model, ids: torch.Tensor, d: Dist, steps: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    """AdamW on the trainable params: the global loss per step, and the first step's averaged gradients
    (Adam's update hardly depends on the gradient's scale, so a wrong average must be caught here).
    all_reduce_gradients is called even under FSDP, where it must leave FSDP's gradients alone."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    opt = torch.optim.AdamW(params, lr=LR)
    losses, grads = [], {}
    for step in range(steps):
        loss = model(ids, labels=ids).loss  # mean over this rank's tokens
        loss.backward()
        D.all_reduce_gradients(params, d)
        if step == 0:
            grads = {n: _full(p.grad) for n, p in named}
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(D.reduce_mean(loss, d))
    return losses, grads


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: _full(p) for n, p in model.named_parameters() if p.requires_grad}


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    d = D.init_distributed("cpu")
    assert D.init_distributed("cpu") == d  # idempotent
    mine = _batch()[2 * rank: 2 * rank + 2]
    res: dict = {"dist": (d.rank, d.world_size, d.local_rank, d.is_main, d.enabled)}

    # broadcast: differently seeded adapters become rank 0's
    model = _lora_model(seed=100 + rank, init=False)
    res["before_bcast"] = _trainable(model)
    D.broadcast_trainable(model, d)
    res["after_bcast"] = _trainable(model)

    # a grad present on one rank only is averaged on both; a grad on no rank stays None
    some, none = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
    some.grad = torch.full((3,), 4.0) if rank == 0 else None
    D.all_reduce_gradients([some, none], d)
    res["partial_grads"] = (some.grad, none.grad)

    # data parallel: half the batch per rank, gradients averaged
    model = _lora_model()
    D.broadcast_trainable(model, d)
    res["ddp_losses"], res["ddp_grads"] = _train(model, mine, d, steps=5)
    res["ddp_params"] = _trainable(model)

    # FSDP2: sharded base, adapters inside the sharded layers train
    model = _lora_model(init=False)
    D.broadcast_trainable(model, d)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    try:
        D.shard_frozen_base(model, d)
    except RuntimeError as err:
        res["fsdp_error"] = str(err)
    else:
        res["fsdp_sharded"] = all(hasattr(p, "full_tensor") for p in model.parameters())
        res["fsdp_losses"], res["fsdp_grads"] = _train(model, mine, d, steps=3)
        res["fsdp_params"] = _trainable(model)
        after = {n: _full(p) for n, p in model.named_parameters() if not p.requires_grad}
        res["fsdp_base_unchanged"] = after.keys() == base_before.keys() and all(
            torch.equal(after[n], base_before[n]) for n in after)
    D.barrier(d)
    torch.save(res, f"{out}/rank{rank}.pt")
    D.cleanup(d)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def reference() -> dict:
    """Single-process runs on the whole batch: the data-parallel and FSDP runs must reproduce them.
    One thread: faster for a model this small, and not slowed by other work on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ddp_losses, ddp_grads, ddp_params = _single(steps=5)
        fsdp_losses, fsdp_grads, fsdp_params = _single(steps=3, init=False)
    finally:
        torch.set_num_threads(threads)
    return {"init": _trainable(_lora_model()), "ddp_losses": ddp_losses, "ddp_grads": ddp_grads,
            "ddp_params": ddp_params, "fsdp_losses": fsdp_losses, "fsdp_grads": fsdp_grads,
            "fsdp_params": fsdp_params}


@pytest.fixture(scope="module")
def ranks(reference, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("dist")
    ctx = mp.start_processes(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=False, start_method="fork")
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=1):  # raises with the child's traceback if a rank fails
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.terminate()
            pytest.fail("the two ranks did not finish in 120 s (a collective hung?)")
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def _single(steps: int, init: bool | str = True) -> tuple[list[float], dict, dict]:
    model = _lora_model(init=init)
    losses, grads = _train(model, _batch(), Dist(), steps)
    return losses, grads, _trainable(model)


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    for n, t in a.items():
        assert torch.allclose(t, b[n], atol=atol, rtol=0), (n, (t - b[n]).abs().max().item())


def test_ranks_see_the_group(ranks):
    assert [r["dist"] for r in ranks] == [(0, 2, 0, True, True), (1, 2, 1, False, True)]


def test_data_parallel_equals_one_process(ranks, reference):
    losses, params, init = reference["ddp_losses"], reference["ddp_params"], reference["init"]
    assert max(abs(p - init[n]).max().item() for n, p in params.items()) > 1e-2  # the adapter moved
    assert losses[-1] < losses[0]
    for r in ranks:
        assert r["ddp_losses"] == pytest.approx(losses, abs=1e-5, rel=0)
        _assert_close(r["ddp_grads"], reference["ddp_grads"], atol=1e-6)
        _assert_close(r["ddp_params"], params, atol=1e-5)
    _assert_close(ranks[0]["ddp_params"], ranks[1]["ddp_params"], atol=0)  # ranks stay identical


def test_missing_grads_are_zeros_in_the_average(ranks):
    for r in ranks:
        some, none = r["partial_grads"]
        assert torch.equal(some, torch.full((3,), 2.0)) and none is None


def test_broadcast_makes_ranks_identical(ranks):
    first, second = ranks
    assert any(not torch.equal(first["before_bcast"][n], t) for n, t in second["before_bcast"].items())
    _assert_close(first["after_bcast"], first["before_bcast"], atol=0)
    _assert_close(second["after_bcast"], first["before_bcast"], atol=0)


def test_fsdp_matches_unsharded_and_keeps_base_frozen(ranks, reference):
    if "fsdp_error" in ranks[0]:  # a torch build that cannot run fully_shard on CPU/gloo must say so
        assert "run on GPUs" in ranks[0]["fsdp_error"]
        pytest.skip(ranks[0]["fsdp_error"])
    losses, params = reference["fsdp_losses"], reference["fsdp_params"]
    for r in ranks:
        assert r["fsdp_sharded"] and r["fsdp_base_unchanged"]
        assert r["fsdp_losses"] == pytest.approx(losses, abs=1e-4, rel=0)
        _assert_close(r["fsdp_grads"], reference["fsdp_grads"], atol=1e-6)
        _assert_close(r["fsdp_params"], params, atol=1e-4)


def test_single_process_without_torchrun(monkeypatch):
    for var in D.TORCHRUN_VARS:
        monkeypatch.delenv(var, raising=False)
    d = D.init_distributed("cpu")
    assert d == Dist() and d.is_main and not d.enabled
    assert D.init_distributed().device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    # with one process every helper is a no-op
    model = _lora_model()
    params = [p for p in model.parameters() if p.requires_grad]
    params[0].grad = torch.ones_like(params[0])
    D.all_reduce_gradients(params, d)
    D.broadcast_trainable(model, d)
    D.shard_frozen_base(model, d)
    D.barrier(d)
    D.cleanup(d)
    assert torch.equal(params[0].grad, torch.ones_like(params[0])) and params[1].grad is None
    assert D.reduce_mean(torch.tensor(2.5), d) == 2.5


def test_incomplete_torchrun_env_is_an_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for var in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(RuntimeError, match="RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT not set"):
        D.init_distributed("cpu")


def test_shard_needs_decoder_layers():
    with pytest.raises(ValueError, match="layer_classes"):
        D.shard_frozen_base(torch.nn.Sequential(torch.nn.Linear(2, 2)), Dist())
    with pytest.raises(ValueError, match="no module of class Conv2d"):
        D.shard_frozen_base(tiny_llama(), Dist(), layer_classes=(torch.nn.Conv2d,))


def test_launch_runs_the_command_verbatim_on_n_processes(monkeypatch):
    from torch.distributed.launcher import api

    seen = {}

    def fake_launch(config, entrypoint):
        seen["config"], seen["entrypoint"] = config, entrypoint
        return lambda *args: seen.setdefault("args", args)

    monkeypatch.setattr(api, "elastic_launch", fake_launch)
    assert D.launch(2, ["train", "--r", "5"]) == 0  # "--r" must reach peftkit, not torchrun's parser
    assert seen["entrypoint"] == sys.executable and seen["config"].nproc_per_node == 2
    assert seen["args"] == ("-m", "peftkit.cli", "train", "--r", "5")
    with pytest.raises(ValueError, match="strip --nproc"):
        D.launch(2, ["train", "--nproc", "2"])
