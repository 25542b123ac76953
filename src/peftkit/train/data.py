"""Training data: read records, turn them into chats, tokenize with loss only on answers, batch them.

The pipeline is `read_records` -> `record_to_messages` (`to_chats`) -> `tokenize_messages` (labels.py;
`tokenize_chats`; all three via `build_examples`) -> `split_validation` -> `BatchOrder` + `collate`. Every problem a user can cause raises `DataError` naming the
file, the record and the fix; nothing is dropped without being counted in `DataStats`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from .labels import IGNORE_INDEX, DataError, Example, check_options, render_chat, tokenize_messages

# render_chat, tokenize_messages and the types are labels.py's; they are part of this module's API too
__all__ = ["IGNORE_INDEX", "DataError", "Example", "DataStats", "read_records", "record_to_messages", "render_chat",
           "tokenize_messages", "to_chats", "tokenize_chats", "build_examples", "split_validation", "collate",
           "BatchOrder"]

_JSONL_SUFFIXES = (".jsonl", ".jsonlines", ".ndjson")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system"}
_PAIRS = (("instruction", "output"), ("prompt", "completion"), ("question", "answer"))
_EXPECTED = ("'messages' (chat: [{role, content}]), 'conversations' (ShareGPT: [{from, value}]), "
             "'instruction' + 'output' (optional 'input'), 'prompt' + 'completion', or 'question' + 'answer'")


@dataclass
class DataStats:
    """What `build_examples` did with each record, so a run's log can say what was trained on."""

    records: int = 0
    kept: int = 0
    truncated: int = 0
    skipped_too_long: int = 0
    skipped_no_response: int = 0
    max_length: int | None = None  # only for describe()

    def describe(self) -> str:
        """One line, e.g. "1,000 records: 990 kept (12 truncated), 10 skipped (longer than 512 tokens)"."""
        line = f"{self.records:,} records: {self.kept:,} kept"
        if self.truncated:
            line += f" ({self.truncated:,} truncated)"
        limit = f"{self.max_length:,} tokens" if self.max_length is not None else "the length limit"
        reasons = [(n, why) for n, why in ((self.skipped_too_long, f"longer than {limit}"),
                                          (self.skipped_no_response, "no answer token left after truncation"))
                   if n]
        skipped = sum(n for n, _ in reasons)
        if len(reasons) == 1:
            line += f", {skipped:,} skipped ({reasons[0][1]})"
        elif reasons:
            line += f", {skipped:,} skipped (" + ", ".join(f"{n:,} {why}" for n, why in reasons) + ")"
        return line


def read_records(path: str | os.PathLike) -> list[dict]:
    """The records in a .jsonl file, a .json list of objects, or a directory saved by `datasets` ("train" split)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"no such file: {path}; pass a .jsonl file, a .json list of objects, or a directory "
                        "saved with datasets' save_to_disk")
    if path.is_dir():
        records = _read_saved_dataset(path)
    elif path.suffix.lower() in _JSONL_SUFFIXES + (".json",):
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path} is not UTF-8 text ({e}); re-save it as UTF-8") from e
        records = _parse_json(path, text) if path.suffix.lower() == ".json" else _parse_jsonl(path, text)
    else:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use .jsonl (one JSON object per line), "
                        ".json (a list of objects) or a directory saved with datasets' save_to_disk")
    if not records:
        raise DataError(f"{path} holds no records; add at least one example")
    return records


def _parse_jsonl(path: Path, text: str) -> list[dict]:
    records = []
    # lines end at "\n" only (a "\r" before it is whitespace to JSON): str.splitlines() would also split at
    # U+2028, U+2029 and U+0085, which may stand unescaped inside a JSON string
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {number}: not valid JSON ({e.msg} at column {e.colno}); "
                            "each line must hold exactly one JSON object") from e
        if not isinstance(value, dict):
            raise DataError(f"{path} line {number}: expected a JSON object such as {{\"messages\": [...]}}, "
                            f"got a {type(value).__name__}")
        records.append(value)
    return records


def _parse_json(path: Path, text: str) -> list[dict]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several objects, one per line: JSON lines under a .json name
            return _parse_jsonl(path, text)
        raise DataError(f"{path} line {e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from e
    if not isinstance(value, list):
        raise DataError(f"{path} holds a JSON {type(value).__name__}; expected a list of objects "
                        "(or a .jsonl file with one object per line)")
    for number, item in enumerate(value, start=1):
        if not isinstance(item, dict):
            raise DataError(f"{path} item {number}: expected a JSON object, got a {type(item).__name__}")
    return value


def _read_saved_dataset(path: Path) -> list[dict]:
    if not any((path / name).is_file() for name in ("dataset_dict.json", "dataset_info.json", "state.json")):
        raise DataError(f"{path} is a directory but not one saved by datasets' save_to_disk (no dataset_dict.json "
                        "or dataset_info.json); pass a .jsonl or .json file instead")
    try:
        import datasets
    except ImportError as e:
        raise DataError(f"{path} is a saved `datasets` directory; reading it needs the datasets package: "
                        "pip install datasets") from e
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise DataError(f"{path} has splits {sorted(loaded)} but no 'train' split; save the training "
                            "split as 'train' or save that Dataset on its own")
        loaded = loaded["train"]
    return [dict(row) for row in loaded]


def record_to_messages(record: dict, where: str = "") -> list[dict]:
    """The chat ([{"role", "content"}, ...]) a record in chat, ShareGPT or instruction format stands for."""
    where = where or "record"
    if "messages" in record or "conversations" in record:
        sharegpt = "messages" not in record
        turns = record["conversations" if sharegpt else "messages"]
        if not isinstance(turns, list) or not turns:
            raise DataError(f"{where}: {'conversations' if sharegpt else 'messages'} must be a non-empty list")
        messages = [_turn(turn, n, sharegpt, where) for n, turn in enumerate(turns, start=1)]
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: the chat has no assistant message, so there is nothing to learn; add the "
                            "answer as {\"role\": \"assistant\", \"content\": ...} or drop the record")
        return messages
    for prompt_key, answer_key in _PAIRS:
        if prompt_key in record and answer_key in record:
            prompt, answer = record[prompt_key], record[answer_key]
            extra = record.get("input") if prompt_key == "instruction" else None
            system = record.get("system")
            for key, value in ((prompt_key, prompt), (answer_key, answer), ("input", extra), ("system", system)):
                if not isinstance(value, str) and (value is not None or key in (prompt_key, answer_key)):
                    raise DataError(f"{where}: {key!r} must be a string, got a {type(value).__name__}")
            messages = [{"role": "system", "content": system}] if system else []
            messages.append({"role": "user", "content": prompt + (f"\n\n{extra}" if extra else "")})
            messages.append({"role": "assistant", "content": answer})
            return messages
    raise DataError(f"{where}: unknown record format with keys {sorted(record)}; expected {_EXPECTED}")


def _turn(turn: object, n: int, sharegpt: bool, where: str) -> dict:
    role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
    if not isinstance(turn, dict) or role_key not in turn or content_key not in turn:
        raise DataError(f"{where}: message {n} must be an object with {role_key!r} and {content_key!r}, got {turn!r}")
    role, content = turn[role_key], turn[content_key]
    role = _SHAREGPT_ROLES.get(role) if sharegpt else role
    if role not in ("system", "user", "assistant"):
        allowed = sorted(_SHAREGPT_ROLES) if sharegpt else ["assistant", "system", "user"]
        raise DataError(f"{where}: message {n} has {role_key} {turn[role_key]!r}; expected one of {allowed}")
    if not isinstance(content, str):
        raise DataError(f"{where}: message {n} {content_key} must be a string, got a {type(content).__name__}")
    return {"role": role, "content": content}


def to_chats(records: list[dict], source: str = "") -> list[list[dict]]:
    """Each record's chat (see `record_to_messages`); a record in no known format raises DataError naming
    "<source> record N" (N 1-based, in read order). Needs no tokenizer, so a run checks its data first."""
    return [record_to_messages(record, f"{source} record {n}" if source else f"record {n}")
            for n, record in enumerate(records, start=1)]


def tokenize_chats(chats: list[list[dict]], tokenizer, max_length: int, overflow: str = "truncate",
                   source: str = "") -> tuple[list[Example], DataStats]:
    """Tokenized examples for `chats` (from `to_chats`) and the counts of what was kept, truncated and skipped."""
    check_options(max_length, overflow)
    stats = DataStats(records=len(chats), max_length=max_length)
    examples = []
    for n, messages in enumerate(chats, start=1):
        try:
            example, status = tokenize_messages(tokenizer, messages, max_length, overflow)
        except DataError as e:
            raise DataError(f"{source} record {n}: {e}" if source else f"record {n}: {e}") from e
        if example is None:
            if status == "too_long":
                stats.skipped_too_long += 1
            else:
                stats.skipped_no_response += 1
            continue
        stats.kept += 1
        stats.truncated += status == "truncated"
        examples.append(dataclasses.replace(example, chat=n - 1))
    return examples, stats


def build_examples(records: list[dict], tokenizer, max_length: int, overflow: str = "truncate",
                   source: str = "") -> tuple[list[Example], DataStats]:
    """Tokenized examples for `records` and the counts of what was kept, truncated and skipped.

    `source` (the file name) goes into error messages as "<source> record N" (N 1-based, in read order)."""
    check_options(max_length, overflow)
    return tokenize_chats(to_chats(records, source), tokenizer, max_length, overflow, source)


def split_validation(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, validation): a seeded random `fraction` held out, at least one item when fraction > 0 and len >= 2.

    Both lists keep the input order; the same (examples, fraction, seed) always gives the same split."""
    if not 0 <= fraction < 1:
        raise DataError(f"validation fraction must be in [0, 1), got {fraction}")
    if fraction == 0 or len(examples) < 2:
        return list(examples), []
    n_val = min(len(examples) - 1, max(1, round(len(examples) * fraction)))
    held = set(random.Random(seed).sample(range(len(examples)), n_val))
    return ([x for i, x in enumerate(examples) if i not in held], [x for i, x in enumerate(examples) if i in held])


def collate(examples: list[Example], pad_id: int, pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Right-padded int64 (B, T) tensors: input_ids (pad_id), attention_mask (0 on padding), labels (-100 there)."""
    if not examples:
        raise DataError("cannot collate an empty batch")
    length = max(len(e.input_ids) for e in examples)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.int64)  # (B, T)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.int64)  # (B, T)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.int64)  # (B, T)
    for row, e in enumerate(examples):
        input_ids[row, :len(e.input_ids)] = torch.tensor(e.input_ids, dtype=torch.int64)
        labels[row, :len(e.labels)] = torch.tensor(e.labels, dtype=torch.int64)
        attention_mask[row, :len(e.input_ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class BatchOrder:
    """Which examples go into each optimizer step, as a pure function of (seed, step): resume needs only the step.

    Each epoch is a fresh permutation from torch.Generator().manual_seed(seed + epoch); steps take consecutive
    slices of global_batch examples from the concatenation of epochs (an epoch's last partial slice continues
    into the next epoch's permutation, so no example is dropped and none is seen twice within an epoch)."""

    def __init__(self, n_examples: int, global_batch: int, seed: int) -> None:
        if n_examples < 1 or global_batch < 1:
            raise DataError(f"need at least one example and a batch of at least one, got n_examples={n_examples}, "
                            f"global_batch={global_batch}")
        self.n_examples, self.global_batch, self.seed = n_examples, global_batch, seed
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            if len(self._perms) > 4:  # steps move forward; keep only a few recent epochs
                self._perms.clear()
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._perms[epoch] = torch.randperm(self.n_examples, generator=generator).tolist()
        return self._perms[epoch]

    def indices(self, step: int) -> list[int]:
        """The global batch (example indices) of optimizer step `step`, 0-based."""
        if step < 0:
            raise DataError(f"step must be >= 0, got {step}")
        first = step * self.global_batch
        return [self._perm(p // self.n_examples)[p % self.n_examples] for p in range(first, first + self.global_batch)]

    def epoch_of(self, step: int) -> float:
        """The fractional epoch reached once step `step` (0-based) is done."""
        return (step + 1) * self.global_batch / self.n_examples

    @staticmethod
    def shard(indices: list[int], rank: int, world_size: int) -> list[int]:
        """Rank's contiguous share of a global batch; the batch must divide evenly among the ranks."""
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world size {world_size}")
        if len(indices) % world_size:
            raise DataError(f"global batch {len(indices)} does not divide among {world_size} processes; choose a "
                            f"global batch that is a multiple of {world_size}")
        per = len(indices) // world_size
        return indices[rank * per:(rank + 1) * per]
