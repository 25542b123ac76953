"""Answer match for the user's own data (issue 20): exact match and JSON match of greedy answers to held-out
chats, before and after training, in summary.json and `peftkit eval --data`; validation loss at step 0."""

from __future__ import annotations

import json

import pytest

from peftkit.cli import main
from peftkit.train import answers

PAIRS = [("What colour is the sky?", {"colour": "blue", "sure": True}), ("Name a fruit.", {"fruit": "apple"}),
         ("Count to three.", {"count": [1, 2, 3]}), ("Say hi", "hi there")]  # the last answer is not JSON


# --- judging one answer ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reply, reference, want", [
    ('{"b": 2, "a": [1, 2]}', '{"a": [1, 2], "b": 2}', True),       # key order
    ('{"a":1}', '{ "a" : 1 }', True),                                 # spacing
    ('```json\n{"a": 1}\n```', '{"a": 1}', True),                   # a Markdown fence
    ('{"a": 1.0}', '{"a": 1}', True),                                 # numbers by value
    ('{"a": true}', '{"a": 1}', False),                               # true is not 1
    ('{"a": [2, 1]}', '{"a": [1, 2]}', False),                        # arrays keep their order
    ('{"a": 1', '{"a": 1}', False),                                   # not JSON
    ('Sure! {"a": 1}', '{"a": 1}', False),                            # prose around it is not the answer
    ('{"a": 1}', 'one', None),                                        # the reference is not JSON
    ('[' * 5000 + ']' * 5000, '[' * 5000 + ']' * 5000, None),         # deeper than the parser: exact match only
])
def test_json_equal(reply, reference, want):
    assert answers.json_equal(reply, reference) is want


def test_scores_count_exact_and_json_answers_apart():
    replies = ['{"b": 2, "a": 1}', " hi there ", '{"x": 0}', "nope"]
    references = ['{"a": 1, "b": 2}', "hi there", '{"x": 0}', '{"x": 1}']
    assert answers.score_answers(replies, references) == {"exact_match": 0.5, "json_match": 2 / 3, "examples": 4,
                                                          "json_examples": 3}
    assert answers.score_answers(["a"], ["b"])["json_match"] is None


def test_held_out_pairs_ask_everything_before_the_last_answer():
    chat = [{"role": "system", "content": "s"}, {"role": "user", "content": "u1"},
            {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"},
            {"role": "assistant", "content": "a2"}]
    prompts, references = answers.held_out_pairs([chat])
    assert prompts == [chat[:4]] and references == ["a2"]


# --- through the model ----------------------------------------------------------------------------------------------
def _records(n: int) -> list[dict]:
    return [{"instruction": q, "output": a if isinstance(a, str) else json.dumps(a)}
            for q, a in (PAIRS[i % len(PAIRS)] for i in range(n))]


@pytest.fixture(scope="module")
def json_run(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("answers")
    data = folder / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _records(48)))
    out = folder / "run"
    assert main(["train", "--model", tiny_model_dir, "--data", str(data), "--output-dir", str(out), "--max-steps",
                 "40", "--batch-size", "8", "--lr", "0.02", "--val-fraction", "0.1", "--no-progress",
                 "--threads", "1", "--save-every", "0"]) == 0
    return out, data


def test_custom_data_gets_a_before_and_after_table(json_run, capsys):
    out, _ = json_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_examples"] == 5 and summary["json_examples"] >= 3  # 5 held out; 3 of 4 answers are JSON
    assert summary["exact_match_before"] == 0.0 and summary["json_match_before"] == 0.0
    assert summary["exact_match_after"] >= 0.8 and summary["json_match_after"] >= 0.8, summary
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 0 and set(rows[0]) == {"step", "val_loss"}  # the curve's start: the base model
    assert summary["val_loss_start"] == rows[0]["val_loss"] > summary["val_loss"]
    assert rows[-1]["exact_match"] == summary["exact_match_after"]


def test_eval_scores_answers_on_a_data_file(json_run, capsys):
    out, data = json_run
    capsys.readouterr()
    assert main(["eval", "--adapter", str(out), "--data", str(data), "--examples", "8", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["examples"] == 8 and result["json_examples"] == 6
    assert result["exact_match"] >= 0.75 and result["json_match"] >= 0.75 and result["loss"] > 0
    assert main(["eval", "--adapter", str(out), "--data", str(data), "--examples", "8"]) == 0
    text = capsys.readouterr().out
    assert "on 8 examples" in text and "JSON match" in text and "of 6 JSON answers" in text
    assert main(["eval", "--adapter", str(out), "--data", str(data), "--examples", "0", "--json"]) == 0
    assert "exact_match" not in json.loads(capsys.readouterr().out)


def test_no_score_without_held_out_examples(tiny_model_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _records(4)))
    assert main(["train", "--model", tiny_model_dir, "--data", str(data), "--output-dir", str(tmp_path / "r"),
                 "--max-steps", "1", "--batch-size", "2", "--val-fraction", "0", "--no-progress", "--threads", "1",
                 "--save-every", "0"]) == 0
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["eval_examples"] == 0 and summary["exact_match_after"] is None
    assert summary["val_loss_start"] is None
