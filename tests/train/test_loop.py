"""`peftkit train` end to end on a tiny Llama: outputs, resume bit for bit, errors, more than one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peftkit.cli import main
from peftkit.train import loop, recipe
from peftkit.train import options as opts


def run_opts(model: str, data: str, out: Path, **kw) -> opts.TrainOptions:
    base = dict(model=model, data=data, output_dir=str(out), max_steps=6, batch_size=4, lr=5e-3, warmup_steps=1,
                r=4, lora_alpha=8, lora_dropout=0.1, save_every=2, keep_checkpoints=5, val_fraction=0.125,
                progress=False, max_length=64, threads=1)
    base.update(kw)
    return opts.build(base)


def final_params(out: Path) -> dict[str, torch.Tensor]:
    last = max((out / "checkpoints").glob("step-*"))
    return load_file(last / "params.safetensors")


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_train_writes_adapter_metrics_plot_summary_and_checkpoints(tiny_model_dir, qa_jsonl, tmp_path):
    out = tmp_path / "run"
    summary = loop.train(run_opts(tiny_model_dir, qa_jsonl, out, max_steps=8, eval_every=4, keep_checkpoints=2,
                                  lora_dropout=0.0, lr=5e-2, schedule="constant"))
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 9))
    assert {"lr", "tokens_per_s", "memory_mb", "epoch"} <= set(steps[0])
    assert any("val_loss" in r for r in rows[:-1])  # eval every 4 steps, and at the end
    assert steps[-1]["loss"] < steps[0]["loss"] * 0.8, "the adapter should learn the four answers"
    assert [p.name for p in sorted((out / "checkpoints").glob("step-*"))] == ["step-00000006", "step-00000008"]
    saved = json.loads((out / "summary.json").read_text())
    assert saved["steps"] == 8 and 0 < saved["trainable_share"] < 0.5 and saved["adapter_bytes"] > 0
    assert summary["val_loss"] == pytest.approx(saved["val_loss"])
    import peftkit
    from peftkit.models import load_model

    fresh, _ = load_model(tiny_model_dir)
    peftkit.load_adapter(fresh, out / "adapter")  # PEFT format, loadable as any adapter


def test_resume_after_a_crash_equals_an_uninterrupted_run_bit_for_bit(tiny_model_dir, qa_jsonl, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    loop.train(run_opts(tiny_model_dir, qa_jsonl, straight))

    crashed = tmp_path / "crashed"
    real_save = recipe.save_checkpoint

    def save_then_die(out, step, *args, **kw):
        real_save(out, step, *args, **kw)
        if step == 4:
            raise KeyboardInterrupt("simulated crash right after the step-4 checkpoint")

    monkeypatch.setattr(recipe, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        loop.train(run_opts(tiny_model_dir, qa_jsonl, crashed))
    monkeypatch.setattr(recipe, "save_checkpoint", real_save)
    torch.manual_seed(1234)  # whatever the process did since, resume restores the random state
    loop.train(run_opts(tiny_model_dir, qa_jsonl, crashed, resume="latest"))

    a, b = final_params(straight), final_params(crashed)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert losses(straight) == losses(crashed)


def test_cli_errors_are_clear_and_nonzero(tiny_model_dir, qa_jsonl, tmp_path, capsys):
    def run(*argv) -> str:
        code = main(["train", "--model", tiny_model_dir, "--no-progress", "--max-steps", "1", *argv])
        assert code != 0
        return capsys.readouterr().err

    assert "no such file" in run("--data", str(tmp_path / "missing.jsonl"), "--output-dir", str(tmp_path / "a"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n')
    assert "line 2" in run("--data", str(bad), "--output-dir", str(tmp_path / "b"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert "empty" in run("--data", str(empty), "--output-dir", str(tmp_path / "c")).lower()
    err = main(["train", "--model", "no-such-model", "--data", qa_jsonl, "--output-dir", str(tmp_path / "d")])
    assert err != 0 and "no-such-model" in capsys.readouterr().err

    out = tmp_path / "run"
    assert main(["train", "--model", tiny_model_dir, "--data", qa_jsonl, "--output-dir", str(out), "--max-steps",
                 "2", "--save-every", "1", "--no-progress", "--batch-size", "4"]) == 0
    capsys.readouterr()
    assert "already holds a run" in run("--data", qa_jsonl, "--output-dir", str(out))
    newest = max((out / "checkpoints").glob("step-*"))
    (newest / "params.safetensors").write_bytes(b"garbage")
    msg = run("--data", qa_jsonl, "--output-dir", str(out), "--resume", "latest", "--max-steps", "2",
              "--save-every", "1", "--batch-size", "4")
    assert "params.safetensors" in msg
    assert "differ" in run("--data", qa_jsonl, "--output-dir", str(out), "--resume", "latest", "--r", "2")


def test_options_precedence_yaml_and_preset(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("lr: 0.01\nbatch-size: 4\ndata: d.jsonl\n")
    o = opts.build({"batch_size": 2}, str(cfg))
    assert (o.lr, o.batch_size, o.data, o.max_steps) == (0.01, 2, "d.jsonl", None)
    builtin = opts.build({})
    assert builtin.lr == opts.BUILTIN_PRESET["lr"] and builtin.max_steps == opts.BUILTIN_PRESET["max_steps"]
    assert opts.build({"lr": 1e-4}).lr == 1e-4
    cfg.write_text("learning_rate: 1\n")
    with pytest.raises(ValueError, match="unknown option 'learning_rate'"):
        opts.build({}, str(cfg))
    with pytest.raises(ValueError, match="unknown"):
        opts.build({"method": "no-such-method"})


def _torchrun_losses(tiny_model_dir, qa_jsonl, out: Path, *extra: str) -> list[float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "peftkit.cli", "train", "--model", tiny_model_dir, "--data", qa_jsonl,
           "--output-dir", str(out), "--max-steps", "4", "--batch-size", "4", "--lr", "5e-3", "--r", "4",
           "--no-progress", "--save-every", "2", "--threads", "1", "--val-fraction", "0.125", *extra]
    done = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return losses(out)


@pytest.mark.slow
def test_two_processes_follow_the_loss_curve_of_one(tiny_model_dir, qa_jsonl, tmp_path):
    one = _torchrun_losses(tiny_model_dir, qa_jsonl, tmp_path / "one")
    two = _torchrun_losses(tiny_model_dir, qa_jsonl, tmp_path / "two", "--nproc", "2")
    fsdp = _torchrun_losses(tiny_model_dir, qa_jsonl, tmp_path / "fsdp", "--nproc", "2", "--fsdp")
    assert one == pytest.approx(two, abs=1e-5)
    assert one == pytest.approx(fsdp, abs=1e-4)
    a, b = final_params(tmp_path / "one"), final_params(tmp_path / "two")
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=0)


def test_qlora_trains_adapters_on_a_frozen_nf4_base(tiny_model_dir, qa_jsonl, tmp_path):
    from peftkit.quant.linear import NF4Linear

    out = tmp_path / "qlora"
    seen = {}
    real_train = loop.sum_token_loss

    def spy(model, *args, **kw):
        if not seen:
            seen["nf4"] = [m for m in model.modules() if isinstance(m, NF4Linear)]
            seen["packed"] = [m.packed.clone() for m in seen["nf4"]]
        return real_train(model, *args, **kw)

    loop.sum_token_loss = spy
    try:
        summary = loop.train(run_opts(tiny_model_dir, qa_jsonl, out, method="qlora", max_steps=4, lora_dropout=0.0))
    finally:
        loop.sum_token_loss = real_train
    assert len(seen["nf4"]) >= 14  # every linear of the 2 blocks is 4-bit
    assert all(torch.equal(m.packed, p) for m, p in zip(seen["nf4"], seen["packed"]))  # the base stayed frozen
    rows = losses(out)
    assert rows[-1] < rows[0]
    assert summary["method"] == "qlora" and (out / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("method, peft_type", [("dora", "LORA"), ("bottleneck", "BOTTLENECK"),
                                               ("prefix", "PREFIX_TUNING")])
def test_other_methods_train_and_save_loadable_adapters(tiny_model_dir, qa_jsonl, tmp_path, method, peft_type):
    import peftkit
    from peftkit.models import load_model

    out = tmp_path / method
    loop.train(run_opts(tiny_model_dir, qa_jsonl, out, method=method, max_steps=12, lora_dropout=0.0, lr=2e-2,
                        save_every=0))
    rows = losses(out)
    assert sum(rows[-4:]) < sum(rows[:4])  # batches differ step to step: compare the ends of the curve
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == peft_type and config.get("use_dora", False) == (method == "dora")
    fresh, _ = load_model(tiny_model_dir)
    peftkit.load_adapter(fresh, out / "adapter")


def test_full_fine_tuning_trains_every_weight_and_saves_a_loadable_model(tiny_model_dir, qa_jsonl, tmp_path):
    from peftkit.models import load_model

    out = tmp_path / "full"
    summary = loop.train(run_opts(tiny_model_dir, qa_jsonl, out, method="full", max_steps=8, lr=2e-3, save_every=4))
    assert summary["trainable_params"] == summary["total_params"]
    rows = losses(out)
    assert sum(rows[-3:]) < sum(rows[:3])
    base, _ = load_model(tiny_model_dir)
    tuned, _ = load_model(str(out / "model"))
    changed = [n for n, p in tuned.state_dict().items() if not torch.equal(p, base.state_dict()[n])]
    assert len(changed) == len(base.state_dict())  # every tensor moved
    assert torch.equal(tuned.get_input_embeddings().weight, final_params(out)["model.embed_tokens.weight"])


def test_full_fine_tuning_refuses_fsdp_with_a_reason():
    with pytest.raises(ValueError, match="--method full with --fsdp is not supported"):
        opts.build({"method": "full", "fsdp": True})


def test_summary_shows_exact_match_with_or_without_the_base_score():
    from peftkit.train import report

    s = {"output_dir": "runs/x", "exact_match_before": None, "exact_match_after": 0.97, "eval_examples": 20,
         "val_loss": 0.1, "steps": 3, "train_seconds": 9.0, "tokens_per_second": 50.0, "total_seconds": 12.0,
         "trainable_params": 10, "total_params": 100, "trainable_share": 0.1, "adapter_dir": "runs/x/adapter",
         "adapter_bytes": 2**20, "peak_memory_mb": 900.0, "memory_kind": "resident set size"}
    assert "(held-out, 20 tickets): 97% after" in report.format_summary(s)
    assert "0% before -> 97% after" in report.format_summary(s | {"exact_match_before": 0.0})
    assert opts.build({}).score_base and not opts.build({"score_base": False}).score_base
