"""AdapterRegistry: discovery, name safety, validation (4xx naming the reason), LRU, pinning, reload by content."""

from __future__ import annotations

import json
import os
import shutil
import threading

import pytest
import torch
from conftest import tiny_llama
from serve_helpers import ADAPTERS, make_adapters, save_lora

import peftkit
from peftkit.serve import AdapterError, AdapterRegistry
from peftkit.serve import registry as registry_module

torch.set_num_threads(1)
X = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(5))


@pytest.fixture
def adapter_dir(tmp_path):
    root = tmp_path / "adapters"
    make_adapters(root)
    return root


def new_registry(root, **kw) -> AdapterRegistry:
    return AdapterRegistry(tiny_llama().double(), root, **kw)


@torch.no_grad()
def logits(registry: AdapterRegistry, slot: int) -> torch.Tensor:
    with registry.bank.rows([slot]):
        return registry.model(X).logits


def status(fn, *args) -> tuple[int, str]:
    with pytest.raises(AdapterError) as info:
        fn(*args)
    return info.value.status, info.value.message


def test_discovery_lists_subdirectories_and_explicit_adapters(adapter_dir, tmp_path):
    (adapter_dir / "notes").mkdir()  # no adapter_config.json: not an adapter
    (adapter_dir / "README.txt").write_text("hello")
    shutil.copytree(adapter_dir / "alpha", adapter_dir / "bad name")  # not a plain name
    extra = save_lora(tmp_path / "elsewhere", r=2, target_modules=["q_proj"])
    registry = new_registry(adapter_dir, adapters={"extra": extra})
    assert registry.names() == ["alpha", "beta", "extra", "gamma"]
    with registry.acquire("extra") as lease:  # explicit entries are trusted paths
        assert lease.slot == 0
    assert status(registry.acquire, "missing") == (404, "unknown adapter 'missing'; GET /v1/models lists the "
                                                        "adapters served")
    with pytest.raises(ValueError, match="not a plain name"):
        new_registry(adapter_dir, adapters={"../x": extra})


@pytest.mark.parametrize("name", ["../x", "/etc", "a%2F..b", "a/b", "a\\b", "..", "a..b", "", ".hidden", "-x",
                                  "x" * 129, "a b", "%2e%2e", None, 3])
def test_names_that_are_not_plain_get_400(adapter_dir, name):
    code, message = status(new_registry(adapter_dir).acquire, name)
    assert code == 400 and "not a plain name" in message


def test_symlinks_leading_out_of_the_directory_are_404_and_open_nothing(adapter_dir, tmp_path, monkeypatch):
    outside = save_lora(tmp_path / "outside" / "secret", r=2, target_modules=["q_proj"])
    os.symlink(outside, adapter_dir / "evil")  # a directory link out
    (adapter_dir / "half").mkdir()  # a directory inside whose weights link out
    shutil.copy(outside / "adapter_config.json", adapter_dir / "half" / "adapter_config.json")
    os.symlink(outside / "adapter_model.safetensors", adapter_dir / "half" / "adapter_model.safetensors")
    os.symlink(adapter_dir / "alpha", adapter_dir / "alias")  # a link that stays inside is fine
    opened = []
    real_read = registry_module._read
    monkeypatch.setattr(registry_module, "_read", lambda p, root=None: opened.append(p) or real_read(p, root))
    registry = new_registry(adapter_dir)
    assert registry.names() == ["alias", "alpha", "beta", "gamma"]  # neither "evil" nor "half"
    for name in ("evil", "half"):
        code, message = status(registry.acquire, name)
        assert code == 404 and str(tmp_path / "outside") not in message
    assert not any(str(tmp_path / "outside") in p for p in opened) and not opened
    assert registry.acquire("alias").slot == 0


def test_wrong_base_is_422_naming_the_keys(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    torch.manual_seed(0)
    peftkit.inject(other, peftkit.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    peftkit.save_adapter(other, tmp_path / "wrong")
    save_lora(tmp_path / "ok", r=2, target_modules=["v_proj"])
    registry = new_registry(tmp_path)
    code, message = status(registry.acquire, "wrong")
    assert code == 422
    assert "model.layers.0.self_attn.q_proj.lora_A.weight: file (4, 48), model expects (4, 32)" in message
    assert "model.layers.1.self_attn.q_proj.lora_B.weight" in message
    assert registry.stats()["load_errors"] == 1 and registry.stats()["loaded"] == 0
    assert registry.acquire("ok").slot == 0  # the registry keeps serving others


def test_unsupported_adapters_are_422_with_the_reason(tmp_path):
    save_lora(tmp_path / "big", r=16, target_modules=["q_proj"])
    save_lora(tmp_path / "dora", r=2, target_modules=["q_proj"], use_dora=True)
    save_lora(tmp_path / "emb", r=2, target_modules=["q_proj", "embed_tokens"])
    prefix = tiny_llama()
    peftkit.inject(prefix, peftkit.PrefixConfig(num_virtual_tokens=2))
    peftkit.save_adapter(prefix, tmp_path / "prefix")
    pickled = save_lora(tmp_path / "pickled", r=2, target_modules=["q_proj"])
    from safetensors.torch import load_file

    torch.save(load_file(pickled / "adapter_model.safetensors"), pickled / "adapter_model.bin")
    (pickled / "adapter_model.safetensors").unlink()
    registry = new_registry(tmp_path, max_rank=8)
    expected = {"big": "rank above the server's --max-rank 8", "dora": "use_dora", "emb": "model.embed_tokens",
                "prefix": "PREFIX_TUNING adapter", "pickled": "loads safetensors only"}
    for name, reason in expected.items():
        code, message = status(registry.acquire, name)
        assert code == 422 and reason in message, (name, message)
    assert registry.stats()["loaded"] == 0 and registry.bank.nbytes() == 0  # nothing touched a slot


def test_lru_evicts_the_least_recently_used(adapter_dir):
    registry = new_registry(adapter_dir, max_loaded=2)
    registry.acquire("alpha").release()
    registry.acquire("beta").release()
    registry.acquire("alpha").release()  # alpha is now the most recently used
    registry.acquire("gamma").release()
    assert [e["name"] for e in registry.info()] == ["alpha", "gamma"]
    assert registry.stats()["evictions"] == 1
    assert registry.info()[1]["slot"] == 1  # gamma took beta's slot


def test_pinned_adapters_are_never_evicted(adapter_dir):
    registry = new_registry(adapter_dir, max_loaded=2)
    a, b = registry.acquire("alpha"), registry.acquire("beta")
    assert status(registry.acquire, "gamma")[0] == 503
    a_out = logits(registry, a.slot)
    registry.acquire("beta").release()  # beta more recent than alpha, but still pinned by b
    a.release()
    with registry.acquire("gamma") as g:
        assert g.slot == a.slot  # alpha, unpinned, was the one to go
        assert [e["name"] for e in registry.info()] == ["beta", "gamma"]
    assert b.slot != a.slot and registry.acquire("alpha").slot == a.slot  # gamma (unpinned) goes now
    torch.testing.assert_close(logits(registry, a.slot), a_out, atol=0, rtol=0)


def test_a_folder_swapped_for_a_symlink_after_the_check_is_not_read(adapter_dir, tmp_path, monkeypatch):
    """The race a local writer could run: the realpath check passes, then the folder becomes a symlink to
    files outside before the open. The opened file's real path is checked too."""
    outside = tmp_path / "outside"
    shutil.copytree(adapter_dir / "alpha", outside)
    registry = new_registry(adapter_dir, max_loaded=2)
    real_read = registry_module._read

    def swap_then_read(path, root=None):
        folder = adapter_dir / "alpha"
        if folder.is_dir() and not folder.is_symlink():
            shutil.rmtree(folder)
            folder.symlink_to(outside, target_is_directory=True)
        return real_read(path, root)

    monkeypatch.setattr(registry_module, "_read", swap_then_read)
    code, message = status(registry.acquire, "alpha")
    assert code == 404 and "outside" in message and str(tmp_path) not in message


def test_reload_on_content_change_keeps_old_leases_on_the_old_weights(adapter_dir):
    registry = new_registry(adapter_dir, max_loaded=4)
    old = registry.acquire("alpha")
    old_out, old_key = logits(registry, old.slot), old.key
    save_lora(adapter_dir / "alpha", seed=99, **ADAPTERS["alpha"])  # same shapes and size, new weights
    new = registry.acquire("alpha")
    assert new.slot != old.slot and new.key != old_key
    assert registry.stats()["reloads"] == 1 and registry.stats()["retired"] == 1
    assert torch.equal(logits(registry, old.slot), old_out)  # the old lease's outputs are unchanged
    assert (logits(registry, new.slot) - old_out).abs().max() > 1e-3
    old.release()
    assert registry.stats()["retired"] == 0  # the old slot is free once its last lease is gone
    assert registry.acquire("beta").slot == old.slot


def test_a_reload_replaces_its_own_old_version_rather_than_evicting_another(adapter_dir):
    registry = new_registry(adapter_dir, max_loaded=2)
    registry.acquire("alpha").release()
    registry.acquire("beta").release()
    save_lora(adapter_dir / "alpha", seed=99, **ADAPTERS["alpha"])
    registry.acquire("alpha").release()
    stats = registry.stats()
    assert (stats["loaded"], stats["evictions"], stats["reloads"]) == (2, 0, 1)


def test_configs_of_the_wrong_types_and_overflowing_scales_are_422_and_remembered(adapter_dir, monkeypatch):
    registry = new_registry(adapter_dir, max_loaded=4)
    config_path = adapter_dir / "alpha" / "adapter_config.json"
    good = json.loads(config_path.read_text())
    for bad, reason in [(None, "cannot be used"), ({**good, "lora_alpha": "x"}, "cannot be used"),
                        ({**good, "target_modules": 5}, "cannot be used"),
                        ({**good, "lora_alpha": float("inf")}, "overflow")]:  # valid JSON to Python's parser
        config_path.write_text(json.dumps(bad))
        os.utime(config_path, ns=(time_ns := os.stat(config_path).st_mtime_ns + 10**9, time_ns))
        code, message = status(registry.acquire, "alpha")
        assert code == 422 and reason in message, message
    parses = []
    real = registry_module.parse_adapter
    monkeypatch.setattr(registry_module, "parse_adapter", lambda *a: parses.append(1) or real(*a))
    assert status(registry.acquire, "alpha")[0] == 422 and parses == []  # remembered until the files change
    assert registry.stats()["load_errors"] == 4
    assert registry.acquire("beta").slot >= 0  # the others are served as before
    fp32 = AdapterRegistry(tiny_llama(), adapter_dir, max_loaded=2)  # 1e42 is finite in float64, not in float32
    config_path.write_text(json.dumps({**good, "lora_alpha": 1e42}))
    code, message = status(fp32.acquire, "alpha")
    assert code == 422 and "overflow the server's float32" in message, message


def test_touched_but_unchanged_files_keep_their_slot(adapter_dir):
    registry = new_registry(adapter_dir)
    first = registry.acquire("alpha")
    st = os.stat(adapter_dir / "alpha" / "adapter_model.safetensors")
    os.utime(adapter_dir / "alpha" / "adapter_model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    again = registry.acquire("alpha")
    assert again.slot == first.slot and registry.stats()["loads"] == 1 and registry.stats()["reloads"] == 0


def test_corrupt_file_is_422_and_others_keep_working(adapter_dir, monkeypatch):
    registry = new_registry(adapter_dir)
    beta = registry.acquire("beta")
    beta_out = logits(registry, beta.slot)
    registry.acquire("alpha").release()
    weights = adapter_dir / "alpha" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])  # truncated
    code, message = status(registry.acquire, "alpha")
    assert code == 422 and "corrupt or truncated" in message and str(adapter_dir) not in message
    reads = []
    real_read = registry_module._read
    monkeypatch.setattr(registry_module, "_read", lambda p, root=None: reads.append(p) or real_read(p, root))
    assert status(registry.acquire, "alpha")[0] == 422 and not reads  # the failure is remembered, not re-read
    assert registry.stats()["load_errors"] == 1
    assert torch.equal(logits(registry, beta.slot), beta_out)
    save_lora(adapter_dir / "alpha", seed=5, **ADAPTERS["alpha"])  # repaired: loads again
    assert registry.acquire("alpha").slot is not None and registry.stats()["reloads"] == 1


def test_bad_json_and_missing_weights(adapter_dir):
    (adapter_dir / "alpha" / "adapter_config.json").write_text("{not json")
    (adapter_dir / "beta" / "adapter_model.safetensors").unlink()
    registry = new_registry(adapter_dir)
    assert status(registry.acquire, "alpha")[0] == 422
    code, message = status(registry.acquire, "beta")
    assert code == 422 and "no adapter_model.safetensors" in message


def test_unload_keeps_running_leases(adapter_dir):
    registry = new_registry(adapter_dir)
    lease = registry.acquire("alpha")
    out = logits(registry, lease.slot)
    assert registry.unload("alpha") is True and registry.unload("alpha") is False
    assert registry.info() == [] and registry.stats()["retired"] == 1
    info = registry.load("beta")  # may not take alpha's slot while the lease holds it
    assert info["slot"] != lease.slot and info["rank"] == 8 and info["bytes"] > 0
    assert torch.equal(logits(registry, lease.slot), out)
    lease.release()
    lease.release()  # a second release does nothing
    assert registry.stats()["retired"] == 0


def test_concurrent_acquire_and_release(adapter_dir):
    registry = new_registry(adapter_dir, max_loaded=2)
    errors = []

    def worker(names):
        try:
            for i in range(30):
                name = names[i % len(names)]
                try:
                    lease = registry.acquire(name)
                except AdapterError as err:
                    assert err.status == 503
                    continue
                lease.release()
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(list(ADAPTERS)[i:] + list(ADAPTERS)[:i],)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(e["leases"] == 0 for e in registry.info()) and registry.stats()["retired"] == 0
    slots = [e["slot"] for e in registry.info()]
    assert len(slots) == len(set(slots)) <= 2


def test_content_key_is_sha256_of_both_files(adapter_dir):
    import hashlib

    registry = new_registry(adapter_dir)
    key = registry.acquire("gamma").key
    h = hashlib.sha256()
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        data = (adapter_dir / "gamma" / f).read_bytes()
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    assert key == h.hexdigest()
    assert json.loads((adapter_dir / "gamma" / "adapter_config.json").read_text())["use_rslora"] is True
