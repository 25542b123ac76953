"""AdaLoRA: the method checklist on tiny Llama and GPT-2 models, HF PEFT in both directions (files, the rank
allocator step by step, the orthogonality regularizer), the trainer's hooks, the CLI (train, resume) and the
planner."""

from __future__ import annotations

import copy
import functools
import json

import pytest
import torch
from conftest import LazyImport, inputs, run, tiny_gpt2, tiny_llama
from safetensors.torch import load_file

import peftkit
from peftkit import record, registry
from peftkit.cli import main
from peftkit.methods.adalora import AdaLoraConfig, AdaLoraLayer, adalora_layers
from peftkit.methods.adalora import allocator, io
from peftkit.plan import memory, presets

peft = LazyImport("peft", optional=True)
BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}
METHOD = registry.by_peft_type("ADALORA")
# a schedule with every phase in 12 steps: warm-up to step 2, masks at steps 4, 6, 8, fixed at 10, kept at 11
SCHEDULE = dict(init_r=6, target_r=3, tinit=2, tfinal=2, deltaT=2, total_step=12, lora_alpha=8)


def with_adapter(family: str = "llama", name: str = "default", seed: int = 0, **kw):
    """An adapter whose E is random (init_lora_weights=False), so it changes the output."""
    model = BUILDERS[family]()
    torch.manual_seed(seed)
    kw = {"init_r": 4, "target_r": 2, "total_step": 10, **kw}
    return peftkit.inject(model, AdaLoraConfig(init_lora_weights=False, **kw), name)


def base_state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}


# --- identity at init, the layer's arithmetic ---------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_fresh_adapter_is_exact_identity_and_nonzero_changes_output(family):
    ids = inputs(family)
    base = run(BUILDERS[family](), ids)
    model = peftkit.inject(BUILDERS[family](), AdaLoraConfig(total_step=10))
    assert torch.equal(run(model, ids), base)
    layers = dict(adalora_layers(model))
    assert len(layers) == 2 * (2 if family == "llama" else 1)  # LoRA's (PEFT's) defaults: q, v / c_attn
    layer = next(iter(layers.values()))
    assert tuple(layer.lora_E["default"].shape) == (12, 1) and torch.all(layer.lora_E["default"] == 0)
    assert not torch.allclose(run(with_adapter(family), ids), base, atol=1e-4)


def test_forward_is_base_plus_b_a_e_scaled_by_alpha_over_ranknum():
    model = with_adapter(lora_alpha=6, init_r=4)
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 5, 32)
    A, E, B = (layer.lora_A["default"], layer.lora_E["default"], layer.lora_B["default"])
    want = layer.base(x) + x @ (B @ (A * E) * 6 / (4 + 1e-5)).T
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want, atol=1e-6, rtol=1e-5)


# --- merging --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_merged_equals_unmerged_unmerge_restores_and_merging_twice_changes_nothing(family):
    model, ids = with_adapter(family, target_modules="all-linear"), inputs(family)
    before, adapted = base_state(model), run(model, ids)
    peftkit.merge(model)
    assert peftkit.merged_adapters(model) == ["default"]
    torch.testing.assert_close(run(model, ids), adapted, atol=1e-5, rtol=0)
    once = base_state(model)
    assert any(not torch.equal(once[k], before[k]) for k in before)
    peftkit.merge(model)
    assert all(torch.equal(v, once[k]) for k, v in base_state(model).items())
    peftkit.unmerge(model)
    for k, v in base_state(model).items():
        torch.testing.assert_close(v, before[k], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(run(model, ids), adapted, atol=1e-5, rtol=0)


def test_safe_merge_refuses_nan_and_merge_and_unload_keeps_the_outputs():
    model, ids = with_adapter(), inputs("llama")
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.lora_E["default"][2, 0] = float("nan")
    before = base_state(model)
    with pytest.raises(ValueError, match=r"safe merge refused.*model\.layers\.1\.self_attn\.v_proj"):
        peftkit.merge(model, safe=True)
    assert all(torch.equal(v, before[k]) for k, v in base_state(model).items())
    model = with_adapter("gpt2")
    adapted = run(model, inputs("gpt2"))
    merged = peftkit.merge_and_unload(model)
    assert not any(isinstance(m, AdaLoraLayer) for m in merged.modules())
    torch.testing.assert_close(run(merged, inputs("gpt2")), adapted, atol=1e-5, rtol=0)


# --- save / load, several adapters, disabling, training only the adapter -----------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_save_load_round_trip_is_identical(family, tmp_path):
    model, ids = with_adapter(family), inputs(family)
    expected = run(model, ids)
    peftkit.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and config["fan_in_fan_out"] == (family == "gpt2")
    assert (config["init_r"], config["target_r"], config["total_step"], config["rank_pattern"]) == (4, 2, 10, None)
    shapes = {k: tuple(v.shape) for k, v in load_file(str(tmp_path / "adapter_model.safetensors")).items()}
    assert shapes["base_model.model." + next(p for p, _ in adalora_layers(model)) + ".lora_E"] == (4, 1)
    fresh = peftkit.load_adapter(BUILDERS[family](), tmp_path)
    assert torch.equal(run(fresh, ids), expected)
    assert not any(p.requires_grad for p in fresh.parameters())
    assert torch.equal(run(copy.deepcopy(fresh), ids), expected)


def test_a_rank_pattern_saves_only_the_kept_triplets_and_loads_at_those_ranks(tmp_path):
    model, ids = with_adapter(), inputs("llama")
    paths = [p for p, _ in adalora_layers(model)]
    pattern = {f"{p}.lora_E": [i % 2 == 0 or j == 0 for i in range(4)] for j, p in enumerate(paths)}
    allocator.apply_pattern(model, "default", pattern)
    record.configs(model)["default"] = record.configs(model)["default"].replace(rank_pattern=pattern)
    expected = run(model, ids)
    peftkit.save_adapter(model, tmp_path)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert tuple(saved[f"base_model.model.{paths[0]}.lora_A"].shape) == (4, 32)  # j == 0 keeps every triplet
    assert tuple(saved[f"base_model.model.{paths[1]}.lora_B"].shape) == (16, 2)  # v_proj
    fresh = peftkit.load_adapter(tiny_llama(), tmp_path)
    assert [layer.lora_A["default"].shape[0] for _, layer in adalora_layers(fresh)] == [4, 2, 2, 2]
    torch.testing.assert_close(run(fresh, ids), expected, atol=1e-6, rtol=0)
    peftkit.save_adapter(fresh, tmp_path / "again")  # a pruned adapter saves as it is, with its pattern
    assert load_file(str(tmp_path / "again" / "adapter_model.safetensors")).keys() == saved.keys()


def test_wrong_base_names_every_key_and_changes_nothing(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    peftkit.save_adapter(with_adapter(), tmp_path)
    wide = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()
    with pytest.raises(ValueError) as err:
        peftkit.load_adapter(wide, tmp_path)
    assert "nothing was changed" in str(err.value) and "model.layers.1.self_attn.q_proj.lora_A" in str(err.value)
    assert not list(adalora_layers(wide)) and not getattr(wide, "peftkit_configs", {})


def test_several_adapters_switch_disable_and_mix_per_row():
    model, ids = with_adapter(name="a", seed=1), inputs("llama", batch=4)
    torch.manual_seed(2)
    peftkit.inject(model, AdaLoraConfig(init_r=3, total_step=5, target_r=2, target_modules="all-linear",
                                        init_lora_weights=False), "b")
    base = run(tiny_llama(), ids)
    b = run(model, ids)
    with peftkit.disable_adapters(model):
        assert torch.equal(run(model, ids), base)
    assert torch.equal(run(model, ids), b)
    peftkit.set_active(model, "a")
    a = run(model, ids)
    assert not torch.allclose(a, b, atol=1e-3)
    rows = ["a", None, "b", "a"]
    with peftkit.per_row(model, rows):
        mixed = run(model, ids)
    for i, name in enumerate(rows):
        peftkit.set_active(model, [] if name is None else [name])
        torch.testing.assert_close(mixed[i:i + 1], run(model, ids[i:i + 1]), atol=1e-5, rtol=1e-5)
    peftkit.set_active(model, ["a", "b"])
    both = run(model, ids)
    peftkit.merge(model)
    torch.testing.assert_close(run(model, ids), both, atol=1e-5, rtol=0)
    peftkit.unmerge(model)
    peftkit.delete_adapter(model, "a")
    peftkit.delete_adapter(model, "b")
    assert not list(adalora_layers(model))
    torch.testing.assert_close(run(model, ids), base, atol=1e-6, rtol=0)


def test_only_the_adapter_trains():
    model = peftkit.inject(tiny_llama(), AdaLoraConfig(total_step=10, target_modules="all-linear"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.rsplit(".", 2)[-2] in ("lora_A", "lora_E", "lora_B") for n in trainable)
    assert len(trainable) == 3 * 14
    before = base_state(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = inputs("llama")
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(v, before[k]) for k, v in base_state(model).items())
    assert any(not torch.all(layer.lora_E["default"] == 0) for _, layer in adalora_layers(model))


def test_config_validation_and_json_round_trip():
    config = AdaLoraConfig(**SCHEDULE, target_modules=["q_proj"])
    assert registry.config_from_peft_dict(json.loads(json.dumps(config.to_peft_dict()))) == config
    for bad, words in [(dict(tinit=10, tfinal=2, total_step=12), "no budgeting phase"),
                       (dict(target_r=20), "must not exceed init_r"), (dict(beta1=1.0), "beta1"),
                       (dict(orth_reg_weight=-1), "orth_reg_weight"), (dict(total_step=0), "total_step"),
                       (dict(rank_pattern={"x.lora_E": [True]}), "rank_pattern"),
                       (dict(modules_to_save=["lm_head"]), "modules_to_save")]:
        with pytest.raises(ValueError, match=words):
            AdaLoraConfig(**{**SCHEDULE, **bad})
    with pytest.raises(ValueError, match="use_dora=True"):
        AdaLoraConfig.from_peft_dict({"peft_type": "ADALORA", "use_dora": True, "total_step": 5})
    with pytest.raises(ValueError, match="cannot adapt"):
        peftkit.inject(tiny_llama(), AdaLoraConfig(total_step=5, target_modules=["embed_tokens"]))
    assert "AdaLoRA init_r=6 -> target_r=3" in peftkit.summary(peftkit.inject(tiny_llama(), config))


# --- HF PEFT: files both ways, the regularizer, the allocator step by step ---------------------------------
def train_both(family: str, steps: int):
    """The same AdaLoRA adapter (PEFT's init, copied) trained the same steps in PEFT (update_and_allocate) and
    in peftkit (the trainer's hooks): (peft model, peftkit model, per-step E masks of each); a fresh copy of
    one run per (family, steps)."""
    return copy.deepcopy(_train_both(family, steps))


@functools.cache
def _train_both(family: str, steps: int):
    cfg = dict(SCHEDULE)
    torch.manual_seed(0)
    theirs = peft.get_peft_model(BUILDERS[family](), peft.AdaLoraConfig(task_type="CAUSAL_LM", **cfg))
    ours = peftkit.inject(BUILDERS[family](), AdaLoraConfig(**{k: v for k, v in cfg.items() if k != "total_step"}))
    tensors = {k.removeprefix("base_model.model."): v for k, v in peft.get_peft_model_state_dict(theirs).items()}
    io.load_tensors(ours, "default", tensors)
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=2e-2) for m in (theirs, ours)]
    masks = ([], [])
    for step in range(steps):
        ids = inputs(family, batch=4, seq=8, seed=step)
        theirs(input_ids=ids, labels=ids).loss.backward()
        loss = ours(input_ids=ids, labels=ids).loss + METHOD.training_loss_extra(ours, ["default"])
        loss.backward()
        for opt in opts:
            opt.step()
        theirs.base_model.update_and_allocate(step)
        METHOD.after_optimizer_step(ours, ["default"], step, cfg["total_step"])
        for opt in opts:
            opt.zero_grad()
        masks[0].append(torch.cat([(m.lora_E["default"] != 0).flatten() for m in theirs.modules()
                                   if hasattr(m, "lora_E") and "default" in m.lora_E]))
        masks[1].append(torch.cat([(layer.lora_E["default"] != 0).flatten() for _, layer in adalora_layers(ours)]))
    return theirs, ours, masks


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_the_allocator_matches_hf_peft_step_by_step(family):
    theirs, ours, (their_masks, our_masks) = train_both(family, 12)
    for step, (a, b) in enumerate(zip(their_masks, our_masks)):
        assert torch.equal(a, b), f"step {step}: the kept triplets differ"
    assert int(our_masks[-1].sum()) == 3 * len(list(adalora_layers(ours)))  # the target budget
    assert int(our_masks[4].sum()) < int(our_masks[0].sum())  # masked during the schedule
    pattern = {k.replace(".default", ""): v for k, v in theirs.peft_config["default"].rank_pattern.items()}
    assert record.configs(ours)["default"].rank_pattern == pattern
    assert record.configs(ours)["default"].total_step == 12
    ranks = {k.removesuffix(".lora_E"): sum(v) for k, v in pattern.items()}
    assert record.configs(ours)["default"].final_ranks() == ranks
    mine = {k.removeprefix("base_model.model."): v for k, v in peft.get_peft_model_state_dict(theirs).items()}
    for key, value in peftkit.adapter_state_dict(ours).items():
        torch.testing.assert_close(value, mine[key], atol=1e-5, rtol=1e-4, msg=key)


def test_the_orthogonality_regularizer_equals_hf_peft_s():
    torch.manual_seed(0)
    theirs = peft.get_peft_model(tiny_llama(), peft.AdaLoraConfig(task_type="CAUSAL_LM", total_step=10,
                                                                  orth_reg_weight=0.3, target_modules="all-linear"))
    ours = peftkit.inject(tiny_llama(), AdaLoraConfig(total_step=10, orth_reg_weight=0.3, target_modules="all-linear"))
    io.load_tensors(ours, "default", {k.removeprefix("base_model.model."): v
                                      for k, v in peft.get_peft_model_state_dict(theirs).items()})
    ids = inputs("llama")
    with torch.no_grad():
        plain = theirs.get_base_model()(input_ids=ids, labels=ids).loss
        with_reg = theirs(input_ids=ids, labels=ids).loss
        extra = METHOD.training_loss_extra(ours, ["default"])
    assert float(extra) > 0.1
    torch.testing.assert_close(extra, with_reg - plain, atol=1e-5, rtol=1e-5)
    assert METHOD.training_loss_extra(ours, ["other"]) is None
    peftkit.set_trainable(ours, None)  # an adapter that does not train adds nothing
    assert METHOD.training_loss_extra(ours, ["default"]) is None


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_peftkit_adapter_loads_in_hf_peft_with_the_same_keys_and_outputs(family, tmp_path):
    ids = inputs(family)
    for directory, model in (("fresh", with_adapter(family, target_modules="all-linear")),
                             ("trained", train_both(family, 12)[1])):
        expected = run(model, ids)
        peftkit.save_adapter(model, tmp_path / directory)
        theirs = peft.PeftModel.from_pretrained(BUILDERS[family](), tmp_path / directory).eval()
        torch.testing.assert_close(run(theirs, ids), expected, atol=1e-5, rtol=0)
        assert set(peft.get_peft_model_state_dict(theirs)) == set(
            load_file(str(tmp_path / directory / "adapter_model.safetensors")))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_hf_peft_adapter_with_a_rank_pattern_loads_in_peftkit(family, tmp_path):
    theirs, _, _ = train_both(family, 12)
    theirs.eval()
    ids = inputs(family)
    expected = run(theirs, ids)
    theirs.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["rank_pattern"] and any(not all(v) for v in saved["rank_pattern"].values())
    ours = peftkit.load_adapter(BUILDERS[family](), tmp_path)
    torch.testing.assert_close(run(ours, ids), expected, atol=1e-5, rtol=0)
    ranks = {p: layer.lora_A["default"].shape[0] for p, layer in adalora_layers(ours)}
    assert ranks == {k.removesuffix(".lora_E"): sum(v) for k, v in saved["rank_pattern"].items()}
    assert set(peftkit.adapter_state_dict(ours)) == {
        k.removeprefix("base_model.model.") for k in load_file(str(tmp_path / "adapter_model.safetensors"))}


# --- the trainer's state hooks, the CLI, the planner ------------------------------------------------------
def test_trainer_state_round_trips_the_allocator_exactly():
    _, ours, _ = train_both("llama", 7)
    state = METHOD.trainer_state(ours, ["default"])
    assert state["default"]["rank_pattern"] and len(state["default"]["scores"]) == 6 * 4
    twin = copy.deepcopy(ours)
    for _, layer in adalora_layers(twin):
        layer.scores.clear()
    record.configs(twin)["default"] = record.configs(twin)["default"].replace(rank_pattern=None)
    METHOD.load_trainer_state(twin, ["default"], state)
    again = METHOD.trainer_state(twin, ["default"])
    assert again["default"]["rank_pattern"] == state["default"]["rank_pattern"]
    assert all(torch.equal(v, again["default"]["scores"][k]) for k, v in state["default"]["scores"].items())


def cli(model_dir: str, data: str, out, *extra: str) -> int:
    return main(["train", "--method", "adalora", "--model", model_dir, "--data", data, "--output-dir", str(out),
                 "--max-steps", "6", "--batch-size", "4", "--r", "6", "--lr", "0.05", "--no-progress",
                 "--threads", "1", "--save-every", "3", "--val-fraction", "0", *extra])


@pytest.mark.slow
def test_train_method_adalora_allocates_saves_for_hf_peft_and_resumes_exactly(tiny_model_dir, qa_jsonl, tmp_path,
                                                                               monkeypatch):
    from transformers import AutoModelForCausalLM

    from peftkit.train import recipe

    straight = tmp_path / "straight"
    assert cli(tiny_model_dir, qa_jsonl, straight) == 0
    config = json.loads((straight / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["init_r"], config["target_r"], config["total_step"]) == ("ADALORA", 6, 4, 6)
    assert sum(map(sum, config["rank_pattern"].values())) == 4 * len(config["rank_pattern"])  # the target budget
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    ours = peftkit.load_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), straight / "adapter")
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), straight / "adapter")
    torch.testing.assert_close(run(theirs.eval(), ids), run(ours, ids), atol=1e-5, rtol=0)

    crashed = tmp_path / "crashed"
    real_save = recipe.save_checkpoint

    def save_then_die(run_, step, *args, **kw):
        real_save(run_, step, *args, **kw)
        if step == 3:
            raise KeyboardInterrupt("simulated crash right after the step-3 checkpoint")

    monkeypatch.setattr(recipe, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        cli(tiny_model_dir, qa_jsonl, crashed)
    monkeypatch.setattr(recipe, "save_checkpoint", real_save)
    torch.manual_seed(1234)
    assert cli(tiny_model_dir, qa_jsonl, crashed, "--resume", "latest") == 0
    a, b = (load_file(str(max((d / "checkpoints").glob("step-*")) / "params.safetensors")) for d in (straight, crashed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    resumed = json.loads((crashed / "adapter" / "adapter_config.json").read_text())
    assert resumed["rank_pattern"] == config["rank_pattern"]
    losses = [[json.loads(r).get("loss") for r in (d / "metrics.jsonl").read_text().splitlines()]
              for d in (straight, crashed)]
    assert losses[0] == losses[1]


def test_plan_counts_adalora_exactly():
    model = tiny_llama()
    shape = presets.from_config(model.config.to_dict())
    settings = memory.Settings(method="adalora", r=4, dtype="float32", targets="all-linear")
    peftkit.inject(model, METHOD.config_from_options(type("O", (), dict(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))()))
    assert memory.adapter_params(shape, settings) == peftkit.trainable_parameters(model)[0]
    with pytest.raises(ValueError, match="cannot run with --fsdp"):
        METHOD.config_from_options(type("O", (), dict(r=4, lora_alpha=8, lora_dropout=0.0, fsdp=True,
                                                      target_modules="all-linear"))())
