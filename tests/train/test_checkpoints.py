"""Checkpoints: exact round trip (params, AdamW, LambdaLR, RNG), pruning, corruption, and SIGKILL mid-save."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import peftkit
from peftkit.train.checkpoints import (
    CheckpointError,
    capture_rng,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    resolve_resume,
    restore_rng,
    save_checkpoint,
    verify_checkpoint,
)


def _params(step: int) -> dict[str, torch.Tensor]:
    return {"a.lora_A.weight": torch.full((4, 8), float(step)), "a.lora_B.weight": torch.arange(16.0).view(2, 8)}


def _save(run: Path, step: int, **kw) -> Path:
    return save_checkpoint(run, step, params=_params(step), trainer_state={"step": step}, **kw)


def _steps(run: Path) -> list[int]:
    return [int(p.name.split("-")[1]) for p in list_checkpoints(run)]


def test_round_trip_is_bit_exact(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    x = torch.randn(16, 8)
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.dropout(model(x), 0.5).square().mean().backward()
        opt.step()
        sched.step()
    random.seed(1)
    np.random.seed(2)
    rng = capture_rng()
    expected = (torch.rand(5), random.random(), np.random.rand(3), random.gauss(0, 1))
    params = {k: v.detach() for k, v in model.named_parameters()}
    path = save_checkpoint(tmp_path, 3, params=params, extra_dirs={"adapter": lambda d: (d / "x.txt").write_text("hi")},
                           trainer_state={"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": 3,
                                          "rng": rng})
    assert path == tmp_path / "checkpoints" / "step-00000003"
    assert set(verify_checkpoint(path)["files"]) == {"params.safetensors", "trainer_state.pt", "adapter/x.txt"}

    torch.rand(100), random.random(), np.random.rand(7)  # move every generator on
    loaded, state = load_checkpoint(path)
    assert loaded.keys() == params.keys() and all(torch.equal(loaded[k], params[k]) for k in params)
    restore_rng(state["rng"])
    got = (torch.rand(5), random.random(), np.random.rand(3), random.gauss(0, 1))
    assert torch.equal(got[0], expected[0]) and got[1] == expected[1] and got[3] == expected[3]
    assert np.array_equal(got[2], expected[2])

    # one more step from the original and from the restored copy gives identical weights
    model2 = torch.nn.Linear(8, 4)
    model2.load_state_dict(loaded)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0 / (1 + s))
    opt2.load_state_dict(state["optimizer"])
    sched2.load_state_dict(state["scheduler"])
    for m, o, s in ((model, opt, sched), (model2, opt2, sched2)):
        restore_rng(state["rng"])
        o.zero_grad()
        torch.nn.functional.dropout(m(x), 0.5).square().mean().backward()
        o.step()
        s.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters(), strict=True))
    assert sched.get_last_lr() == sched2.get_last_lr()


def test_keep_last_prunes_oldest_and_replace_same_step(tmp_path):
    for step in range(1, 6):
        _save(tmp_path, step, keep_last=2)
    assert _steps(tmp_path) == [4, 5]
    _save(tmp_path, 5, keep_last=2)  # replacing an existing step goes through a rename-aside
    assert _steps(tmp_path) == [4, 5]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000004", "step-00000005"]
    _save(tmp_path, 2, keep_last=2)  # an older step just saved is never pruned away at once
    assert 2 in _steps(tmp_path)
    for step in range(6, 9):
        _save(tmp_path, step, keep_last=0)
    assert _steps(tmp_path) == [2, 4, 5, 6, 7, 8]


def test_flipped_byte_names_the_file(tmp_path):
    path = _save(tmp_path, 1)
    f = path / "params.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"params\.safetensors: sha256 checksum mismatch"):
        load_checkpoint(path)
    (path / "trainer_state.pt").unlink()
    with pytest.raises(CheckpointError, match=r"trainer_state\.pt: missing") as e:
        verify_checkpoint(path)
    assert str(path) in str(e.value)


def test_incomplete_and_hidden_dirs_are_not_listed(tmp_path):
    first, second, third = (_save(tmp_path, s) for s in (1, 2, 3))
    manifest = second / "manifest.json"
    manifest.write_text(manifest.read_text()[:20])  # truncated
    (third / "manifest.json").unlink()
    assert list_checkpoints(tmp_path) == [first]
    # a stale temp folder of a dead process (pid 2**22+1 is above Linux's pid_max default) with a newer step
    stale = tmp_path / "checkpoints" / f".tmp-step-00000009-{2**22 + 1}"
    stale.mkdir()
    (stale / "params.safetensors").write_bytes(b"partial")
    assert latest_checkpoint(tmp_path) == first
    assert resolve_resume(tmp_path, True) == first and resolve_resume(tmp_path, "latest") == first
    assert resolve_resume(tmp_path, False) is None and resolve_resume(tmp_path / "nothing", True) is None
    assert resolve_resume(tmp_path, str(first)) == first
    for bad in (third, tmp_path / "checkpoints" / "step-00000077", tmp_path):
        with pytest.raises(CheckpointError, match=str(bad)):
            resolve_resume(tmp_path, str(bad))
    _save(tmp_path, 4)  # the next save deletes the dead process's leftovers
    assert not stale.exists()


def test_unsafe_trainer_state_fails_at_save(tmp_path):
    with pytest.raises(CheckpointError, match="weights_only"):
        save_checkpoint(tmp_path, 1, params=_params(1), trainer_state={"obj": Path("x")})
    assert list((tmp_path / "checkpoints").iterdir()) == []


# The kill test. One driver process imports torch once, then forks a saver per round (forking before any torch
# work is safe) and SIGKILLs it: after a random delay, or at a hook inside the save (mid-write, just before the
# rename into place, between the rename-aside and the rename into place). After each round the test checks the run.
DRIVER = r"""
import json, os, random, select, signal, sys, time
import torch
torch.set_num_threads(1)
import peftkit.train.checkpoints as ck
run, rounds = sys.argv[1], json.loads(sys.argv[2])

def params_for(step):
    g = torch.Generator().manual_seed(step)
    return {f"w{i}": torch.randn(256, 1024, generator=g) for i in range(4)}  # 4 MB

def saver(mode, w):
    say = lambda msg: os.write(w, (msg + "\n").encode())
    real_rename = os.rename
    def rename(src, dst):
        if mode == "before_rename" and os.path.basename(src).startswith(".tmp-"):
            say("K"); time.sleep(30)
        real_rename(src, dst)
        if mode == "between_renames_replace" and os.path.basename(dst).startswith(".old-"):
            say("K"); time.sleep(30)
    os.rename = rename
    def adapter(d):
        (d / "adapter_model.safetensors").write_bytes(b"x" * 1000)
        if mode == "mid_write":
            say("K"); time.sleep(30)
    latest = ck.latest_checkpoint(run)
    # "replace" modes start by saving the latest step again, which renames the existing one aside first
    step = int(latest.name.split("-")[1]) + ("replace" not in mode) if latest else 1
    while True:
        ck.save_checkpoint(run, step, params=params_for(step), trainer_state={"step": step},
                           extra_dirs={"adapter": adapter}, keep_last=2)
        say(f"D {step}")
        step += 1

for mode, delay in rounds:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            saver(mode, w)
        finally:
            os._exit(1)
    os.close(w)
    buf, done = b"", []
    while True:
        ready, _, _ = select.select([r], [], [], 20)
        chunk = os.read(r, 4096) if ready else b""
        buf += chunk
        if not chunk or b"K\n" in buf or (mode.startswith("random") and b"D " in buf):
            break
    if mode.startswith("random"):
        time.sleep(delay)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    while chunk := os.read(r, 4096):
        buf += chunk
    os.close(r)
    lines = buf.decode().split()
    done = [int(x) for x in lines if x.isdigit()]
    print(json.dumps({"mode": mode, "pid": pid, "done": done, "killed_at_hook": "K" in lines}), flush=True)
    sys.stdin.readline()
"""


def _params_for(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return {f"w{i}": torch.randn(256, 1024, generator=g) for i in range(4)}


def _check_run(run: Path) -> list[int]:
    """Every listed checkpoint verifies, loads, and holds exactly what its step saved; nothing hidden is listed."""
    steps = []
    for p in list_checkpoints(run):
        assert not p.name.startswith(".")
        params, state = load_checkpoint(p)
        step = int(p.name.split("-")[1])
        assert state == {"step": step}
        assert all(torch.equal(params[k], v) for k, v in _params_for(step).items())
        steps.append(step)
    return steps


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork and SIGKILL")
def test_sigkill_during_save_never_leaves_a_listed_partial_checkpoint(tmp_path):
    rng = random.Random(0)
    rounds = [(mode, rng.uniform(0, 0.2)) for mode in ["random", "random_replace"] * 2]
    rounds[1:1] = [("mid_write", 0), ("before_rename", 0)]
    rounds += [("between_renames_replace", 0), ("random", 0.05)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(peftkit.__file__).parents[1]),
                                                       os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(tmp_path), json.dumps(rounds)], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    watchdog = threading.Timer(60, proc.kill)
    watchdog.start()
    try:
        most_done, latest_step = 0, 0
        for mode, _ in rounds:
            report = json.loads(proc.stdout.readline())
            assert report["mode"] == mode
            steps = _check_run(tmp_path)
            hidden = [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]
            # leftovers of earlier (dead) savers are gone: each save cleans them up first
            assert {int(n.rsplit("-", 1)[1]) for n in hidden} <= {report["pid"]}
            if not mode.startswith("random"):
                assert report["killed_at_hook"]
                assert any(n.startswith(".tmp-") for n in hidden)
            if mode == "before_rename":  # complete and checksummed, but not renamed into place: not listed
                assert any((tmp_path / "checkpoints" / n / "manifest.json").is_file() for n in hidden)
            if mode == "between_renames_replace":
                # the replaced checkpoint was renamed aside and its successor never arrived: it is not listed
                # until resolve_resume puts it back
                assert latest_step not in steps and steps and any(n.startswith(".old-") for n in hidden)
                restored = resolve_resume(tmp_path, True)
                assert restored is not None and int(restored.name.split("-")[1]) == latest_step
                steps = _check_run(tmp_path)
            most_done = max([most_done, *report["done"]])
            assert steps and steps[-1] >= most_done  # every save that returned is durable and listed
            assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / f"step-{steps[-1]:08d}"
            latest_step = steps[-1]
            proc.stdin.write("\n")
            proc.stdin.flush()
        assert proc.wait(timeout=30) == 0
    finally:
        watchdog.cancel()
        proc.kill()
