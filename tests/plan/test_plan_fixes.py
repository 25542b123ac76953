"""Issue 20, item 10: when a setup does not fit, `peftkit plan` names the single changes that make it fit and
by how much; the GPU table's fit words are defined."""

from __future__ import annotations

import json
from dataclasses import replace

from peftkit.cli import main
from peftkit.plan import hardware, memory, presets

GIB = 2**30
SETUP = ["llama-2-7b", "--method", "lora", "--batch-size", "8", "--seq-len", "1024", "--max-memory", "24"]


def test_a_setup_that_does_not_fit_lists_fixes_the_memory_model_confirms(capsys):
    assert main(["plan", *SETUP, "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    shape = presets.resolve("llama-2-7b")
    s = memory.Settings(method="lora", batch_size=8, seq_len=1024)
    before = memory.estimate(shape, s).total
    assert before > 24 * GIB
    fixes = {f["kind"]: f for f in record["fixes"]}
    assert set(fixes) >= {"gradient checkpointing", "smaller micro-batch"}
    assert [f["total_gib"] for f in record["fixes"]] == sorted(f["total_gib"] for f in record["fixes"])
    confirm = {"gradient checkpointing": replace(s, gradient_checkpointing=True),
               "smaller micro-batch": replace(s, batch_size=1)}
    for kind, settings in confirm.items():
        total = memory.estimate(shape, settings).total
        assert total <= 24 * GIB
        assert fixes[kind]["total_gib"] == round(total / GIB, 2)
        assert fixes[kind]["saving_gib"] == round((before - total) / GIB, 2)
    assert fixes["smaller micro-batch"]["change"].startswith("--batch-size 1 with 8 gradient-accumulation steps")
    # the mildest step that fits: a micro-batch of 2 would not
    assert memory.estimate(shape, replace(s, batch_size=2)).total > 24 * GIB

    assert main(["plan", *SETUP]) == 0
    text = capsys.readouterr().out
    gc = fixes["gradient checkpointing"]
    assert "does not fit the --max-memory budget (24 GiB)" in text
    assert f"{gc['total_gib']:.2f} GiB  (saves {gc['saving_gib']:.2f} GiB, {gc['fit']})  --gradient-checkpointing" in text


def test_every_listed_fix_fits_and_full_fine_tuning_gets_the_8bit_optimizer_and_qlora():
    shape = presets.resolve("llama-2-13b")
    est = memory.estimate(shape, memory.Settings(method="full", batch_size=2, seq_len=1024))
    found = hardware.fixes(est, hardware.target_gpu())
    assert {f["kind"] for f in found} >= {"8-bit optimizer", "QLoRA"}
    for f in found:
        assert f["fit"] in ("fits", "tight") and f["total_gib"] <= hardware.GPUS[-1].memory_gib
        assert f["saving_gib"] > 0


def test_nothing_is_listed_when_it_fits_and_no_single_change_is_said_plainly(capsys):
    small = memory.estimate(presets.resolve("llama-2-7b"), memory.Settings(method="qlora"))
    assert hardware.fixes(small, hardware.target_gpu()) == []
    assert main(["plan", "llama-2-70b", "--method", "lora", "--batch-size", "8", "--seq-len", "2048"]) == 0
    assert "no single change makes it fit" in capsys.readouterr().out


def test_the_legend_defines_tight(capsys):
    assert main(["plan", "llama-2-7b"]) == 0
    text = capsys.readouterr().out
    assert "tight: between 90% and 100%" in text and "fits: the estimate is at most 90%" in text
    assert hardware.TIGHT == 0.90
