"""Warm-up on short runs (issue 20, item 2): the default warm-up is shortened to 10% of a short run and said;
a chosen one is kept, with a warning when the run ends inside it; the built-in task's schedule is unchanged."""

from __future__ import annotations

import json

import pytest

from peftkit.cli import main
from peftkit.train import options as opts
from peftkit.train.recipe import lr_lambda


def lrs(out) -> list[float]:
    rows = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    return [r["lr"] for r in rows if "lr" in r]


def test_default_warmup_is_shortened_to_a_tenth_of_a_short_run():
    o = opts.build({"data": "x.jsonl"})
    assert not o.warmup_given and o.warmup_steps == 10
    steps, note = opts.effective_warmup(o, 8)
    assert steps == 1 and "shortened from 10 to 1" in note and "--warmup-steps" in note
    factors = [lr_lambda(o.replace(schedule="constant", warmup_given=False), 8)(s) for s in range(8)]
    assert factors == [0.5] + [1.0] * 7  # warm-up is left after one step; the old schedule peaked at 8/11
    assert opts.effective_warmup(o, 100) == (10, None) and opts.effective_warmup(o, 1000) == (10, None)
    assert opts.effective_warmup(o, 1)[0] == 1


def test_a_chosen_warmup_is_kept_and_a_run_ending_inside_it_warns(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("warmup-steps: 10\n")
    for o in (opts.build({"data": "x.jsonl", "warmup_steps": 10}), opts.build({"data": "x.jsonl"}, str(cfg)),
              opts.build({"data": "x.jsonl"}).replace(warmup_steps=10)):
        assert o.warmup_given
        steps, note = opts.effective_warmup(o, 8)
        assert steps == 10 and note.startswith("WARNING") and "peaks at 0.000145" in note  # 2e-4 * 8 / 11
        assert opts.effective_warmup(o, 20) == (10, None)  # chosen and left before the end: nothing to say
    assert "warmup_given" not in opts.FIELDS  # not a flag, not a YAML key


def test_builtin_task_schedule_is_unchanged():
    o = opts.build({})
    assert (o.max_steps, o.warmup_steps) == (36, 4)
    assert opts.effective_warmup(o, 36) == (4, None)
    f = lr_lambda(o, 36)
    assert [f(s) for s in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8]) and f(4) == 1.0


def test_train_cli_short_run_leaves_warmup_and_says_so(tiny_model_dir, qa_jsonl, tmp_path, capsys):
    common = ["train", "--model", tiny_model_dir, "--data", qa_jsonl, "--max-steps", "8", "--batch-size", "4",
              "--lr", "0.01", "--schedule", "constant", "--no-progress", "--threads", "1", "--save-every", "0",
              "--max-length", "64", "--r", "2"]
    out = tmp_path / "short"
    assert main([*common, "--output-dir", str(out)]) == 0
    text = capsys.readouterr().out
    assert "warm-up shortened from 10 to 1 steps" in text and "warm-up 1 steps" in text
    assert lrs(out)[1:] == pytest.approx([0.01] * 7)  # at --lr from step 2 on
    assert json.loads((out / "summary.json").read_text())["warmup_steps"] == 1

    out = tmp_path / "chosen"
    assert main([*common, "--output-dir", str(out), "--warmup-steps", "10"]) == 0
    captured = capsys.readouterr()
    assert "WARNING: the run ends inside its warm-up" in captured.err and "shortened" not in captured.out
    assert max(lrs(out)) == pytest.approx(0.01 * 8 / 11)
    assert json.loads((out / "summary.json").read_text())["warmup_steps"] == 10
