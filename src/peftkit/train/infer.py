"""Inference with a base model and its adapters: loading, prompts, batched and streamed generation, the chat
REPL behind `peftkit chat`, and merging adapters into a standalone transformers directory.

    model, tokenizer = load_for_inference("smollm2", ["out/adapter"])
    print(generate(model, tokenizer, [chat_prompt(tokenizer, [{"role": "user", "content": "Hi"}])])[0])
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from .. import hf
from ..adapters import set_active
from ..checkpoint import load_adapter
from ..files import honour_umask
from ..merge import merge_and_unload
from ..models import load_model
from .data import render_chat

CHATML_END = "<|im_end|>"
HELP = "commands: /reset clears the conversation, /exit (or Ctrl-D) leaves, /help shows this"


# --- loading ------------------------------------------------------------------------------------------
def adapter_names(adapters: list[str]) -> list[str]:
    """Names for adapter directories: "default" for the first, then each folder's name (made a plain
    adapter name, and unique with a `_2`, `_3`, ... suffix)."""
    names: list[str] = []
    for i, directory in enumerate(adapters):
        base = "default" if i == 0 else re.sub(r"[^A-Za-z0-9_\-]", "_", Path(directory).resolve().name).lstrip("-") or "adapter"
        name, n = base, 2
        while name in names:
            name, n = f"{base}_{n}", n + 1
        names.append(name)
    return names


def load_for_inference(model: str, adapters: list[str] | None = None, quantize: str | None = None, dtype=None):
    """(model, tokenizer): the base model with every adapter in `adapters` loaded and active, in eval mode.

    The adapter directories are checked before the (slow) model load, so a typo fails at once."""
    adapters = [str(a) for a in adapters or []]
    missing = [a for a in adapters if not Path(a).is_dir()]
    if missing:
        raise FileNotFoundError(f"adapter directory not found: {', '.join(repr(a) for a in missing)}")
    net, tokenizer = load_model(model, dtype=dtype, quantize=quantize)
    names = adapter_names(adapters)
    for directory, name in zip(adapters, names):
        load_adapter(net, directory, name=name)
    if names:
        set_active(net, names)
    net.eval()
    return net, tokenizer


# --- prompts and generation -----------------------------------------------------------------------------
def chat_prompt(tokenizer, messages: list[dict]) -> str:
    """The conversation rendered for generation: the tokenizer's chat template with the generation prompt,
    or, without a template, the instruction format training uses ("### Instruction:\\n...\\n\\n### Response:\\n",
    system text first), so prompts match what an adapter was trained on."""
    return render_chat(tokenizer, messages, add_generation_prompt=True)


def stop_ids(model, tokenizer) -> list[int]:
    """Token ids that end a reply: the tokenizer's eos, the model's generation eos, and ChatML's end marker."""
    ids: list[int] = []
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for candidate in [tokenizer.eos_token_id, *(config_eos if isinstance(config_eos, list) else [config_eos])]:
        if candidate is not None and candidate not in ids:
            ids.append(int(candidate))
    if CHATML_END in str(getattr(tokenizer, "chat_template", None) or ""):
        end = tokenizer.convert_tokens_to_ids(CHATML_END)
        if end is not None and end != tokenizer.unk_token_id and end not in ids:
            ids.append(int(end))
    return ids


def generation_config(model, tokenizer, max_new_tokens: int, temperature: float, top_p: float):
    """The model's generation config with our settings; sampling knobs are cleared for greedy decoding so
    transformers does not warn about settings it ignores."""
    stops = stop_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops[0] if stops else None)
    config = copy.deepcopy(model.generation_config)
    config.update(max_new_tokens=max_new_tokens, max_length=None, do_sample=temperature > 0, pad_token_id=pad,
                  eos_token_id=stops or None)
    if temperature > 0:
        config.update(temperature=temperature, top_p=top_p, top_k=None)
    else:
        config.update(temperature=None, top_p=None, top_k=None)
    return config


@contextmanager
def left_padding(tokenizer) -> Iterator[None]:
    """Left padding (and a pad token, eos if there is none) for the block; the tokenizer is restored after."""
    side, pad = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"
    if pad is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        yield
    finally:
        tokenizer.padding_side = side
        if pad is None:
            tokenizer.pad_token = None


def _device(model) -> torch.device:
    return next(model.parameters()).device


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 128, temperature: float = 0.0,
             top_p: float = 1.0, batch_size: int = 32, seed: int | None = None, progress: bool = False) -> list[str]:
    """The reply to each rendered prompt (new text only, special tokens skipped), in the prompts' order.

    Prompts are batched by length and left-padded with an attention mask, so greedy decoding gives the same
    reply for a prompt alone or in a batch. temperature 0 is greedy; above it samples (with top_p)."""
    empty = [i for i, p in enumerate(prompts) if not p]
    if empty:
        raise ValueError(f"prompts {empty} are empty; every prompt needs text to continue")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    from tqdm.auto import tqdm

    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # similar lengths together: less padding
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    config = generation_config(model, tokenizer, max_new_tokens, temperature, top_p)
    if seed is not None:
        torch.manual_seed(seed)
    replies = [""] * len(prompts)
    with left_padding(tokenizer), torch.inference_mode():
        for batch in tqdm(batches, disable=not progress, desc="generating", unit="batch"):
            enc = tokenizer([prompts[i] for i in batch], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(_device(model))
            out = model.generate(**enc, generation_config=config)  # (B, T + new)
            new = out[:, enc["input_ids"].shape[1]:]
            for i, text in zip(batch, tokenizer.batch_decode(new, skip_special_tokens=True)):
                replies[i] = text
    return replies


class _StopWhenSet(StoppingCriteria):
    """Ends generation once `event` is set (the reader of a stream went away)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def stream_reply(model, tokenizer, prompt: str, max_new_tokens: int = 256, temperature: float = 0.0,
                 top_p: float = 1.0) -> Iterator[str]:
    """Yield the reply to one rendered prompt in pieces as it is generated. Generation runs in a thread that
    stops when the caller stops reading; an error in it is raised here."""
    from transformers import TextIteratorStreamer

    if not prompt:
        raise ValueError("the prompt is empty; it needs text to continue")
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(_device(model))
    config = generation_config(model, tokenizer, max_new_tokens, temperature, top_p)
    stop, errors = threading.Event(), []

    def work() -> None:
        try:
            with torch.inference_mode():  # grad mode is per thread
                model.generate(**enc, generation_config=config, streamer=streamer,
                               stopping_criteria=StoppingCriteriaList([_StopWhenSet(stop)]))
        except Exception as err:  # noqa: BLE001 - re-raised in the reader, which would otherwise wait forever
            errors.append(err)
            streamer.end()

    thread = threading.Thread(target=work, name="peftkit-stream", daemon=True)
    thread.start()
    try:
        for piece in streamer:
            if piece:
                yield piece
        if errors:
            raise errors[0]
    finally:
        stop.set()
        thread.join()


def chat_loop(model, tokenizer, system: str | None = None, read: Callable[[str], str] = input,
              write: Callable[..., None] = print, max_new_tokens: int = 256, temperature: float = 0.0) -> None:
    """An interactive chat: each reply streams as it is generated and the conversation is kept, so the model
    sees the earlier turns. `read(prompt)` returns a line (EOFError ends the chat); `write` is print-like.
    Ctrl-C during a reply stops that reply and keeps what was shown."""
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    write(f"peftkit chat ({HELP})")
    while True:
        try:
            line = read("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            write()
            return
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            history = list(start)
            write("(conversation cleared)")
            continue
        if line == "/help":
            write(HELP)
            continue
        if line.startswith("/"):
            write(f"unknown command {line.split()[0]!r}; {HELP}")
            continue
        history.append({"role": "user", "content": line})
        pieces: list[str] = []
        try:
            for piece in stream_reply(model, tokenizer, chat_prompt(tokenizer, history), max_new_tokens, temperature):
                pieces.append(piece)
                write(piece, end="", flush=True)
        except KeyboardInterrupt:
            write(" [interrupted]", end="")
        write()
        history.append({"role": "assistant", "content": "".join(pieces).strip()})


# --- merging into a standalone model ------------------------------------------------------------------
def torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    allowed = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
               "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in allowed:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {sorted(allowed)}")
    return allowed[dtype]


def _check_out_dir(out: Path, overwrite: bool, sources: list[str]) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{str(out)!r} exists and is not a directory; choose another output directory")
    if any(Path(s).exists() and out.resolve() == Path(s).resolve() for s in sources):
        raise ValueError(f"{str(out)!r} is the base model or an adapter directory; write the merged model elsewhere")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{str(out)!r} is not empty; pass --overwrite (overwrite=True) to replace it")


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move the finished directory into place; an old one is only removed once the new one is there."""
    old = None
    if out.is_dir():
        if any(out.iterdir()):
            if not overwrite:  # appeared while we worked
                raise FileExistsError(f"{str(out)!r} is not empty; pass --overwrite (overwrite=True) to replace it")
            old = out.with_name(f".{out.name}.old{os.getpid()}")
            out.rename(old)
        else:
            out.rmdir()
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def merge_to_directory(model: str, adapters: list[str], out_dir: str | os.PathLike, dtype: str = "float32",
                       overwrite: bool = False, verify: bool = True) -> dict:
    """Merge `adapters` into the base model `model` and save a plain transformers directory (safetensors and
    the tokenizer) that loads with AutoModelForCausalLM.from_pretrained, no peftkit needed.

    The base loads in full precision `dtype` even when the adapter was trained on a 4-bit base, so the merge
    is exact. The directory is written next to `out_dir` and renamed into place when complete. With verify,
    the saved model is reloaded and its logits on a fixed input compared to the adapter model's; a difference
    above 1e-3 (fp32; 2% of the logit scale for 16-bit dtypes) raises and nothing is written.
    Returns {"out_dir", "max_abs_diff" (None without verify), "parameters", "bytes"}."""
    if not adapters:
        raise ValueError("merge_to_directory needs at least one adapter directory")
    out = Path(out_dir)
    _check_out_dir(out, overwrite, [model, *map(str, adapters)])
    net_dtype = torch_dtype(dtype)
    net, tokenizer = load_for_inference(model, adapters, dtype=net_dtype)
    vocab = min(len(tokenizer), hf.text_vocab_size(net))
    ids = torch.linspace(0, vocab - 1, 16).long().unsqueeze(0).to(_device(net))  # (1, 16), rows across the table
    with torch.inference_mode():
        expected = net(ids).logits.float()
    merge_and_unload(net)
    hf.record_untied_embeddings(net)
    parameters = sum(p.numel() for p in {id(p): p for p in net.parameters()}.values())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        net.save_pretrained(tmp)  # transformers 5 always writes safetensors
        tokenizer.save_pretrained(tmp)
        honour_umask(tmp)  # safetensors makes 0600 files whatever the umask
        diff = None
        if verify:
            diff = _reload_diff(tmp, ids, expected, net_dtype)
            tolerance = 1e-3 if net_dtype == torch.float32 else 2e-2 * max(1.0, expected.abs().max().item())
            if diff > tolerance:
                raise RuntimeError(f"the merged model's logits differ from the adapter model's by {diff:.3g} "
                                   f"(tolerance {tolerance:.3g}); nothing was written to {str(out)!r}")
        _publish(tmp, out, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    return {"out_dir": str(out), "max_abs_diff": diff, "parameters": parameters, "bytes": size}


def _reload_diff(directory: Path, ids: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> float:
    """Max |logits| difference between the model saved in `directory`, loaded as a user would, and `expected`."""
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(directory, **hf.dtype_kwargs(dtype)).to(ids.device).eval()
    with torch.inference_mode():
        got = reloaded(ids).logits.float()
    return (got - expected).abs().max().item()
