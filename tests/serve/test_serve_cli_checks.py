"""`peftkit serve` checks its adapters' files before it binds the port or loads the model (issue 20, item 4):
a bad --adapter or --adapter-dir is exit 2 with the path and the reason, at once."""

from __future__ import annotations

import argparse
import shutil
import time

import pytest

import peftkit.models
from peftkit.cli import main
from peftkit.serve import cli as serve_cli


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model (or binding a port) fails the test: the checks must come first."""
    def forbidden(*a, **k):
        raise AssertionError("the model was loaded before the adapters were checked")
    monkeypatch.setattr(peftkit.models, "load_model", forbidden)
    monkeypatch.setattr(serve_cli, "bind", forbidden)


def serve(capsys, *argv: str) -> tuple[int, str, float]:
    start = time.perf_counter()
    code = main(["serve", "--port", "0", *argv])
    return code, capsys.readouterr().err, time.perf_counter() - start


def test_missing_adapter_path_exits_2_naming_it_without_loading_the_model(no_model, capsys):
    code, err, seconds = serve(capsys, "--adapter", "foo=/bad")
    assert code == 2 and seconds < 2
    assert "--adapter foo=/bad" in err and "no such directory" in err


def test_each_kind_of_bad_adapter_folder_is_refused(no_model, capsys, tmp_path, adapter_sources):
    empty = tmp_path / "empty"
    empty.mkdir()
    run = tmp_path / "run"
    shutil.copytree(adapter_sources["alpha"], run / "adapter")
    not_json, a_list, no_weights = (tmp_path / n for n in ("not_json", "a_list", "no_weights"))
    for folder, text in ((not_json, "{oops"), (a_list, "[1, 2]"), (no_weights, "{}")):
        folder.mkdir()
        (folder / "adapter_config.json").write_text(text)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    cases = {a_file: "not a directory", empty: "no adapter_config.json", run: f"try {run / 'adapter'}",
             not_json: "is not readable JSON", a_list: "not an object", no_weights: "no adapter_model.safetensors"}
    for folder, reason in cases.items():
        code, err, seconds = serve(capsys, "--adapter", f"good={adapter_sources['alpha']}", "--adapter", f"x={folder}")
        assert code == 2 and seconds < 2, folder
        assert f"--adapter x={folder}" in err and reason in err, err


def test_bad_adapter_dir_exits_2(no_model, capsys, tmp_path):
    code, err, _ = serve(capsys, "--adapter-dir", str(tmp_path / "nope"))
    assert code == 2 and "--adapter-dir" in err and "nope" in err


def test_good_adapters_pass_the_checks(adapter_sources, adapter_dir):
    args = argparse.Namespace(adapter=[f"{n}={p}" for n, p in adapter_sources.items()], adapter_dir=str(adapter_dir))
    assert serve_cli.check_sources(args) == {n: str(p) for n, p in adapter_sources.items()}
