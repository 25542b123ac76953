"""The `peftkit` command: help texts, inspect on a saved adapter, clear errors with exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import nonzero_adapter, tiny_llama

import peftkit
from peftkit.cli import main


def test_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "peftkit.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for word in ("demo", "inspect", "targets"):
        assert word in out.stdout


def test_inspect_text_and_json(tmp_path, capsys):
    model = tiny_llama()
    nonzero_adapter(model, ["q_proj", "v_proj"], r=4)
    peftkit.save_adapter(model, tmp_path / "a")
    assert main(["inspect", str(tmp_path / "a")]) == 0
    text = capsys.readouterr().out
    # q_proj: 4x32 + 32x4, v_proj (2 kv heads of 8): 4x32 + 16x4; two layers
    assert "r=4" in text and "8 tensors, 896 parameters, on 4 modules" in text
    assert main(["inspect", str(tmp_path / "a"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["parameters"] == 896 and data["config"]["peft_type"] == "LORA"
    peftkit.save_adapter(model, tmp_path / "run" / "adapter")  # a `peftkit train` run directory's layout
    assert main(["inspect", str(tmp_path / "run")]) == 0
    assert f"adapter: {tmp_path / 'run' / 'adapter'}" in capsys.readouterr().out


def test_inspect_missing_directory_is_a_clear_error(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_targets_on_a_local_model_directory(tmp_path, capsys):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "m")
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
                            ).save_pretrained(tmp_path / "m")
    assert main(["targets", "all-linear", "--model", str(tmp_path / "m"), "--rank", "2"]) == 0
    out = capsys.readouterr().out
    assert "14 modules selected" in out and "architecture 'llama': verified fast paths head_loss, fused_linear" in out
    assert main(["targets", "nothing_here", "--model", str(tmp_path / "m")]) == 2
    assert "matched no module" in capsys.readouterr().err
