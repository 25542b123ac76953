"""`peftkit data preview` (records as training sees them, labelled part marked) and `generate`'s prompts of
several lines (--prompts-file, --separator)."""

from __future__ import annotations

import argparse
import io
import json

import pytest

from peftkit.cli import main
from peftkit.train.commands import read_prompts


def test_preview_marks_exactly_the_answers(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    records = [{"instruction": "Extract the id.", "input": "order 12", "output": "{\"id\": 12}"},
               {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                             {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Ciao"}]}]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["data", "preview", str(data), "--model", tiny_model_dir, "--color", "never", "--json"]) == 0
    out = capsys.readouterr().out
    # the instruction record: instruction, a blank line, the input as the user message; only the answer marked
    assert "Extract the id.\n\norder 12<|im_end|>" in out
    assert "\u00ab{\"id\": 12}<|im_end|>\n\u00bb" in out
    assert "\u00abHello<|im_end|>\n\u00bb" in out and "\u00abCiao<|im_end|>\n\u00bb" in out
    assert "\u00abBye" not in out and "\u00abHi" not in out and "\u00abExtract" not in out
    counts = json.loads(out.strip().splitlines()[-1])
    assert counts["records"] == 2 and counts["kept"] == 2 and counts["labelled_tokens"] > 0
    assert "--- record 1: user (25 chars), assistant (10 chars)" in out


def test_preview_reports_a_bad_record_and_a_missing_file(tiny_model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x", "output": "y"}\n{"text": "no answer here"}\n')
    assert main(["data", "preview", str(bad), "--model", tiny_model_dir]) == 2
    assert "record 2: unknown record format" in capsys.readouterr().err
    assert main(["data", "preview", str(tmp_path / "none.jsonl")]) == 2
    assert "no such file" in capsys.readouterr().err


def _args(**kw) -> argparse.Namespace:
    return argparse.Namespace(**({"prompt": [], "prompts_file": None, "separator": None} | kw))


def test_prompts_from_a_file_and_from_separated_stdin(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join(json.dumps(v) for v in [
        "line one\nline two", {"prompt": "p"}, {"instruction": "do", "input": "this"},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]) + "\n")
    assert read_prompts(_args(prompts_file=str(f))) == ["line one\nline two", "p", "do\n\nthis",
                                                         [{"role": "user", "content": "q"}]]
    text = "first\nstill first\n---\nsecond\n---\n\n"
    assert read_prompts(_args(separator="---"), io.StringIO(text)) == ["first\nstill first", "second"]
    assert read_prompts(_args(), io.StringIO("a\n\nb\n")) == ["a", "b"]


@pytest.mark.parametrize("content, message", [
    ("[1, 2]\n", "expected a JSON string or object, got a list"),
    ("{nope\n", "line 1: not valid JSON"),
    ('{"text": "x"}\n', "with 'prompt', 'instruction'"),
    ('{"messages": [{"role": "robot", "content": "x"}]}\n', "message 1 must be"),
])
def test_a_bad_prompts_file_is_named_before_the_model_loads(tmp_path, capsys, content, message):
    f = tmp_path / "p.jsonl"
    f.write_text(content)
    assert main(["generate", "--prompts-file", str(f), "--model", str(tmp_path / "no-model")]) == 2
    assert message in capsys.readouterr().err


def test_generate_answers_a_multi_line_prompt(tiny_model_dir, tmp_path, capsys):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps("Two lines:\nhere") + "\n" + json.dumps({"prompt": "one"}) + "\n")
    assert main(["generate", "--model", tiny_model_dir, "--prompts-file", str(f), "--max-new-tokens", "3",
                 "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in rows] == ["Two lines:\nhere", "one"]
