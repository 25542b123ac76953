"""Continuous batching: one background thread runs the decode steps of every active request together.

New requests are prefilled together (their prompts left-padded in one forward, each row with its adapter's
slot; each row's cache is then cut to its own tokens, as a prefill alone gives it), then join the batch.
A prompt longer than `prefill_chunk` tokens is prefilled chunk by chunk into its own cache instead, one
chunk per loop turn with a decode step for the running rows in between, and joins when complete, so a long
prompt stalls the others for one chunk, not for its whole prefill (prefill.py). A request whose client left
is dropped before its prefill, or at the next chunk. Every decode step is ONE forward over all active rows
(up to max_batch) with a shared KV cache, rows of different adapters side by side (the slot layers route
them, see batched.py). Rows join and leave between steps. Rows hold different lengths, so the cache is
left-padded; the attention mask hides the padding and explicit position_ids give each row its own positions,
which is what makes a greedy response equal to the same request served alone. Finished rows are dropped and
columns that are padding for every row are cut (kv.py).

Sampling is per row with the request's own torch.Generator (seeded from `seed`), so batch neighbours never
change a row's random draws; temperature 0 is greedy. A request ends at a stop token ("stop"), at max_tokens
("length"), when cancelled ("cancelled") or on an error ("error", with a message); a failed batched step is
retried row by row, so only the rows that fail on their own end with "error", and the loop keeps running.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import hf
from ..hf import cache_length, kv_tensors, new_cache
from .kv import join_rows, keep_rows
from .prefill import ChunkedPrefill, RowKV, admit_count, batched_prefill, is_chunked
from .registry import AdapterRegistry, Lease
from .request import EngineClosed, GenRequest, Handle, QueueFull, request_problems

__all__ = ["Engine", "EngineClosed", "GenRequest", "Handle", "QueueFull", "sample"]


def refuse_unverified(model: nn.Module) -> None:
    """A ValueError for a transformers model whose architecture the serving parity test does not verify (the
    engine's batching would risk answers that differ from the model's own); other modules are served as they are."""
    kind = hf.model_type(model)
    if kind is None or "serve" in hf.verified_features(model):
        return
    why = hf.SERVE_UNVERIFIED.get(kind, "no test has checked that batched answers equal the model's own")
    served = sorted(t for t, f in hf.VERIFIED.items() if "serve" in f)
    raise ValueError(f"serving is not verified for architecture {kind!r}: {why}. Verified: {', '.join(served)}. "
                     "Use `peftkit generate` for it, or merge the adapter (`peftkit merge`) and serve the merged model "
                     "with another server")


@dataclass
class _Row:
    handle: Handle
    req: GenRequest
    lease: Lease | None
    slot: int  # -1: the base
    generator: torch.Generator | None
    length: int = 0  # tokens of this row in the KV cache
    last: int = 0  # the token to feed at the next step


class Engine:
    """The batching loop over one model and its adapter registry (model.eval() is called: serving never trains).

    prefill_chunk: the most prompt tokens one prefill forward takes (padding counted); longer prompts are
    prefilled in chunks between decode steps. None: every prompt whole, whatever its length."""

    def __init__(self, model: nn.Module, registry: AdapterRegistry, max_batch: int = 16, max_queue: int = 256,
                 prefill_chunk: int | None = 512) -> None:
        if max_batch < 1 or max_queue < 1:
            raise ValueError(f"max_batch and max_queue must be at least 1, got {max_batch} and {max_queue}")
        if prefill_chunk is not None and (not isinstance(prefill_chunk, int) or prefill_chunk < 1):
            raise ValueError(f"prefill_chunk (--prefill-chunk) must be a positive number of tokens, or None (0 on the "
                             f"command line) for whole prompts; got {prefill_chunk!r}")
        refuse_unverified(model)
        self.model = model.eval()
        self.registry = registry
        self.bank = registry.bank
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self._cache_arg = hf.cache_arg(model) or "past_key_values"
        self._keep_arg = hf.forward_accepts(model, "logits_to_keep")
        odd = sorted(set(hf.layer_types(model)) - hf.PLAIN_KV_LAYER_TYPES)
        if odd:
            raise ValueError(f"the batching engine keeps a plain key/value cache per attention layer; this model "
                             f"has layers of type {odd}, which it cannot batch yet. Serve an attention-only model")
        self.max_positions = hf.context_length(model)
        self.vocab_size = hf.vocab_size(model)
        self.device = next(model.parameters()).device
        self._cond = threading.Condition()
        self._count_lock = threading.Lock()
        self._queue: deque[_Row] = deque()
        self._rows: list[_Row] = []
        self._prefilling: deque[tuple[_Row, ChunkedPrefill]] = deque()  # long prompts, first in line first
        self._cache = None  # the batch's transformers cache, (B, H, T, D) per layer, left-padded
        self._thread: threading.Thread | None = None
        self._closed = False
        self._stats = {"steps": 0, "batched_rows": 0, "prefills": 0, "prefill_chunks": 0, "prefill_tokens": 0,
                       "completed": 0, "errors": 0, "generated_tokens": 0}

    # --- public -----------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="peftkit-engine", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop the loop; requests still queued or running end with "cancelled"."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._cond:
            rows, self._queue = list(self._queue), deque()
        for row in rows + [r for r, _ in self._prefilling] + self._rows:
            self._end(row, "cancelled", "the server is shutting down")
        self._rows, self._cache, self._prefilling = [], None, deque()

    def submit(self, req: GenRequest) -> Handle:
        """Queue a request; raises ValueError (bad request), AdapterError (from acquire), QueueFull,
        EngineClosed. Everything that can fail is checked before the adapter's lease is taken."""
        self._check(req)
        with self._cond:
            if self._closed:
                raise EngineClosed("the engine is closed")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are waiting (max_queue {self.max_queue}); retry later")
        generator = None
        if req.temperature > 0:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(req.seed) if req.seed is not None else generator.seed()
        lease = self.registry.acquire(req.adapter) if req.adapter is not None else None
        handle = Handle(len(req.prompt_ids), on_cancel=self._cancel_queued)
        row = _Row(handle, req, lease, lease.slot if lease else -1, generator)
        with self._cond:
            if len(self._queue) >= self.max_queue or self._closed:
                full = not self._closed
                if lease is not None:
                    lease.release()
                raise (QueueFull(f"the queue is full (max_queue {self.max_queue}); retry later") if full
                       else EngineClosed("the engine is closed"))
            self._queue.append(row)
            self._cond.notify_all()
        return row.handle

    def stats(self) -> dict:
        with self._cond:
            queued = len(self._queue)
        return {"queue_depth": queued, "active": len(self._rows), "prefilling": len(self._prefilling), **self._stats}

    def _check(self, req: GenRequest) -> None:
        if problems := request_problems(req, self.vocab_size, self.max_positions):
            raise ValueError("; ".join(problems))

    def _cancel_queued(self, handle: Handle) -> None:
        with self._cond:
            row = next((r for r in self._queue if r.handle is handle), None)
            if row is not None:
                self._queue.remove(row)
        if row is not None:
            self._end(row, "cancelled")

    # --- the loop (engine thread) -----------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._closed and not self._queue and not self._rows and not self._prefilling:
                        self._cond.wait()
                    if self._closed:
                        return
                    room = self.max_batch - len(self._rows) - len(self._prefilling)
                    take = admit_count((len(r.req.prompt_ids) for r in self._queue), room, self.prefill_chunk)
                    new = [self._queue.popleft() for _ in range(take)]
                ready: list[tuple[_Row, RowKV]] = []  # a long prompt's row whose prefill completed, to join
                try:
                    self._join(self._admit_all(self._chunk_long(new)))
                    ready = self._prefill_step()
                    self._join(ready)
                    self._drop([r for r in self._rows if r.handle.cancelled.is_set()], "cancelled")
                    if self._rows:
                        self._decode()
                except Exception as err:  # noqa: BLE001 - a bug here must not stop serving everyone else
                    rows = new + [r for r, _ in ready + list(self._prefilling)] + self._rows
                    for row in {id(r): r for r in rows if not r.handle.done}.values():
                        self._end(row, "error", f"internal error in the batching loop: {err!r}")
                    self._rows, self._cache, self._prefilling = [], None, deque()

    def _forward(self, ids: Tensor, positions: Tensor, mask: Tensor, slots: list[int], cache) -> tuple[Tensor, object]:
        """Last-position logits (B, V) and the updated cache for ids (B, t) at `positions` (B, t)."""
        kwargs = {self._cache_arg: cache, "use_cache": True}
        if self._keep_arg:
            kwargs["logits_to_keep"] = 1
        with self.bank.rows(slots):
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, **kwargs)
        return out.logits[:, -1], cache

    def _chunk_long(self, rows: list[_Row]) -> list[_Row]:
        """Line up the rows whose prompts are prefilled in chunks; the others, to prefill whole now."""
        whole = []
        for row in rows:
            if is_chunked(len(row.req.prompt_ids), self.prefill_chunk):
                self._prefilling.append((row, ChunkedPrefill(row.req.prompt_ids, row.slot, self.prefill_chunk,
                                                             self.device)))
            else:
                whole.append(row)
        return whole

    def _admit_all(self, rows: list[_Row]) -> list[tuple[_Row, RowKV]]:
        """Prefill the new short requests together (prefill.batched_prefill) and return (row, its own cache)
        for the rows that go on; requests whose clients left are dropped first, without a prefill. If the
        batched prefill fails, each row is prefilled alone, so only a row at fault fails."""
        rows = [r for r in rows if not self._ended_by_cancel(r)]
        if not rows:
            return []
        try:
            logits, kvs = batched_prefill(self._forward, [r.req.prompt_ids for r in rows], [r.slot for r in rows],
                                          self.device)
        except Exception as err:  # noqa: BLE001 - find the rows that fail on their own
            if len(rows) == 1:
                self._end(rows[0], "error", f"prefill failed: {err!r}")
                return []
            return [joined for r in rows for joined in self._admit_all([r])]
        self._stats["prefills"] += len(rows)
        self._stats["prefill_tokens"] += sum(len(r.req.prompt_ids) for r in rows)
        for row in rows:
            row.length = len(row.req.prompt_ids)
        return [(row, kv) for row, kv, going_on in zip(rows, kvs, self._emit(rows, logits)) if going_on]

    def _ended_by_cancel(self, row: _Row) -> bool:
        if row.handle.cancelled.is_set():
            self._end(row, "cancelled")
            return True
        return False

    def _prefill_step(self) -> list[tuple[_Row, RowKV]]:
        """Drop the long prompts whose clients left (before their first chunk or between two), then run the
        next chunk of the first one; [(row, its cache)] when that completes its prompt and the row goes on."""
        for item in [p for p in self._prefilling if p[0].handle.cancelled.is_set()]:
            self._prefilling.remove(item)
            self._end(item[0], "cancelled")
        if not self._prefilling:
            return []
        row, prefill = self._prefilling[0]
        before = prefill.done
        try:
            logits = prefill.step(self._forward)
        except Exception as err:  # noqa: BLE001 - this request fails, nobody else
            self._prefilling.popleft()
            self._end(row, "error", f"prefill failed at prompt token {before}: {err!r}")
            return []
        self._stats["prefill_chunks"] += 1
        self._stats["prefill_tokens"] += prefill.done - before
        if logits is None:
            return []
        self._prefilling.popleft()
        self._stats["prefills"] += 1
        row.length = prefill.done
        return [(row, prefill.kv())] if self._emit([row], logits)[0] else []

    def _decode(self) -> None:
        """One forward for every active row, then sampling row by row."""
        rows = self._rows
        T = cache_length(self._cache)
        lengths = torch.tensor([r.length for r in rows], device=self.device)  # (B,)
        ids = torch.tensor([[r.last] for r in rows], device=self.device)  # (B, 1)
        mask = (torch.arange(T + 1, device=self.device)[None] >= (T - lengths)[:, None]).long()  # (B, T + 1)
        before = kv_tensors(self._cache)
        try:
            logits, cache = self._forward(ids, lengths[:, None], mask, [r.slot for r in rows], self._cache)
        except Exception:  # noqa: BLE001 - find the rows that fail on their own
            self._decode_one_by_one(before)
            return
        self._stats["steps"] += 1
        self._stats["batched_rows"] += len(rows)
        for r in rows:
            r.length += 1
        self._cache = cache
        keep = [i for i, going_on in enumerate(self._emit(rows, logits)) if going_on]
        self._keep(keep)

    def _decode_one_by_one(self, before: list[tuple[Tensor, Tensor]]) -> None:
        """After a failed batched step: each row alone, from its own slice of the cache before the step."""
        T = before[0][0].shape[-2] if before else 0
        survivors: list[tuple[_Row, list]] = []
        for i, row in enumerate(self._rows):
            kv = [(k[i:i + 1, :, T - row.length:], v[i:i + 1, :, T - row.length:]) for k, v in before]
            ids = torch.tensor([[row.last]], device=self.device)
            mask = torch.ones(1, row.length + 1, dtype=torch.long, device=self.device)
            positions = torch.tensor([[row.length]], device=self.device)
            try:
                logits, cache = self._forward(ids, positions, mask, [row.slot], new_cache(kv))
            except Exception as err:  # noqa: BLE001
                self._end(row, "error", f"decode step failed: {err!r}")
                continue
            row.length += 1
            if self._emit([row], logits)[0]:
                survivors.append((row, kv_tensors(cache)))
        self._stats["steps"] += 1
        self._rows, self._cache = [], None
        try:
            self._join(survivors)
        except Exception as err:  # noqa: BLE001 - e.g. out of memory for the new cache: end them, never lose them
            for row, _ in survivors:
                self._end(row, "error", f"rejoining the batch failed: {err!r}")
            self._rows, self._cache = [], None

    def _emit(self, rows: list[_Row], logits: Tensor) -> list[bool]:
        """Pick each row's next token from its logits (B, V) and hand it out; per row, whether it goes on.
        Greedy picks and log-probabilities are read for the whole batch at once (no device sync per row);
        sampled rows draw one by one from their own generators."""
        logprobs = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1)  # (B, V)
        greedy = logits.argmax(-1).tolist()
        tokens: list[int | None] = []
        for i, row in enumerate(rows):
            req = row.req
            try:
                tokens.append(greedy[i] if req.temperature <= 0 else
                              sample(logits[i], req.temperature, req.top_p, row.generator))
            except Exception as err:  # noqa: BLE001 - e.g. NaN logits: this row only
                self._end(row, "error", f"sampling failed: {err!r}")
                tokens.append(None)
        index = torch.tensor([0 if t is None else t for t in tokens], device=logits.device)
        chosen = logprobs.gather(1, index[:, None])[:, 0].tolist()
        return [token is not None and self._hand_out(row, token, logprob)
                for row, token, logprob in zip(rows, tokens, chosen)]

    def _hand_out(self, row: _Row, token: int, logprob: float) -> bool:
        req = row.req
        self._stats["generated_tokens"] += 1
        stop = token in req.stop_token_ids
        row.handle._push(None if stop else token, logprob)
        if stop or row.handle.completion_tokens >= req.max_tokens:
            self._end(row, "stop" if stop else "length")
            return False
        if row.handle.cancelled.is_set():
            self._end(row, "cancelled")
            return False
        row.last = token
        return True

    def _end(self, row: _Row, reason: str, error: str | None = None) -> None:
        if row.lease is not None:
            row.lease.release()
            row.lease = None
        with self._count_lock:  # _end also runs on HTTP threads (a queued request cancelled there)
            self._stats["completed"] += 1
            if reason == "error":
                self._stats["errors"] += 1
        row.handle._finish(reason, error)

    # --- the batch's cache --------------------------------------------------------------------------
    def _join(self, joining: list[tuple[_Row, RowKV]]) -> None:
        """Append rows (each with its cache, (1, H, L, D) per layer) to the batch in one copy, left-padding
        every part to the longest."""
        if not joining:
            return
        parts = ([(self._rows, kv_tensors(self._cache))] if self._rows else []) + [([r], kv) for r, kv in joining]
        cache = new_cache(join_rows([kv for _, kv in parts]))
        self._rows, self._cache = [r for rows, _ in parts for r in rows], cache

    def _keep(self, keep: list[int]) -> None:
        """Keep rows `keep` of the batch and cut columns that are padding in every remaining row."""
        if len(keep) == len(self._rows):
            return
        self._rows = [self._rows[i] for i in keep]
        if not self._rows:
            self._cache = None
            return
        self._cache = new_cache(keep_rows(kv_tensors(self._cache), keep, max(r.length for r in self._rows)))

    def _drop(self, rows: list[_Row], reason: str) -> None:
        if rows:
            gone = {id(r) for r in rows}
            keep = [i for i, r in enumerate(self._rows) if id(r) not in gone]
            for r in rows:
                self._end(r, reason)
            self._keep(keep)


def sample(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """One token from logits (V,): argmax when temperature is 0, else softmax(logits / T) restricted to the
    smallest set of most likely tokens whose probability reaches top_p, drawn with `generator`."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature, -1)  # (V,)
    if top_p >= 1:
        return int(torch.multinomial(probs, 1, generator=generator))
    sorted_p, order = probs.sort(descending=True)  # (V,), (V,)
    keep = (sorted_p.cumsum(0) - sorted_p) < top_p  # the first token is always kept
    choice = torch.multinomial(sorted_p * keep, 1, generator=generator)
    return int(order[choice])
