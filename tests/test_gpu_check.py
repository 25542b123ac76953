"""bench/gpu_check.sh, the one script a GPU session runs, kept alive without a GPU: `--device cpu` runs the same
parts (the CUDA-marked tests on the CPU, bench/train.py, bench/serve.py, bench/nf4.py) at small sizes, and every
part must pass and print its figures in the table. Its usage errors exit 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"


def _run(*args: str, logs: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "GPU_CHECK_LOGS": str(logs), "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", str(SCRIPT), *args, "--python", sys.executable], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def test_bad_usage_exits_2_naming_the_choices(tmp_path):
    done = _run("--device", "tpu", logs=tmp_path / "logs", timeout=60)
    assert done.returncode == 2 and "--device must be cuda or cpu" in done.stderr
    done = _run("--frobnicate", logs=tmp_path / "logs", timeout=60)
    assert done.returncode == 2 and "unknown argument" in done.stderr


@pytest.mark.slow
def test_device_cpu_runs_every_part_and_prints_the_table(tmp_path):
    logs = tmp_path / "logs"
    done = _run("--device", "cpu", logs=logs)
    out = done.stdout
    assert done.returncode == 0, out[-4000:] + done.stderr[-2000:]
    assert "== gpu_check --device cpu ==" in out
    table = out[out.index("== gpu_check --device cpu =="):]
    parts = {line.split("|")[0].strip(): line.split("|")[1].strip() for line in table.splitlines()
             if line.count("|") >= 5 and line.split("|")[0].strip() not in ("", "part")}
    assert parts == {"tests": "ok", "train": "ok", "serve": "ok", "nf4": "ok"}, table
    passed = next(line for line in table.splitlines() if "passed / failed / skipped" in line)
    assert passed.split("|")[4].split("/")[1].strip() == "0" and int(passed.split("|")[4].split("/")[0]) > 0
    assert "(peftkit / HF)" in table and "peftkit / HF mixed" in table  # figures read from each part's JSON
    for name in ("train.json", "serve.json", "nf4.json", "tests.xml"):
        assert (logs / name).is_file(), name
