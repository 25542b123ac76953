"""The commands around training, through the CLI: eval, generate, merge (and train's --help)."""

from __future__ import annotations

import json

import pytest
import torch

import peftkit
from peftkit.cli import build_parser, main
from peftkit.models import load_model


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, qa_jsonl, tmp_path_factory):
    out = tmp_path_factory.mktemp("cmd") / "run"
    code = main(["train", "--model", tiny_model_dir, "--data", qa_jsonl, "--output-dir", str(out), "--max-steps", "3",
                 "--batch-size", "4", "--lr", "0.05", "--no-progress", "--threads", "1", "--save-every", "0"])
    assert code == 0
    return out


def test_train_help_explains_every_option():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["train"]
    text = sub.format_help()
    for flag in ("--data", "--r", "--lora-alpha", "--lr", "--warmup-steps", "--schedule", "--batch-size",
                 "--grad-accum", "--max-steps", "--epochs", "--gradient-checkpointing", "--seed", "--eval-every",
                 "--save-every", "--keep-checkpoints", "--output-dir", "--resume", "--config", "--nproc", "--fsdp"):
        assert flag in text, flag


def test_eval_reports_loss_on_data(run_dir, qa_jsonl, capsys):
    assert main(["eval", "--adapter", str(run_dir), "--data", qa_jsonl, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["loss"] > 0 and "32 records" in result["data"]
    assert main(["eval", "--data", qa_jsonl, "--json", "--model", json.loads(
        (run_dir / "run_options.json").read_text())["model"]]) == 0
    base = json.loads(capsys.readouterr().out)
    assert base["loss"] > result["loss"]  # the adapter learned the data


def test_generate_uses_the_run_s_base_and_adapter(run_dir, capsys):
    assert main(["generate", "--adapter", str(run_dir), "--max-new-tokens", "4", "--json", "Say hi",
                 "Name a fruit."]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in lines] == ["Say hi", "Name a fruit."]
    assert all(isinstance(r["output"], str) for r in lines)


def test_merge_writes_a_transformers_dir_with_the_adapter_logits(run_dir, tiny_model_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    assert main(["merge", "--adapter", str(run_dir), "--out", str(out)]) == 0
    assert "max |diff|" in capsys.readouterr().out
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    AutoTokenizer.from_pretrained(out)
    model, _ = load_model(tiny_model_dir)
    peftkit.load_adapter(model, run_dir / "adapter")
    ids = torch.arange(3, 40).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, model(ids).logits, atol=1e-4, rtol=1e-4)
    assert main(["merge", "--adapter", str(run_dir), "--out", str(out)]) != 0  # refuses a non-empty dir
    assert "--overwrite" in capsys.readouterr().err


def test_adapter_argument_errors_name_the_path(tmp_path, capsys):
    assert main(["eval", "--adapter", str(tmp_path / "nope")]) != 0
    assert "nope" in capsys.readouterr().err
