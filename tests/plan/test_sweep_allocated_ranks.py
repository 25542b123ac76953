"""`peftkit sweep --suggest-rank` reports the per-module ranks AdaLoRA's allocator left in a trial's file."""

from __future__ import annotations

import torch
from conftest import tiny_llama

import peftkit
from peftkit import record
from peftkit.methods.adalora import AdaLoraConfig, adalora_layers, allocator
from peftkit.plan import sweep_report


def _adalora_trial(tmp_path, name="adalora"):
    torch.manual_seed(0)
    model = peftkit.inject(tiny_llama(), AdaLoraConfig(init_r=4, target_r=2, total_step=10), "default")
    paths = [p for p, _ in adalora_layers(model)]
    pattern = {f"{p}.lora_E": [k < 1 + j % 4 for k in range(4)] for j, p in enumerate(paths)}  # ranks 1, 2, 3, 4
    allocator.apply_pattern(model, "default", pattern)
    record.configs(model)["default"] = record.configs(model)["default"].replace(rank_pattern=pattern)
    peftkit.save_adapter(model, tmp_path / name)
    expected = {p: 1 + j % 4 for j, p in enumerate(paths)}
    return {"name": name, "method": "adalora", "r": None, "status": "ok", "steps": 10,
            "adapter_dir": str(tmp_path / name)}, expected


def test_suggest_rank_reports_adalora_s_allocated_ranks_per_module(tmp_path):
    trial, expected = _adalora_trial(tmp_path)
    sug = sweep_report.suggest_rank([trial], (4, 16))
    assert sug["from"] is None  # no LoRA factors to measure: the spectral part says so
    alloc = sug["allocated"]
    assert alloc["per_module"] == expected and alloc["from"] == "adalora" and alloc["steps"] == 10
    values = sorted(expected.values())
    assert (alloc["min_rank"], alloc["max_rank"], alloc["total_rank"]) == (values[0], values[-1], sum(values))
    assert alloc["modules"] == len(expected)
    text = sweep_report.rank_suggestion_text(sug)
    assert f"adalora allocated ranks {values[0]}-{values[-1]}" in text and f"{sum(values)} in all" in text


def test_no_allocated_section_without_a_rank_allocating_trial(tmp_path):
    trial, _ = _adalora_trial(tmp_path)
    failed = {**trial, "status": "failed"}
    assert "allocated" not in sweep_report.suggest_rank([failed], (4,))
    model = peftkit.inject(tiny_llama(), peftkit.LoraConfig(r=2, target_modules=["q_proj"]))
    peftkit.save_adapter(model, tmp_path / "lora")
    lora = {"name": "lora-r2", "method": "lora", "r": 2, "status": "ok", "steps": 3,
            "adapter_dir": str(tmp_path / "lora")}
    sug = sweep_report.suggest_rank([lora], (2,))
    assert "allocated" not in sug and "Rank suggestion" in sweep_report.rank_suggestion_text(sug)
