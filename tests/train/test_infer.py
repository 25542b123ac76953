"""Inference helpers on a tiny Llama saved with a tiny ChatML tokenizer: adapter loading, batched and streamed
generation, the chat REPL, and merging into a directory that from_pretrained loads (tied embeddings too)."""

from __future__ import annotations

import json
import threading
import types
import warnings

import pytest
import torch

import peftkit
from peftkit.models import load_model
from peftkit.train import infer
from peftkit.train.infer import (
    adapter_names,
    chat_loop,
    chat_prompt,
    generate,
    load_for_inference,
    merge_to_directory,
    stream_reply,
)

TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
WORDS = ["user", "assistant", "system", "hello", "hi", "how", "are", "you", "the", "a", "cat", "dog"]
VOCAB = SPECIALS + WORDS + [f"w{i}" for i in range(128 - len(SPECIALS) - len(WORDS))]


def tiny_tokenizer():
    """A WordLevel tokenizer over VOCAB with ChatML specials: eos <|im_end|>, pad <pad>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.decoder = decoders.WordPiece()  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<pad>", unk_token="<unk>",
                                   additional_special_tokens=["<|im_start|>"], chat_template=TEMPLATE)


def tiny_llama(tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=tied, bos_token_id=None, eos_token_id=3, pad_token_id=0,
                      initializer_range=0.3)  # larger than the default 0.02, so replies depend on the prompt
    return LlamaForCausalLM(cfg).eval()


def save_base(directory, tied: bool = False) -> str:
    tiny_llama(tied).save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return str(directory)


def save_adapters(base: str, root, targets: dict[str, list[str]]):
    """Save one random non-zero adapter per folder name in `targets`; return their dirs and the in-memory model
    with all of them active (adapter names as load_for_inference gives them)."""
    model, _ = load_model(base)
    dirs = [str(root / folder) for folder in targets]
    for seed, (name, (folder, mods)) in enumerate(zip(adapter_names(dirs), targets.items())):
        torch.manual_seed(seed)
        peftkit.inject(model, peftkit.LoraConfig(r=4, lora_alpha=8, target_modules=mods, init_lora_weights=False),
                       name)
        peftkit.save_adapter(model, root / folder, name=name)
    peftkit.set_active(model, adapter_names(dirs))
    return dirs, model


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


IDS = torch.arange(4, 20).unsqueeze(0)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls are 50x slower with several threads on a busy machine (threads wait on each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_base(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def loaded(base):
    return load_model(base)


def test_adapter_names_are_plain_and_unique():
    assert adapter_names(["x/a", "y/a", "z/a", "w/my adapter.v2"]) == ["default", "a", "a_2", "my_adapter_v2"]


def test_load_for_inference_matches_in_memory_adapters(base, tmp_path):
    dirs, expected = save_adapters(base, tmp_path, {"first": ["q_proj", "v_proj"], "second": ["down_proj"]})
    model, tokenizer = load_for_inference(base, dirs)
    assert peftkit.active_adapters(model) == ["default", "second"] and not model.training
    assert tokenizer.eos_token == "<|im_end|>"
    torch.testing.assert_close(logits(model, IDS), logits(expected, IDS), rtol=0, atol=1e-6)


def test_missing_adapter_dir_is_named(base, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_for_inference(base, [str(tmp_path / "nope")])


def test_chat_prompt_template_and_fallback(loaded):
    _, tokenizer = loaded
    msgs = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hello"}]
    assert chat_prompt(tokenizer, msgs).endswith("<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n")
    plain = types.SimpleNamespace(chat_template=None, eos_token="</s>")
    assert chat_prompt(plain, msgs) == "be kind\n\n### Instruction:\nhello\n\n### Response:\n"


def test_generate_batched_equals_one_at_a_time(loaded):
    model, tokenizer = loaded
    say = ["hello", "how are you the cat", "a dog", "the cat are you a dog hello hi how"]
    prompts = [chat_prompt(tokenizer, [{"role": "user", "content": s}]) for s in say]
    side = tokenizer.padding_side
    batched = generate(model, tokenizer, prompts, max_new_tokens=8, batch_size=4)
    alone = [generate(model, tokenizer, [p], max_new_tokens=8)[0] for p in prompts]
    assert batched == alone and len(set(batched)) > 1
    assert tokenizer.padding_side == side
    assert not any("<|im_" in r or "<pad>" in r for r in batched)  # special tokens skipped, prompt not echoed
    sampled = generate(model, tokenizer, prompts[:2], max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    assert sampled == generate(model, tokenizer, prompts[:2], max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3)


def test_stream_reply_pieces_make_the_greedy_reply(loaded):
    model, tokenizer = loaded
    prompt = chat_prompt(tokenizer, [{"role": "user", "content": "hello cat"}])
    pieces = list(stream_reply(model, tokenizer, prompt, max_new_tokens=8))
    assert "".join(pieces).strip() == generate(model, tokenizer, [prompt], max_new_tokens=8)[0].strip()


def test_stream_reply_raises_generation_errors_and_stops_when_closed(loaded, monkeypatch):
    model, tokenizer = loaded
    prompt = chat_prompt(tokenizer, [{"role": "user", "content": "hello"}])
    stream = stream_reply(model, tokenizer, prompt, max_new_tokens=100)
    assert next(stream)
    stream.close()  # joins the generation thread, which stops at the next token
    assert not any(t.name == "peftkit-stream" for t in threading.enumerate())

    def broken(**kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(model, "generate", broken)
    with pytest.raises(RuntimeError, match="boom"):
        list(stream_reply(model, tokenizer, prompt))


def test_chat_loop_keeps_history_and_resets(loaded, monkeypatch):
    model, tokenizer = loaded
    prompts, replies = [], []

    def spy(model, tokenizer, prompt, *args):
        prompts.append(prompt)
        pieces = list(stream_reply(model, tokenizer, prompt, max_new_tokens=6))
        replies.append("".join(pieces).strip())
        yield from pieces

    monkeypatch.setattr(infer, "stream_reply", spy)
    script = iter(["hello cat", "how are you", "/help", "/reset", "hi", "/exit", "never read"])
    shown = []
    chat_loop(model, tokenizer, system="be brief", read=lambda _prompt: next(script),
              write=lambda *a, **k: shown.append("".join(map(str, a))))
    assert len(prompts) == 3 and all(p.startswith("<|im_start|>system\nbe brief") for p in prompts)
    assert replies[0] and replies[0] in prompts[1] and "hello cat" in prompts[1]
    assert "hello cat" not in prompts[2] and "hi" in prompts[2]
    assert next(script) == "never read"
    assert any("/reset" in s for s in shown)  # the help text

    def eof(_prompt):
        raise EOFError

    chat_loop(model, tokenizer, read=eof, write=lambda *a, **k: None)  # Ctrl-D leaves quietly


@pytest.mark.parametrize("tied,targets", [(False, ["q_proj", "v_proj"]), (True, ["q_proj", "lm_head"]),
                                          (True, ["embed_tokens", "v_proj"])])
def test_merge_to_directory_round_trip(tmp_path, tied, targets):
    from transformers import AutoModelForCausalLM

    base = save_base(tmp_path / "base", tied=tied)
    dirs, expected = save_adapters(base, tmp_path, {"adapter": targets})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # merge warns when it unties the shared weight
        info = merge_to_directory(base, dirs, tmp_path / "merged")
    assert info["out_dir"] == str(tmp_path / "merged") and info["max_abs_diff"] < 1e-4
    assert info["parameters"] > 0 and info["bytes"] > 0
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    if tied:  # merged into one of the two, so they must stay apart on reload
        assert config["tie_word_embeddings"] is False
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits(reloaded, IDS), logits(expected, IDS), rtol=0, atol=1e-4)
    assert not any(".tmp" in p.name for p in tmp_path.iterdir())


def test_merge_refuses_non_empty_out_dir_and_failed_verify(base, tmp_path, monkeypatch):
    dirs, _ = save_adapters(base, tmp_path, {"adapter": ["q_proj"]})
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="--overwrite"):
        merge_to_directory(base, dirs, out)
    assert (out / "keep.txt").exists()
    info = merge_to_directory(base, dirs, out, overwrite=True, verify=False)
    assert info["max_abs_diff"] is None and not (out / "keep.txt").exists() and (out / "config.json").exists()

    monkeypatch.setattr(infer, "_reload_diff", lambda *a: 1.0)
    with pytest.raises(RuntimeError, match="nothing was written"):
        merge_to_directory(base, dirs, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
