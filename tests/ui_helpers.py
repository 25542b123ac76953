"""Shared by the console's tests: a folder with real runs (two tiny trainings), a sweep written by the sweep's
own code, a run that is still "training" (its metrics grow while a test watches), and the console served by
uvicorn in a thread on a free loopback port."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from pathlib import Path

from conftest import qa_records, save_tiny_model

RUNS = {"run-a": {"r": 4, "lr": 5e-3}, "run-b": {"r": 8, "lr": 1e-2}}


def train_run(model_dir: str, data: Path, out: Path, **kw) -> dict:
    """A real `peftkit train` run of 6 steps on the tiny Llama (about 2 s)."""
    from peftkit.train import loop
    from peftkit.train import options as opts

    o = opts.build(dict(model=model_dir, data=str(data), output_dir=str(out), max_steps=6, batch_size=4,
                        warmup_steps=1, lora_alpha=8, save_every=0, val_fraction=0.125, progress=False,
                        max_length=64, threads=1, eval_every=3, eval_examples=0, seed=0, **kw))
    return loop.train(o)


def fake_trial(c, o, timeout_s: float, monitor=None) -> dict:
    """The sweep's runner, injected: a trial 'trains' without a process; quality grows with the rank."""
    Path(o.output_dir).mkdir(parents=True, exist_ok=True)
    r = c.r or 3
    return {"status": "ok", "steps": o.max_steps, "eval_loss": 1.0 + 1.0 / r, "final_loss": 1.1 + 1.0 / r,
            "exact_match": None, "step_s": 0.05 * r + (0.2 if c.method == "bottleneck" else 0.0),
            "mean_step_s": 0.05 * r, "peak_memory_mb": 400.0 + 12.5 * r, "memory_kind": "resident set size",
            "trainable_params": 1024 * r, "trainable_share": 0.001 * r, "train_s": 1.0, "wall_s": 2.0,
            "adapter_dir": None}


def write_sweep(out: Path) -> dict:
    """sweep.json (and sweep.png) written by peftkit.plan.sweep.run_sweep with the injected runner."""
    from peftkit.plan import sweep
    from peftkit.train import options as opts

    settings = sweep.SweepSettings(methods=("lora", "bottleneck"), ranks=(2, 4, 8), budget_s=600, output_dir=out,
                                   steps=4, max_memory_mb=490.0)
    ticks = iter(range(0, 10_000, 3))
    return sweep.run_sweep(settings, opts.build({"model": "tiny", "data": "d.jsonl"}), runner=fake_trial,
                           clock=lambda: float(next(ticks)), say=lambda line: None)


def build_folder(root: Path) -> dict:
    """The console's folder: runs/run-a, runs/run-b (finished), runs/live (training: 3 steps so far, no
    summary), sweeps/first/sweep.json, models/tiny/config.json. Returns the paths and the model directory."""
    model_dir = save_tiny_model(root.parent / "tiny-model")
    data = root.parent / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in qa_records(32)))
    for name, kw in RUNS.items():
        train_run(model_dir, data, root / "runs" / name, **kw)
    live = root / "runs" / "live"
    live.mkdir(parents=True)
    shutil.copy(root / "runs" / "run-a" / "run_options.json", live / "run_options.json")
    rows = (root / "runs" / "run-a" / "metrics.jsonl").read_text().splitlines()
    (live / "metrics.jsonl").write_text("\n".join(rows[:4]) + "\n")  # step 0 (val) and steps 1-3
    write_sweep(root / "sweeps" / "first")
    (root / "models" / "tiny").mkdir(parents=True)
    shutil.copy(Path(model_dir) / "config.json", root / "models" / "tiny" / "config.json")
    return {"root": root, "model_dir": model_dir, "live": live, "rest": rows[4:]}


_BUILT: dict[str, dict] = {}


def shared_folder(tmp_path_factory) -> dict:
    """build_folder once per test session (both console test files use it; each leaves it as it found it)."""
    if "folder" not in _BUILT:
        _BUILT["folder"] = build_folder(tmp_path_factory.mktemp("console") / "root")
    return _BUILT["folder"]


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


class Served:
    """An ASGI app served by uvicorn on 127.0.0.1:<free port> in a daemon thread (lifespan on, so a console's
    engine starts and stops with it); `url` is its address."""

    def __init__(self, app) -> None:
        import uvicorn

        self.sock = free_socket()
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> Served:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()
