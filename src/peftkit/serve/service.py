"""What the HTTP routes of `peftkit serve` call: one object holding the engine, the adapter registry, the
tokenizer (behind a lock), the metrics and the server's limits, with plain methods for each step.

    service = ServeService(engine, registry, tokenizer, model_name="smollm2", stop_token_ids=(2,))
    handles = await service.start(req, ["Hello"])   # checked against every limit, then submitted

The routes stay thin: they parse the request, call the service and shape the reply. Every limit a request
can break is checked here before anything reaches the engine, so a refused request costs no batch row; text
far longer than the context could hold is refused before the tokenizer sees it (a 1 MB prompt takes seconds
to tokenize and ends in a 400 anyway).
"""

from __future__ import annotations

import time

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from .access import note
from .limits import ApiError
from .metrics import Metrics
from .request import EngineClosed, GenRequest
from .schemas import ChatRequest, CompletionRequest, ModelCard
from .textstream import LockedTokenizer

MAX_ROWS = 64  # prompts x n in one request
CHARS_PER_TOKEN = 32  # a generous bound: text over context_length x this many characters cannot fit
ENDPOINTS = {"/v1/completions": "completions", "/v1/chat/completions": "chat.completions"}


class ServeService:
    """The state behind the routes. context_length: the model's positions (a prompt plus max_tokens beyond it
    is refused with 400); stop_token_ids: ids that end every reply (eos, end of turn)."""

    def __init__(self, engine, registry, tokenizer, *, model_name: str, context_length: int | None = None,
                 stop_token_ids: tuple[int, ...] | list[int] = (), max_tokens_limit: int = 2048) -> None:
        self.engine, self.registry, self.model_name = engine, registry, model_name
        self.context_length, self.max_tokens_limit = context_length, max_tokens_limit
        self.metrics = Metrics(registry.stats, engine.stats)
        self.tok = LockedTokenizer(tokenizer)
        self.vocab = len(tokenizer)
        self.started = int(time.time())
        self.stops = tuple(int(i) for i in stop_token_ids)

    # --- metrics labels ---------------------------------------------------------------------------------------
    @staticmethod
    def endpoint_of(path: str) -> str:
        """A bounded label: the generation endpoints by name, any other path as "other"."""
        return ENDPOINTS.get(path, "other")

    def model_label(self, model: str, status: int) -> str:
        """The request's model as a metrics label; names that were refused share one label (bounded)."""
        if model == self.model_name or status < 400:
            return model
        return model if status not in (400, 404) and self.registry.has(model) else "_invalid"

    def finish(self, request: Request, model: str, endpoint: str, status: int, seconds: float,
               prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        """Count a finished generation request in the metrics and note it for the access log."""
        self.metrics.observe(self.model_label(model, status), endpoint, status, seconds, prompt_tokens,
                             completion_tokens)
        note(request, model=model, status=status, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)

    def observe_refused(self, path: str, status: int) -> None:
        """Count a request refused before it reached an endpoint (body limit, validation, internal error)."""
        self.metrics.observe("_invalid", self.endpoint_of(path), status, 0.0)

    # --- generation -----------------------------------------------------------------------------------------
    def check_text_size(self, sizes: list[int], param: str) -> None:
        """400 for a text (of sizes[i] characters) that cannot fit in the context whatever its tokens, checked
        before tokenizing it, so huge prompts cost neither the tokenizer's time nor its lock."""
        if not self.context_length:
            return
        limit = self.context_length * CHARS_PER_TOKEN
        for i, size in enumerate(sizes):
            if size > limit:
                where = f"prompt {i}" if len(sizes) > 1 else ("the messages' text" if param == "messages" else
                                                              "the prompt")
                raise ApiError(400, f"{where} has {size} characters, more than this server tokenizes: the model's "
                               f"context of {self.context_length} tokens x {CHARS_PER_TOKEN} characters per token = "
                               f"{limit} characters; shorten it", param=param)

    def asked_tokens(self, prompts: list, req) -> int | None:
        """The request's max_tokens (None: not given), after the per-request row and token limits."""
        if len(prompts) * req.n > MAX_ROWS:
            raise ApiError(400, f"{len(prompts)} prompts x n={req.n} is {len(prompts) * req.n} completions; "
                           f"at most {MAX_ROWS} per request", param="n")
        asked = req.limit() if isinstance(req, ChatRequest) else req.max_tokens
        if asked is not None and asked > self.max_tokens_limit:
            raise ApiError(400, f"max_tokens={asked} is above this server's limit of {self.max_tokens_limit} "
                           "(--max-tokens-limit); ask for fewer tokens", param="max_tokens")
        return asked

    def prepare(self, prompts: list[str | list[int]], req) -> list[tuple[list[int], int]]:
        """(prompt ids, max_tokens) per prompt, after every limit check; nothing is submitted yet."""
        asked = self.asked_tokens(prompts, req)
        context_length, out = self.context_length, []
        for i, prompt in enumerate(prompts):
            ids = self.tok.encode(prompt) if isinstance(prompt, str) else prompt
            where = f"prompt {i}" if len(prompts) > 1 else "the prompt"
            if not ids:
                raise ApiError(400, f"{where} is empty; it needs at least one token to continue", param="prompt")
            if isinstance(prompt, list) and not all(0 <= t < self.vocab for t in ids):
                raise ApiError(400, f"{where} has token ids outside the vocabulary [0, {self.vocab})", param="prompt")
            room = (context_length - len(ids)) if context_length else self.max_tokens_limit
            if room < 1:
                raise ApiError(400, f"{where} has {len(ids)} tokens, at or above the model's context length of "
                               f"{context_length}; shorten it", param="prompt")
            default = 16 if isinstance(req, CompletionRequest) else self.max_tokens_limit
            max_tokens = asked if asked is not None else min(default, room)
            if max_tokens > room:
                raise ApiError(400, f"{where} has {len(ids)} tokens and max_tokens={max_tokens}: together more than "
                               f"the model's context length of {context_length}; lower max_tokens or shorten the "
                               "prompt", param="max_tokens")
            out.append((ids, max_tokens))
        return out

    def submit(self, prepared: list[tuple[list[int], int]], req) -> list:
        """One engine request per (prompt, choice); on any failure the ones already submitted are cancelled."""
        adapter = None if req.model == self.model_name else req.model
        temperature, top_p = req.sampling()
        handles = []
        try:
            for ids, max_tokens in prepared:
                for j in range(req.n):
                    seed = None if req.seed is None else req.seed + j
                    handles.append(self.engine.submit(GenRequest(
                        prompt_ids=list(ids), adapter=adapter, max_tokens=max_tokens, temperature=temperature,
                        top_p=top_p, seed=seed, stop_token_ids=self.stops)))
        except BaseException:
            for handle in handles:
                handle.cancel()
            raise
        return handles

    def start_now(self, prompts: list, req) -> list:
        """prepare + submit, with the engine's own refusals turned into the client's errors (blocking)."""
        try:
            return self.submit(self.prepare(prompts, req), req)
        except ValueError as err:  # the engine's own checks of a request
            raise ApiError(400, str(err)) from err
        except EngineClosed as err:  # the server is stopping
            raise ApiError(503, f"{err}; retry on another server or once this one is back",
                           code="shutting_down") from err

    async def start(self, req, prompts: list) -> list:
        """The engine handles of a request (n per prompt, prompt-major), or the error that refused it."""
        if bad := req.unsupported():
            raise ApiError(400, f"peftkit serve does not support {', '.join(bad)}; leave "
                           f"{'them' if len(bad) > 1 else 'it'} unset", param=bad[0])
        self.check_text_size([len(p) if isinstance(p, str) else 0 for p in prompts], "prompt")
        return await run_in_threadpool(self.start_now, prompts, req)

    def render_chat(self, req: ChatRequest) -> str:
        """The chat request's messages as one prompt (blocking: the tokenizer's template)."""
        self.check_text_size([sum(len(m.text()) for m in req.messages)], "messages")
        try:
            return self.tok.render_chat(req.rendered_messages())
        except ValueError as err:
            raise ApiError(400, str(err), param="messages") from err

    # --- models, health ---------------------------------------------------------------------------------------
    def cards(self) -> list[ModelCard]:
        """The base first, then every adapter the registry can serve (blocking: it may scan the directory)."""
        base = ModelCard(id=self.model_name, created=self.started)
        return [base] + [ModelCard(id=n, created=self.started, parent=self.model_name)
                         for n in self.registry.names() if n != self.model_name]

    def card(self, model: str) -> ModelCard:
        for card in self.cards():
            if card.id == model:
                return card
        raise ApiError(404, f"model {model!r} is neither the base ({self.model_name!r}) nor an adapter this server "
                       "has; GET /v1/models lists them", param="model")

    def health(self) -> dict:
        stats = self.registry.stats()
        return {"status": "ok", "model": self.model_name, "adapters_loaded": stats.get("loaded", 0),
                "queue_depth": self.engine.stats().get("queue_depth", 0)}


def service_of(request: Request) -> ServeService:
    """The service of the app that received `request` (create_app puts it in app.state)."""
    return request.app.state.service
