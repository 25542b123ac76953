"""The memory model against a real `peftkit train` process on the embedded SmolLM2-135M (the full table of six
setups is `python bench/plan_memory.py`; this checks one of them in CI)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from peftkit.plan import memory, presets


@pytest.mark.slow
@pytest.mark.real_model
def test_predicted_peak_of_lora_with_checkpointing_is_within_20_percent_of_the_measured_one(tmp_path):
    data = tmp_path / "long.jsonl"
    answer = " ".join(["the order shipped late and the refund is pending"] * 40)  # far past --max-length
    data.write_text("".join(json.dumps({"prompt": f"Ticket {i}", "completion": answer}) + "\n" for i in range(16)))
    out = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "peftkit.cli", "train", "--data", str(data), "--val-fraction", "0.125",
                    "--method", "lora", "--r", "16", "--gradient-checkpointing", "--batch-size", "2",
                    "--max-length", "128", "--max-steps", "2", "--save-every", "0", "--no-progress",
                    "--output-dir", str(out)], check=True, capture_output=True)
    summary = json.loads((out / "summary.json").read_text())
    est = memory.estimate(presets.resolve("smollm2"), memory.Settings(
        method="lora", r=16, batch_size=2, seq_len=128, gradient_checkpointing=True, dtype="float32",
        device="cpu", answer_fraction=0.85))
    assert 0.8 <= summary["peak_memory_mb"] * 2**20 / est.total <= 1.2
