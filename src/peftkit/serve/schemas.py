"""Pydantic models of the OpenAI API subset that `peftkit serve` speaks: completions, chat completions,
their streamed chunks, the model list, and OpenAI's error shape.

Requests accept every field the official clients send. Fields peftkit does not implement (penalties,
logprobs, tools, ...) are accepted at their neutral value and refused with a 400 naming the field
otherwise, so nothing a client asks for is dropped silently; unknown fields are refused the same way.
Text must be Unicode: a lone UTF-16 surrogate (JSON's "\\ud800" without its pair) is refused with a 400 naming
the field, since no tokenizer can take it. A temperature or top_p so small that sampling can only pick the
most likely token is served as greedy decoding (see sampling()), so no logit is ever divided by a subnormal.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

MAX_N = 16  # choices per request; each one is a separate engine request
GREEDY_TEMPERATURE = 1e-5  # below it, sampling is the argmax anyway (vLLM's _SAMPLING_EPS); logits / T overflows
GREEDY_TOP_P = 1e-8  # below 1 / vocabulary size: only the most likely token is ever kept


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None  # accepted and ignored, as OpenAI only uses it for abuse monitoring
    # accepted at their neutral value only (see unsupported())
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: Any = None

    @model_validator(mode="before")
    @classmethod
    def _check_text(cls, data: Any) -> Any:
        if (field := lone_surrogate(data)) is not None:
            raise PydanticCustomError("lone_surrogate", "{field} holds a lone UTF-16 surrogate (a \\ud800-\\udfff "
                                      "escape without its pair), which is not Unicode text; send valid UTF-8 text",
                                      {"field": field})
        return data

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> list[str] | None:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4:
            raise ValueError(f"at most 4 stop sequences are allowed, got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty strings")
        return stops or None

    def stops(self) -> list[str]:
        return list(self.stop or [])

    def sampling(self) -> tuple[float, float]:
        """(temperature, top_p) for the engine. A temperature below GREEDY_TEMPERATURE or a top_p below
        GREEDY_TOP_P leaves only the most likely token to draw, so it is served as greedy decoding (0.0, 1.0):
        what a client asking for "temperature near 0" expects, and logits / 1e-39 would overflow to inf."""
        if self.temperature < GREEDY_TEMPERATURE or self.top_p < GREEDY_TOP_P:
            return 0.0, 1.0
        return self.temperature, self.top_p

    def unsupported(self) -> list[str]:
        """Fields set to something peftkit cannot honour (each would change the output if ignored)."""
        bad = [name for name in ("presence_penalty", "frequency_penalty") if getattr(self, name) not in (None, 0)]
        if self.logit_bias:
            bad.append("logit_bias")
        if self.logprobs not in (None, False, 0):
            bad.append("logprobs")
        return bad


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def unsupported(self) -> list[str]:
        bad = super().unsupported()
        if self.echo:
            bad.append("echo")
        if self.suffix:
            bad.append("suffix")
        if self.best_of not in (None, 1, self.n):
            bad.append("best_of")
        return bad

    def prompts(self) -> list[str | list[int]]:
        """The prompts as texts or token-id lists (OpenAI accepts a string, strings, ids, or lists of ids)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise ValueError("prompt must not be empty: give a string, strings, token ids or lists of ids")
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # e.g. `name`, `refusal`: no effect on rendering
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: Any = None
    parallel_tool_calls: bool | None = None

    def unsupported(self) -> list[str]:
        bad = super().unsupported()
        if self.top_logprobs:
            bad.append("top_logprobs")
        if self.tools:
            bad.append("tools")
        if self.tool_choice not in (None, "none", "auto"):
            bad.append("tool_choice")
        if self.response_format not in (None, {"type": "text"}):
            bad.append("response_format")
        return bad

    def limit(self) -> int | None:
        """max_completion_tokens (the newer name) or max_tokens."""
        return self.max_completion_tokens or self.max_tokens

    def rendered_messages(self) -> list[dict]:
        """Messages as the chat template wants them; OpenAI's `developer` role is a system message."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


# --- responses ------------------------------------------------------------------------------------------
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: str | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "peftkit"
    parent: str | None = None  # the base an adapter runs on; None for the base itself


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def error_body(message: str, type_: str = "invalid_request_error", code: str | None = None,
               param: str | None = None) -> dict:
    """OpenAI's error JSON: {"error": {"message", "type", "param", "code"}}. A lone surrogate that a message
    quotes from the request is written as its escape, so the error itself can always be encoded."""
    return {"error": {"message": unicode_safe(message), "type": type_, "param": unicode_safe(param), "code": code}}


def unicode_safe(text: str | None) -> str | None:
    """`text` with any lone surrogate written as a backslash escape (UTF-8 cannot encode it)."""
    if text is None or text.isascii():
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def lone_surrogate(data: Any) -> str | None:
    """Where parsed JSON holds a lone UTF-16 surrogate in a string or a key (JSON's escapes can carry one,
    Unicode text cannot), as a path such as "messages[0].content"; None when there is none."""
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            if not value.isascii() and unicode_safe(value) != value:
                return path or "the request body"
        elif isinstance(value, dict):
            for key, item in value.items():
                if isinstance(key, str) and not key.isascii() and unicode_safe(key) != key:
                    return f"a key of {path or 'the request body'}"
                if isinstance(item, (str, list, dict)):
                    stack.append((f"{path}.{key}" if path else str(key), item))
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", item) for i, item in enumerate(value) if isinstance(item, (str, list, dict)))
    return None


_Request.model_rebuild()
CompletionRequest.model_rebuild()
ChatRequest.model_rebuild()
