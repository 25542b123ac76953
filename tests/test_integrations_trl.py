"""A peftkit-injected model trained by transformers' Trainer and TRL's real SFTTrainer
(peftkit.integrations.transformers): the loss falls, every checkpoint is a PEFT adapter and nothing else,
HF PEFT and peftkit load it with the same logits, resuming continues bit for bit, and the lean loss equals
the trainers' own."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

import peftkit
from conftest import LazyImport, make_tokenizer

trl = LazyImport("trl", optional=True)
peft = LazyImport("peft")
datasets = LazyImport("datasets")
transformers = LazyImport("transformers")

PAIRS = [("What colour is the sky?", " The sky is blue."), ("Name a fruit.", " An apple."),
         ("Count to three.", " one two three"), ("Say hi", " hi there")]
WHOLE_MODEL = ("model.safetensors", "pytorch_model.bin", "config.json", "model.safetensors.index.json")


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def base_model(tokenizer):
    """The same tiny Llama every time (seeded), built from a config."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=128, tie_word_embeddings=False,
                                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                   bos_token_id=None, initializer_range=0.3)
    return transformers.LlamaForCausalLM(cfg)


def injected(tokenizer, seed: int = 1):
    model = base_model(tokenizer)
    torch.manual_seed(seed)  # the adapter's A: a different seed gives a different starting adapter
    return peftkit.inject(model, peftkit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))


def sft_trainer(model, tokenizer, out: Path, steps: int = 6, lean: bool = True, **kw):
    from peftkit.integrations.transformers import use_peftkit

    rows = datasets.Dataset.from_list([{"prompt": p, "completion": c} for p, c in PAIRS * 4])
    args = trl.SFTConfig(output_dir=str(out), max_steps=steps, per_device_train_batch_size=4, learning_rate=3e-2,
                         save_steps=3, logging_steps=1, report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
                         lr_scheduler_type="constant", **{"bf16": False, **kw})
    return use_peftkit(trl.SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer),
                       lean_loss=lean)


def probe(tokenizer) -> torch.Tensor:
    return tokenizer(["What colour is the sky? The sky is blue.", "Say hi hi there"], return_tensors="pt",
                     padding=True)["input_ids"]


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def adapter_tensors(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in peftkit.adapter_state_dict(model).items()}


def test_sft_trainer_trains_and_every_checkpoint_is_a_peft_adapter(tokenizer, tmp_path):
    model = injected(tokenizer)
    trainer = sft_trainer(model, tokenizer, tmp_path / "run")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    trainer.save_model()
    assert not [w for w in caught if "wrote the whole model" in str(w.message)]  # it was never written
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.3, losses
    ids = probe(tokenizer)
    trained = logits(model, ids)
    for folder in (tmp_path / "run" / "checkpoint-3", tmp_path / "run" / "checkpoint-6", tmp_path / "run"):
        files = {p.name for p in folder.iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors"} <= files, files
        assert not files & set(WHOLE_MODEL), files
        assert not [f for f in files if f.startswith("model-")], files
    assert {"optimizer.pt", "scheduler.pt", "trainer_state.json"} <= {p.name for p in (tmp_path / "run" /
                                                                                       "checkpoint-6").iterdir()}
    hf = peft.PeftModel.from_pretrained(base_model(tokenizer), str(tmp_path / "run" / "checkpoint-6"))
    ours = peftkit.load_adapter(base_model(tokenizer), tmp_path / "run" / "checkpoint-6")
    base = logits(base_model(tokenizer), ids)
    assert (trained - base).abs().max() > 1e-3  # the adapter changed the outputs, so the comparisons mean something
    torch.testing.assert_close(logits(hf, ids), trained, rtol=0, atol=1e-5)
    torch.testing.assert_close(logits(ours, ids), trained, rtol=0, atol=1e-5)
    final = peftkit.load_adapter(base_model(tokenizer), tmp_path / "run")  # trainer.save_model()
    torch.testing.assert_close(logits(final, ids), trained, rtol=0, atol=1e-6)
    mid = peftkit.load_adapter(base_model(tokenizer), tmp_path / "run" / "checkpoint-3")
    assert (logits(mid, ids) - trained).abs().max() > 1e-4  # checkpoint-3 is the adapter of step 3, not the last


def test_resume_restores_the_checkpoint_and_continues_the_same_run(tokenizer, tmp_path):
    from transformers import TrainerCallback

    whole = sft_trainer(injected(tokenizer), tokenizer, tmp_path / "a", lean=False)  # TRL's own loss this time
    whole.train()
    end_a = adapter_tensors(whole.model)
    saved = peftkit.read_adapter(tmp_path / "a" / "checkpoint-3")[1]

    class AtStart(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.adapter, self.step = adapter_tensors(model), state.global_step

    seen = AtStart()
    fresh = injected(tokenizer, seed=7)  # a different starting adapter: only the restore can make them equal
    assert not torch.equal(next(iter(adapter_tensors(fresh).values())), next(iter(saved.values())))
    resumed = sft_trainer(fresh, tokenizer, tmp_path / "b", lean=False)
    resumed.add_callback(seen)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    assert seen.step == 3 and resumed.state.global_step == 6
    assert seen.adapter.keys() == saved.keys()
    assert all(torch.equal(seen.adapter[k], saved[k]) for k in saved)  # bit-exact at the checkpoint
    steps = [h["step"] for h in resumed.state.log_history if "loss" in h]
    assert steps == [1, 2, 3, 4, 5, 6]  # the checkpoint's history, then the steps run here
    end_b = adapter_tensors(fresh)
    assert all(torch.allclose(end_a[k], end_b[k], rtol=0, atol=1e-6) for k in end_a)  # the same run continued
    losses_a = [h["loss"] for h in whole.state.log_history if "loss" in h]
    losses_b = [h["loss"] for h in resumed.state.log_history if "loss" in h]
    assert losses_b == pytest.approx(losses_a, abs=1e-6)


def batch_of(trainer) -> dict[str, torch.Tensor]:
    batch = next(iter(trainer.get_train_dataloader()))
    return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("kind", ["trainer", "sft"])
def test_lean_loss_equals_the_trainers_own_loss_and_gradients(tokenizer, tmp_path, kind):
    from peftkit.integrations.transformers import lean_compute_loss

    model = injected(tokenizer)
    with torch.no_grad():  # a non-zero B, so the adapter takes part in the loss
        for p in (p for n, p in model.named_parameters() if p.requires_grad):
            p.normal_(0, 0.2)
    trainer = sft_trainer(model, tokenizer, tmp_path, lean=False)
    own = type(trainer).compute_loss
    if kind == "trainer":  # transformers' Trainer.compute_loss, the model's own loss with num_items_in_batch
        own = transformers.Trainer.compute_loss
    batch = batch_of(trainer)
    assert (batch["labels"] == -100).any() and (batch["labels"] != -100).any()  # answer-only labels
    n_items = int((batch["labels"][:, 1:] != -100).sum()) + 5  # as if more micro-batches were accumulated
    model.train()
    for n in (n_items, None):
        results = []
        for fn in (own, lambda t, m, b, **k: lean_compute_loss(t, m, b, **k)):
            model.zero_grad()
            loss = fn(trainer, model, dict(batch), num_items_in_batch=n)
            loss.backward()
            results.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
        (ref, ref_grads), (lean, lean_grads) = results
        assert abs(ref.item() - lean.item()) < 1e-5, (kind, n, ref.item(), lean.item())
        for a, b in zip(ref_grads, lean_grads, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_lean_loss_refuses_batches_it_cannot_compute_exactly(tokenizer, tmp_path):
    from peftkit.integrations.transformers import lean_compute_loss

    trainer = sft_trainer(injected(tokenizer), tokenizer, tmp_path)
    batch = batch_of(trainer)
    packed = {"input_ids": batch["input_ids"], "labels": batch["labels"]}
    with pytest.raises(ValueError, match="attention_mask.*padding_free"):
        lean_compute_loss(trainer, trainer.model, packed)
    restarted = dict(batch, position_ids=torch.zeros_like(batch["input_ids"]))
    with pytest.raises(ValueError, match="position_ids"):
        lean_compute_loss(trainer, trainer.model, restarted)
    loss, outputs = lean_compute_loss(trainer, trainer.model, dict(batch), return_outputs=True)
    assert outputs.logits.shape[:2] == batch["input_ids"].shape and loss.item() > 0


def token_rows(tokenizer, n: int = 8) -> list[dict]:
    """Plain rows for transformers.Trainer: equal lengths, labels -100 on the prompt."""
    rows = []
    for prompt, answer in (PAIRS * n)[:n]:
        p, a = tokenizer(prompt)["input_ids"], tokenizer(answer)["input_ids"]
        ids = (p + a + [tokenizer.eos_token_id] + [tokenizer.pad_token_id] * 16)[:16]
        real = min(len(p) + len(a) + 1, 16)
        labels = [-100] * len(p) + ids[len(p):real] + [-100] * (16 - real)
        rows.append({"input_ids": ids, "attention_mask": [1] * real + [0] * (16 - real), "labels": labels[:16]})
    return rows


def plain_trainer(model, tokenizer, out: Path, callbacks=None):
    args = transformers.TrainingArguments(output_dir=str(out), max_steps=4, per_device_train_batch_size=4,
                                          learning_rate=3e-2, save_steps=2, report_to=[], use_cpu=True, seed=0,
                                          disable_tqdm=True)
    return transformers.Trainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(token_rows(tokenizer)),
                                callbacks=callbacks)


def test_callback_alone_keeps_plain_trainer_checkpoints_adapter_only(tokenizer, tmp_path):
    from peftkit.integrations.transformers import PeftkitAdapterCallback

    model = injected(tokenizer)
    trainer = plain_trainer(model, tokenizer, tmp_path, callbacks=[PeftkitAdapterCallback()])
    with pytest.warns(UserWarning, match="wrote the whole model"):
        trainer.train()
    for step in (2, 4):
        files = {p.name for p in (tmp_path / f"checkpoint-{step}").iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt"} <= files
        assert not files & set(WHOLE_MODEL), files
    ids = probe(tokenizer)
    final = peftkit.load_adapter(base_model(tokenizer), tmp_path)  # written at the end of training
    torch.testing.assert_close(logits(final, ids), logits(model, ids), rtol=0, atol=1e-6)


def test_use_peftkit_with_plain_trainer_and_the_refusals(tokenizer, tmp_path):
    from peftkit.integrations.transformers import PeftkitAdapterCallback, use_peftkit

    model = injected(tokenizer)
    trainer = use_peftkit(plain_trainer(model, tokenizer, tmp_path / "ok"), lean_loss=True)
    trainer.train()
    assert sum(isinstance(c, PeftkitAdapterCallback) for c in trainer.callback_handler.callbacks) == 1
    assert not {p.name for p in (tmp_path / "ok" / "checkpoint-4").iterdir()} & set(WHOLE_MODEL)

    with pytest.raises(ValueError, match="no peftkit adapter"):
        use_peftkit(plain_trainer(base_model(tokenizer), tokenizer, tmp_path / "none"))
    leaky = injected(tokenizer)
    leaky.lm_head.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="lm_head.weight"):
        use_peftkit(plain_trainer(leaky, tokenizer, tmp_path / "leaky")).train()
    assert not (tmp_path / "leaky" / "checkpoint-2").exists()

    other = base_model(tokenizer)
    peftkit.inject(other, peftkit.LoraConfig(r=8, lora_alpha=8, target_modules="all-linear"))
    before = adapter_tensors(other)
    wrong = use_peftkit(plain_trainer(other, tokenizer, tmp_path / "wrong"))
    with pytest.raises(ValueError, match="r: model 8, file 4.*nothing was changed|nothing was changed.*r: model 8"):
        wrong.train(resume_from_checkpoint=str(tmp_path / "ok" / "checkpoint-2"))
    assert all(torch.equal(before[k], v) for k, v in adapter_tensors(other).items())
    with pytest.raises(ValueError, match="holds no adapter checkpoint"):
        wrong.train(resume_from_checkpoint=str(tmp_path))
