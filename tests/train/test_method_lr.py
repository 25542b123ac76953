"""Each method's default learning rate: LoRA's default (2e-4; 2e-3 for the built-in task) times the method's
`lr_scales` (registry.lr_scale), unless --lr is chosen on the command line or in a YAML file; said in the header;
kept through `replace(method=...)` and so in a sweep's trials."""

from __future__ import annotations

from pathlib import Path

import pytest

from peftkit import registry
from peftkit.plan.sweep import trial_options
from peftkit.plan.sweep_space import Candidate
from peftkit.train import options as opts


@pytest.mark.parametrize("method, scale", [("lora", 1.0), ("dora", 1.0), ("qlora", 1.0), ("oft", 1.0),
                                           ("loha", 5.0), ("lokr", 5.0), ("ia3", 15.0), ("vera", 25.0),
                                           ("adalora", 5.0),
                                           ("prompt", 15.0), ("ptuning", 1.0), ("full", 1.0)])
def test_an_unchosen_lr_is_loras_default_times_the_methods_scale(method, scale):
    assert registry.lr_scale(method) == scale
    builtin = opts.build({"method": method})
    own = opts.build({"method": method, "data": "train.jsonl"})
    assert builtin.lr == pytest.approx(opts.BUILTIN_PRESET["lr"] * scale)
    assert own.lr == pytest.approx(opts.FIELDS["lr"].default * scale)
    assert not builtin.lr_given
    note = builtin.lr_note()
    if scale == 1.0:
        assert note is None
    else:
        assert f"{method}'s default" in note and f"{scale:g}x LoRA's" in note and "--lr" in note


def test_a_chosen_lr_wins_from_a_flag_a_yaml_file_or_replace(tmp_path):
    assert opts.build({"method": "loha", "lr": 3e-4}).lr == 3e-4
    cfg = tmp_path / "run.yaml"
    cfg.write_text("method: vera\nlr: 0.005\n")
    from_file = opts.build({}, str(cfg))
    assert from_file.lr == 0.005 and from_file.lr_given and from_file.lr_note() is None
    chosen = opts.build({"method": "ia3"}).replace(lr=1e-3)
    assert chosen.lr == 1e-3 and chosen.lr_given and chosen.replace(method="loha").lr == 1e-3


def test_replacing_the_method_moves_a_default_lr_to_the_new_methods_scale():
    lora = opts.build({})
    loha = lora.replace(method="loha")
    assert loha.lr == pytest.approx(5 * lora.lr) and loha.replace(method="oft").lr == pytest.approx(lora.lr)
    assert lora.replace(method="prompt", lr_given=True).lr == lora.lr  # an explicit flag says the lr is chosen


def test_a_sweep_trains_each_method_at_its_default_unless_the_sweep_chose_an_lr(tmp_path: Path):
    base = opts.build({})
    trial = trial_options(base, Candidate("loha", 8), 10, tmp_path / "t")
    assert trial.lr == pytest.approx(5 * base.lr)
    assert trial_options(base.replace(lr=1e-3), Candidate("loha", 8), 10, tmp_path / "t").lr == 1e-3
    assert trial_options(base, Candidate("loha", 8, lr=7e-4), 10, tmp_path / "t").lr == 7e-4  # TPE's own


def test_the_header_says_which_lr_a_method_took(tiny_model_dir, qa_jsonl, tmp_path, capsys):
    from peftkit.cli import main

    code = main(["train", "--model", tiny_model_dir, "--data", qa_jsonl, "--method", "ia3", "--max-steps", "1",
                 "--batch-size", "2", "--no-progress", "--threads", "1", "--eval-examples", "0",
                 "--output-dir", str(tmp_path / "ia3")])
    assert code == 0
    assert "lr 0.003: ia3's default, 15x LoRA's 0.0002 (--lr to choose)" in capsys.readouterr().out


def test_the_constructor_is_literal_and_stored_options_without_the_field_count_as_chosen():
    direct = opts.TrainOptions(method="ia3")
    assert direct.lr == opts.FIELDS["lr"].default and direct.lr_given and direct.lr_note() is None
    assert direct.replace(method="loha").lr == direct.lr
    stored = opts.build({"method": "ia3"}).to_dict()
    assert stored["lr_given"] is False and opts.TrainOptions(**stored).lr_note() is not None
    del stored["lr_given"]  # a trial_options.json written before the field existed
    assert opts.TrainOptions(**stored).replace(method="lora").lr == stored["lr"]


def test_a_resume_without_lr_continues_at_the_runs_own_rate(tmp_path):
    import json

    from peftkit.train import state

    (tmp_path / "run_options.json").write_text(json.dumps({"lr": 2e-4, "method": "ia3"}))  # before the new default
    o = opts.build({"method": "ia3", "data": "d.jsonl", "resume": "latest"})
    assert o.lr == pytest.approx(3e-3)
    resumed = state.with_run_lr(tmp_path, o)
    assert resumed.lr == 2e-4 and not resumed.lr_given
    chosen = opts.build({"method": "ia3", "data": "d.jsonl", "lr": 1e-3})
    assert state.with_run_lr(tmp_path, chosen).lr == 1e-3  # a chosen --lr is kept (and then refused, as before)
