"""`peftkit ui`'s API on a folder of real files: runs (options, metrics polled from an offset, diff), sweeps, the
planner (equal to `peftkit plan --json`), the playground in process and relayed to a running `peftkit serve`,
and the console's limits (paths outside the folder, Host header, body size, loopback flags)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from ui_helpers import Served, shared_folder

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from peftkit.cli import main  # noqa: E402
from peftkit.ui.api_play import local_playground  # noqa: E402
from peftkit.ui.app import create_app  # noqa: E402
from peftkit.ui.folder import Folder  # noqa: E402

LOCAL = "http://127.0.0.1"


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> dict:
    return shared_folder(tmp_path_factory)


@pytest.fixture(scope="module")
def client(folder):
    with TestClient(create_app(folder["root"]), base_url=LOCAL) as c:
        yield c


def rows_of(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_runs_list_shows_each_run_with_its_options_and_latest_losses(client, folder):
    runs = {r["path"]: r for r in client.get("/api/runs").json()["runs"]}
    assert set(runs) == {"runs/run-a", "runs/run-b", "runs/live"}  # the sweep's trials are not runs
    for name in ("run-a", "run-b"):
        run = runs[f"runs/{name}"]
        options = json.loads((folder["root"] / "runs" / name / "run_options.json").read_text())
        rows = rows_of(folder["root"] / "runs" / name / "metrics.jsonl")
        assert run["status"] == "finished" and (run["r"], run["lr"]) == (options["r"], options["lr"])
        assert run["last_loss"] == [r["loss"] for r in rows if "loss" in r][-1]
        assert run["val_loss"] == [r["val_loss"] for r in rows if "val_loss" in r][-1]
    assert runs["runs/live"]["status"] == "running" and runs["runs/live"]["step"] == 3

    detail = client.get("/api/run", params={"path": "runs/run-b"}).json()
    assert detail["options"] == json.loads((folder["root"] / "runs/run-b/run_options.json").read_text())
    assert detail["summary"] == json.loads((folder["root"] / "runs/run-b/summary.json").read_text())
    assert detail["has_adapter"] and "final_loss" in detail["summary_keys"]
    assert client.get("/api/run", params={"path": "runs/live"}).json()["summary"] is None


def test_metrics_are_polled_from_an_offset_and_a_half_written_line_waits(client, folder, request):
    live = folder["live"]
    before = (live / "metrics.jsonl").read_text()
    request.addfinalizer(lambda: (live / "metrics.jsonl").write_text(before))  # 3 steps again for the other tests
    first = client.get("/api/run/metrics", params={"path": "runs/live", "offset": 0}).json()
    assert first["rows"] == rows_of(live / "metrics.jsonl")
    assert first["offset"] == (live / "metrics.jsonl").stat().st_size and not first["more"]
    nxt, rest = folder["rest"][0], folder["rest"][1]
    with open(live / "metrics.jsonl", "a") as f:
        f.write(nxt + "\n" + rest[: len(rest) // 2])  # one whole row and half of the next
    second = client.get("/api/run/metrics", params={"path": "runs/live", "offset": first["offset"]}).json()
    assert second["rows"] == [json.loads(nxt)]
    with open(live / "metrics.jsonl", "a") as f:
        f.write(rest[len(rest) // 2:] + "\n")
    third = client.get("/api/run/metrics", params={"path": "runs/live", "offset": second["offset"]}).json()
    assert third["rows"] == [json.loads(rest)] and third["offset"] == (live / "metrics.jsonl").stat().st_size


def test_diff_names_the_options_that_changed(client, folder):
    d = client.get("/api/runs/diff", params={"a": "runs/run-a", "b": "runs/run-b"}).json()
    assert {c["key"] for c in d["changed"]} == {"r", "lr", "output_dir"}
    r = next(c for c in d["changed"] if c["key"] == "r")
    assert (r["a"], r["b"]) == (4, 8) and d["only_a"] == d["only_b"] == {} and d["same"] > 10


def test_paths_outside_the_folder_are_refused(client, folder, tmp_path):
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "run_options.json").write_text("{}")
    os.symlink(outside, folder["root"] / "escape")
    try:
        for path, status in (("../secret", 400), ("/etc", 400), ("runs/../../x", 400), ("runs\\run-a", 400),
                             ("escape", 404), ("runs/nothing", 404), ("a\x00b", 400), ("x" * 2000, 400)):
            res = client.get("/api/run", params={"path": path})
            assert res.status_code == status, (path, res.text)
            assert res.json()["error"]["message"]
        assert client.get("/api/sweep", params={"path": "escape"}).status_code == 404
        assert client.post("/api/plan", json={"model": "../tiny-model"}).status_code == 400
        assert "escape" not in {r["path"] for r in client.get("/api/runs").json()["runs"]}
    finally:
        (folder["root"] / "escape").unlink()


def test_sweep_shows_the_trials_and_the_recommendation_of_sweep_json(client, folder):
    record = json.loads((folder["root"] / "sweeps/first/sweep.json").read_text())
    listed = client.get("/api/sweeps").json()["sweeps"]
    assert [s["path"] for s in listed] == ["sweeps/first"] and listed[0]["recommended"] == "lora-r4"
    d = client.get("/api/sweep", params={"path": "sweeps/first"}).json()
    assert d["recommendation"]["name"] == record["recommendation"]["name"] == "lora-r4"
    assert d["recommendation"]["text"] == record["recommendation"]["text"]
    assert d["recommendation"]["over_limits"] == ["lora-r8"] and d["limits"]["max_memory_mb"] == 490.0
    assert [(t["name"], t["eval_loss"], t["peak_memory_mb"]) for t in d["trials"]] == [
        (t["name"], t["eval_loss"], t["peak_memory_mb"]) for t in record["trials"]]


def test_sweep_json_of_another_shape_is_read_defensively(client, folder):
    odd = folder["root"] / "sweeps" / "odd"
    odd.mkdir()
    try:
        (odd / "sweep.json").write_text(json.dumps({"trials": [{"number": 0, "eval_loss": "NaN?", "r": True},
                                                               "junk", {"name": "x", "eval_loss": 1.5}]}))
        d = client.get("/api/sweep", params={"path": "sweeps/odd"}).json()
        assert [t["name"] for t in d["trials"]] == ["trial 0", "x"] and d["trials"][0]["eval_loss"] is None
        assert d["trials"][0]["r"] is None and d["recommendation"]["name"] is None
        (odd / "sweep.json").write_text("[1, 2]")
        assert client.get("/api/sweep", params={"path": "sweeps/odd"}).status_code == 422
        assert "not an object" in {s["path"]: s for s in client.get("/api/sweeps").json()["sweeps"]}[
            "sweeps/odd"]["problem"]
    finally:
        (odd / "sweep.json").unlink()
        odd.rmdir()


def plan_json(capsys, *argv) -> dict:
    assert main(["plan", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_plan_equals_peftkit_plan(client, folder, capsys):
    body = {"model": "llama-2-7b", "method": "qlora", "r": 8, "batch_size": 2, "seq_len": 1024,
            "gradient_checkpointing": True}
    got = client.post("/api/plan", json=body).json()
    want = plan_json(capsys, "llama-2-7b", "--method", "qlora", "--r", "8", "--batch-size", "2", "--seq-len",
                     "1024", "--gradient-checkpointing")
    for key in ("total_gib", "parts_gib", "trainable_params", "gpus", "recommendation", "fixes"):
        assert got[key] == want[key], key
    assert sum(got["parts_bytes"].values()) == pytest.approx(got["total_bytes"])
    config = client.post("/api/plan", json={"model": "models/tiny", "r": 4}).json()
    assert config == client.post("/api/plan", json={"model": "models/tiny/config.json", "r": 4}).json()
    assert config["total_gib"] == plan_json(capsys, str(folder["root"] / "models/tiny"), "--r", "4")["total_gib"]
    bad = client.post("/api/plan", json={"model": "llama-2-7b", "method": "magic"})
    assert bad.status_code == 422 and "magic" in bad.json()["error"]["message"]
    assert client.post("/api/plan", json={"model": "llama-2-7b", "r": 0}).status_code == 400
    assert client.post("/api/plan", json={"model": "llama-2-7b", "extra": 1}).status_code == 400
    assert client.post("/api/plan", json={"model": "nope"}).status_code == 404


def test_host_header_body_size_and_static_page(client, folder):
    assert client.get("/api/runs", headers={"Host": "evil.example:7860"}).status_code == 400
    big = client.post("/api/plan", content=b"{" + b" " * (300 << 10) + b"}",
                      headers={"Content-Type": "application/json"})
    assert big.status_code == 413
    page = client.get("/")
    assert page.status_code == 200 and 'id="page-runs"' in page.text
    static = Path(__import__("peftkit.ui.app", fromlist=["STATIC"]).STATIC)
    for f in static.iterdir():  # everything ships in the package: no CDN, no external script or font
        text = f.read_text()
        assert "https://" not in text and "http://" not in text.replace("http://www.w3.org/2000/svg", ""), f.name
        assert client.get(f"/static/{f.name}").status_code == 200
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert 'peftkit = ["ui/static/*"]' in pyproject


def sse_texts(body: str) -> list[str]:
    """The text pieces of a chat completion stream."""
    out = []
    for line in body.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            out += [c["delta"].get("content") or "" for c in chunk["choices"] if "delta" in c]
    return out


CHAT = {"messages": [{"role": "user", "content": "Name a fruit."}], "max_tokens": 6, "stream": True}


def test_playground_in_process_offers_the_runs_adapters_and_streams(folder):
    play = local_playground(Folder(folder["root"]), folder["model_dir"], {}, max_tokens=16)
    with TestClient(create_app(folder["root"], play), base_url=LOCAL) as c:
        info = c.get("/api/playground").json()
        assert info["mode"] == "local" and info["adapters"] == ["runs-run-a", "runs-run-b"]
        ids = [m["id"] for m in c.get("/api/play/v1/models").json()["data"]]
        assert ids == [info["base"], "runs-run-a", "runs-run-b"]
        answers = {}
        for model in ids:
            res = c.post("/api/play/v1/chat/completions", json=CHAT | {"model": model})
            assert res.status_code == 200 and res.headers["content-type"].startswith("text/event-stream")
            answers[model] = "".join(sse_texts(res.text))
        assert len(set(answers.values())) > 1, answers  # the adapters change the answer
        over = c.post("/api/play/v1/chat/completions", json=CHAT | {"model": ids[0], "max_tokens": 17})
        assert over.status_code == 400 and "max_tokens" in over.text


def test_playground_relays_to_a_running_serve(folder):
    from peftkit.serve.app import create_app as serve_app

    play = local_playground(Folder(folder["root"]), folder["model_dir"], {}, max_tokens=64)
    server = serve_app(play.engine, play.engine.registry, play.app.state.service.tok.tokenizer,
                       model_name="tiny", log_level=None)
    play.engine.start()
    try:
        with Served(server) as serve:
            from peftkit.ui.api_play import Playground

            proxy = Playground(mode="proxy", url=serve.url, max_tokens=8)
            with TestClient(create_app(folder["root"], proxy), base_url=LOCAL) as c:
                ids = [m["id"] for m in c.get("/api/play/v1/models").json()["data"]]
                assert ids == ["tiny", "runs-run-a", "runs-run-b"]
                res = c.post("/api/play/v1/chat/completions", json=CHAT | {"model": "runs-run-b"})
                assert res.status_code == 200 and len(sse_texts(res.text)) >= 2
                plain = c.post("/api/play/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 3})
                assert plain.status_code == 200 and "data: [DONE]" in plain.text
                assert c.post("/api/play/v1/chat/completions", json=CHAT | {"model": "tiny", "max_tokens": 9}
                              ).status_code == 400  # the console's own limit, before the server
                assert c.post("/api/play/v1/completions", json=CHAT | {"model": "tiny"}).status_code == 400
                assert c.post("/api/play/v1/chat/completions", json=CHAT | {"model": "tiny", "n": 50}
                              ).status_code == 400  # only the fields the page sends are forwarded
                unknown = c.post("/api/play/v1/chat/completions", json=CHAT | {"model": "nobody"})
                assert unknown.status_code == 404  # the server's own answer, relayed
        gone = Playground(mode="proxy", url=serve.url, max_tokens=8)
        with TestClient(create_app(folder["root"], gone), base_url=LOCAL) as c:
            res = c.get("/api/play/v1/models")
            assert res.status_code == 502 and "peftkit serve" in res.json()["error"]["message"]
    finally:
        play.engine.close()


@pytest.mark.parametrize("argv, message", [
    (["--host", "0.0.0.0"], "--allow-remote"),
    (["--serve-url", "http://example.com:8000"], "loopback"),
    (["--serve-url", "ftp://127.0.0.1:8000"], "http"),
    (["--serve-url", "http://127.0.0.1:8000", "--model", "x"], "one of them"),
    (["--adapter", "a=b"], "--model"),
    (["--max-tokens", "0"], "--max-tokens"),
])
def test_cli_refuses_unsafe_or_contradictory_flags(argv, message, folder, capsys):
    assert main(["ui", str(folder["root"]), "--port", "0", *argv]) == 2
    assert message in capsys.readouterr().err


def test_cli_refuses_a_missing_folder(tmp_path, capsys):
    assert main(["ui", str(tmp_path / "missing"), "--port", "0"]) == 2
    assert "is not a directory" in capsys.readouterr().err


@pytest.mark.slow  # a fresh Python process importing torch: 3-8 s
def test_the_command_serves_the_console_on_loopback(folder):
    """`peftkit ui FOLDER --port 0` in its own process: it prints its address and answers there."""
    import re
    import subprocess
    import sys

    import httpx

    proc = subprocess.Popen([sys.executable, "-m", "peftkit.cli", "ui", str(folder["root"]), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()
        url = re.search(r"at (http://127\.0\.0\.1:\d+)/", line)
        assert url, line
        runs = httpx.get(url.group(1) + "/api/runs", timeout=10).json()["runs"]
        assert {r["path"] for r in runs} == {"runs/run-a", "runs/run-b", "runs/live"}
        assert 'id="page-plan"' in httpx.get(url.group(1) + "/", timeout=10).text
    finally:
        proc.terminate()
        proc.wait(timeout=10)
