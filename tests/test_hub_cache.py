"""Issue 20, item 5: `--model owner/name` loads from the local Hugging Face cache, offline, and says plainly
when the model is not there."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import save_tiny_model

from peftkit import models
from peftkit.cli import main


def fake_hub_cache(hub: Path, repo_id: str, revision: str = "0123abcd") -> Path:
    """Lay a tiny model out as huggingface_hub's cache does: files in blobs/, symlinked from
    snapshots/<revision>/, and refs/main naming that revision."""
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    save_tiny_model(snapshot)
    (repo / "blobs").mkdir(parents=True)
    for i, f in enumerate(sorted(snapshot.iterdir())):
        blob = repo / "blobs" / f"blob{i}"
        f.rename(blob)
        f.symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return snapshot


@pytest.fixture
def hf_home(tmp_path, monkeypatch) -> Path:
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hf"


def test_hub_id_resolves_and_loads_from_the_cache(hf_home, capsys):
    snapshot = fake_hub_cache(hf_home / "hub", "acme/tiny-llama")
    (snapshot.parent / "ffff0000").mkdir()  # an older, incomplete revision is not picked
    assert models.hub_cache() == hf_home / "hub"
    assert models.resolve_model_dir("acme/tiny-llama") == snapshot
    model, tokenizer = models.load_model("acme/tiny-llama")
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 2
    assert tokenizer("hi")["input_ids"]
    assert main(["targets", "all-linear", "--model", "acme/tiny-llama", "--rank", "2"]) == 0
    assert "14 modules selected" in capsys.readouterr().out


def test_hub_cache_follows_hf_hub_cache_and_the_newest_snapshot(tmp_path, hf_home, monkeypatch):
    snapshot = fake_hub_cache(tmp_path / "elsewhere", "acme/tiny-llama")
    (snapshot.parent.parent / "refs" / "main").unlink()  # no ref: the snapshot that holds a config
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    assert models.hub_cache() == tmp_path / "elsewhere"
    assert models.resolve_model_dir("acme/tiny-llama") == snapshot


@pytest.mark.parametrize("command", [["targets", "all-linear"], ["train", "--max-steps", "1"]])
def test_missing_hub_id_says_so_plainly(hf_home, tmp_path, capsys, command):
    out = ["--output-dir", str(tmp_path / "run")] if command[0] == "train" else []
    assert main([*command, "--model", "acme/not-here", *out]) == 2
    err = capsys.readouterr().err
    assert (f"model 'acme/not-here' is not in the local Hugging Face cache (looked in {hf_home / 'hub'}); "
            "peftkit does not download models: pass a local directory (--model path/to/model) or a .gguf file") in err
    assert "peftkit's machines" not in err
    assert not (tmp_path / "run").exists()


def test_embedded_default_hub_id_falls_back_to_the_embedded_model(hf_home, tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "peftkit"))
    embedded = tmp_path / "peftkit" / "models" / "SmolLM2-135M-Instruct"
    save_tiny_model(embedded)  # stands in for the converted GGUF, so nothing is converted here
    assert models.resolve_model_dir(models.SMOLLM2_HUB_ID) == embedded
    model, _ = models.load_model(models.SMOLLM2_HUB_ID)
    assert model.config.name_or_path == models.SMOLLM2_HUB_ID
    cached = fake_hub_cache(hf_home / "hub", models.SMOLLM2_HUB_ID)  # once in the cache, the cache wins
    assert models.resolve_model_dir(models.SMOLLM2_HUB_ID) == cached


def test_a_local_directory_named_like_a_hub_id_wins(hf_home, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    save_tiny_model(tmp_path / "acme" / "local")
    assert models.resolve_model_dir("acme/local") == Path("acme/local")
