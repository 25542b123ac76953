"""The thread choice (cpu.py): from the cores free to the process, passive OpenMP waits for the command, and
the choice said in the run's header and summary.json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from peftkit import cpu
from peftkit.cli import main


@pytest.mark.parametrize("usable, busy, processes, want", [
    (2, 0.05, 1, 2),   # idle machine: every core
    (2, 1.0, 1, 1),    # one busy process beside it (the case: 2 threads took 46 s a step, 1 took 7.3 s)
    (2, 0.7, 1, 1),    # a core busy 70% of the time is taken
    (2, 2.0, 1, 1),    # all taken: still one thread
    (2, 5.0, 1, 1),    # load above the cores
    (16, 3.1, 1, 13),  # 12.9 free cores: 13 (a core others keep 10% busy counts as free)
    (16, 3.9, 1, 12),  # 12.1 free: 12
    (16, 0.0, 4, 4),   # four processes share 16 free cores
    (2, 0.0, 4, 1),    # more processes than cores: at least one each
])
def test_threads_follow_the_free_cores(usable, busy, processes, want):
    choice = cpu.choose_threads(usable, busy, processes=processes)
    assert choice.threads == want
    assert f"{usable} usable cores" in choice.reason and f"{busy:.1f} busy" in choice.reason


def test_requested_threads_win_and_unknown_load_uses_every_core():
    assert cpu.choose_threads(8, 7.5, requested=3).threads == 3
    assert cpu.choose_threads(8, 7.5, requested=3).reason == "--threads"
    unknown = cpu.choose_threads(8, None)
    assert unknown.threads == 8 and "load unknown" in unknown.reason


def _stat(busy: list[int], idle: list[int]) -> str:
    lines = [f"cpu  {sum(busy)} 0 0 {sum(idle)} 0 0 0 0 0 0"]
    lines += [f"cpu{i} {b} 0 0 {d} 0 0 0 0 0 0" for i, (b, d) in enumerate(zip(busy, idle))]
    return "\n".join(lines) + "\nintr 1 2 3\n"


def test_busy_cores_counts_only_the_affinity_cpus(tmp_path, monkeypatch):
    stat = tmp_path / "stat"
    reads = iter([_stat([0, 0, 0], [0, 0, 0]), _stat([100, 0, 50], [0, 100, 50])])
    real_read = type(stat).read_text
    monkeypatch.setattr(type(stat), "read_text", lambda self, *a, **k: next(reads) if self == stat
                        else real_read(self, *a, **k))
    # cpu0 fully busy, cpu1 idle, cpu2 half busy; only cpu0 and cpu1 are ours
    assert cpu.busy_cores([0, 1], sample_seconds=0, stat_path=str(stat)) == pytest.approx(1.0)


def test_busy_cores_falls_back_to_the_load_average(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "getloadavg", lambda: (1.5, 1.0, 0.5))
    assert cpu.busy_cores([0, 1], sample_seconds=0, stat_path=str(tmp_path / "absent")) == 1.5


def test_busy_cores_sees_a_busy_process(tmp_path):
    """Real /proc/stat with a spinning process pinned beside this one (Linux, 2+ cores)."""
    cores = cpu.affinity_cores()
    if not os.path.exists("/proc/stat") or len(cores) < 2:
        pytest.skip("needs Linux /proc/stat and two cores")
    spinner = subprocess.Popen([sys.executable, "-c", f"import os; os.sched_setaffinity(0, {{{cores[0]}}})\n"
                                "while True: pass"])
    try:
        time.sleep(0.5)
        busy = cpu.busy_cores(cores[:2], sample_seconds=0.5)
    finally:
        spinner.kill()
        spinner.wait()
    assert busy is not None and busy >= 0.8, busy
    assert cpu.choose_threads(2, busy).threads == 1


def test_cgroup_quota(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cpu.cgroup_quota_cores(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cpu.cgroup_quota_cores(tmp_path) is None
    assert cpu.cgroup_quota_cores(tmp_path / "none") is None


def test_the_command_waits_passively_and_a_python_caller_is_left_alone():
    code = ("import os, sys; sys.argv[0] = {argv0!r}; import peftkit; "
            "print(os.environ.get('OMP_WAIT_POLICY'))")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    for argv0, want in (("/usr/bin/peftkit", "PASSIVE"), ("script.py", "None")):
        out = subprocess.run([sys.executable, "-c", code.format(argv0=argv0)], env=env, capture_output=True,
                             text=True, check=True).stdout.strip()
        assert out == want, (argv0, out)
    env["OMP_WAIT_POLICY"] = "ACTIVE"  # the user's choice stays
    out = subprocess.run([sys.executable, "-c", code.format(argv0="/usr/bin/peftkit")], env=env,
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == "ACTIVE"


def test_train_says_its_threads_in_the_header_and_summary(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n" for i in range(4)))
    before = torch.get_num_threads()
    try:
        assert main(["train", "--model", tiny_model_dir, "--data", str(data), "--output-dir", str(tmp_path / "run"),
                     "--max-steps", "1", "--batch-size", "2", "--val-fraction", "0", "--save-every", "0",
                     "--no-progress"]) == 0
        chosen = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    out = capsys.readouterr().out
    assert f"peftkit train: {chosen} CPU thread" in out and "usable cores" in out and "--threads N" in out
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["cpu_threads"] == chosen
