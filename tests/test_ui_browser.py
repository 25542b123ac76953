"""`peftkit ui` in a real browser: Debian's headless Chromium driven by Selenium (the system browser and driver;
SE_OFFLINE=1, so nothing is downloaded). Each page is opened on a folder of real runs and a real sweep.json,
what it shows is compared with the files (and with `peftkit plan`), a screenshot of each page is saved under
$PEFTKIT_UI_SHOTS (default /tmp/ui_shots), the live curve is watched while metrics.jsonl grows, and the
playground streams from the tiny model and two adapters side by side."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from ui_helpers import Served, shared_folder

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
if not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)):
    pytest.skip(f"needs Debian's chromium and chromedriver at {CHROMIUM} and {DRIVER} (scripts/test.sh installs "
                "them with apt-get install chromium chromium-driver)", allow_module_level=True)
pytest.importorskip("selenium")
pytest.importorskip("fastapi")

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

from peftkit.cli import main  # noqa: E402
from peftkit.ui.api_play import local_playground  # noqa: E402
from peftkit.ui.app import create_app  # noqa: E402
from peftkit.ui.folder import Folder  # noqa: E402

SHOTS = Path(os.environ.get("PEFTKIT_UI_SHOTS", "/tmp/ui_shots"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> dict:
    return shared_folder(tmp_path_factory)


@pytest.fixture(scope="module")
def console(folder):
    play = local_playground(Folder(folder["root"]), folder["model_dir"], {}, max_tokens=32)
    with Served(create_app(folder["root"], play)) as served:
        yield served.url


@pytest.fixture(scope="module")
def browser():
    os.environ["SE_OFFLINE"] = "1"  # selenium-manager must not download a browser or driver
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1100", "--disable-extensions"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(DRIVER))
    SHOTS.mkdir(parents=True, exist_ok=True)
    yield driver
    driver.quit()


def wait(driver, condition, timeout: float = 15.0):
    """Until `condition(driver)` is truthy; an element replaced while it was read (the runs table is redrawn when
    a poll brings news) just means: look again."""
    return WebDriverWait(driver, timeout, poll_frequency=0.1, ignored_exceptions=[StaleElementReferenceException]
                         ).until(lambda d: condition(d))


def shot(driver, name: str) -> Path:
    """A screenshot of the whole page (the window is made as tall as the page for it)."""
    path = SHOTS / f"{name}.png"
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1400, max(900, min(height + 140, 4000)))
    assert driver.save_screenshot(str(path)) and path.stat().st_size > 10_000, path
    driver.set_window_size(1400, 1100)
    return path


def css(driver, selector: str):
    return driver.find_elements(By.CSS_SELECTOR, selector)


def no_page_error(driver) -> None:
    box = driver.find_element(By.ID, "error")
    assert not box.is_displayed(), box.text


def tick(driver, runs: set[str]) -> None:
    """Tick exactly `runs` in the runs table, one click at a time (the table may be redrawn in between)."""
    def settled(d) -> bool:
        for row in css(d, "#runs-table tbody tr"):
            box = row.find_element(By.CSS_SELECTOR, "input[type=checkbox]")
            if box.is_selected() != (row.get_attribute("data-run") in runs):
                box.click()
                return False
        return True

    wait(driver, settled)


def test_runs_page_shows_the_files_and_diffs_two_runs(browser, console, folder):
    browser.get(console + "/#runs")
    wait(browser, lambda d: len(css(d, "#runs-table tbody tr")) == 3)
    rows = {r.get_attribute("data-run"): r for r in css(browser, "#runs-table tbody tr")}
    assert set(rows) == {"runs/run-a", "runs/run-b", "runs/live"}
    for name in ("run-a", "run-b"):
        metrics = [json.loads(x) for x in (folder["root"] / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        last = [m["loss"] for m in metrics if "loss" in m][-1]
        cell = rows[f"runs/{name}"].find_element(By.CSS_SELECTOR, ".last-loss")
        assert float(cell.get_attribute("data-value")) == last and cell.text == f"{last:.4f}"
        options = json.loads((folder["root"] / "runs" / name / "run_options.json").read_text())
        assert rows[f"runs/{name}"].find_element(By.CSS_SELECTOR, ".r").text == str(options["r"])
    # run-a alone ticked: its curve, its summary, its options
    tick(browser, {"runs/run-a"})
    wait(browser, lambda d: [p.get_attribute("data-series") for p in css(d, "#loss-chart path.series")] == [
        "runs/run-a loss", "runs/run-a val"])
    wait(browser, lambda d: css(d, "#options-table tr"))
    options_a = json.loads((folder["root"] / "runs/run-a/run_options.json").read_text())
    shown = {r.get_attribute("data-key"): r.find_element(By.CSS_SELECTOR, ".value").text
             for r in css(browser, "#options-table tr")}
    assert shown["lr"] == str(options_a["lr"]) and shown["model"] == options_a["model"]
    # tick run-b as well: two curves, summaries side by side, the diff of their options
    tick(browser, {"runs/run-a", "runs/run-b"})
    wait(browser, lambda d: css(d, "#diff-table tbody tr"))
    changed = {r.get_attribute("data-key"): [c.text for c in r.find_elements(By.TAG_NAME, "td")]
               for r in css(browser, "#diff-table tbody tr")}
    assert set(changed) == {"r", "lr", "output_dir"} and changed["r"][1:] == ["4", "8"]
    series = {p.get_attribute("data-series") for p in css(browser, "#loss-chart path.series")}
    assert {"runs/run-a loss", "runs/run-b loss", "runs/run-a val", "runs/run-b val"} <= series
    summary_b = json.loads((folder["root"] / "runs/run-b/summary.json").read_text())
    final = next(r for r in css(browser, "#summary-table tbody tr") if r.get_attribute("data-key") == "final_loss")
    cell = final.find_elements(By.TAG_NAME, "td")[2]
    assert json.loads(cell.get_attribute("data-value")) == summary_b["final_loss"]
    assert cell.text == f"{summary_b['final_loss']:.6g}"
    no_page_error(browser)
    shot(browser, "runs")


def test_the_loss_curve_of_a_training_run_grows_as_its_metrics_do(browser, console, folder, request):
    browser.get(console + "/#runs")
    wait(browser, lambda d: len(css(d, "#runs-table tbody tr")) == 3)
    tick(browser, {"runs/live"})
    count = lambda d: [p.get_attribute("data-count") for p in css(d, "#loss-points .points")]  # noqa: E731
    wait(browser, lambda d: count(d) == ["3"])
    assert browser.find_element(By.ID, "loss-status").text.startswith("live")
    metrics = folder["live"] / "metrics.jsonl"
    before = metrics.read_text()
    request.addfinalizer(lambda: metrics.write_text(before))  # the folder is shared with test_ui.py
    with open(metrics, "a") as f:
        f.write(folder["rest"][0] + "\n")  # step 4, as the trainer appends it
    wait(browser, lambda d: count(d) == ["4"], timeout=10)
    point = css(browser, "#loss-points .points")[0]
    assert float(point.get_attribute("data-last")) == json.loads(folder["rest"][0])["loss"]
    path = next(p for p in css(browser, "#loss-chart path.series") if p.get_attribute("data-series") == "runs/live loss")
    assert path.get_attribute("data-count") == "4"
    wait(browser, lambda d: next(r for r in css(d, "#runs-table tbody tr") if r.get_attribute("data-run") == "runs/live"
                                 ).find_element(By.CSS_SELECTOR, ".step").text == "4/6")
    shot(browser, "runs_live")


def test_plan_page_shows_peftkit_plans_numbers(browser, console, capsys):
    browser.get(console + "/#plan")
    wait(browser, lambda d: d.find_element(By.ID, "plan-total").text)
    form = browser.find_element(By.ID, "plan-form")
    Select(form.find_element(By.NAME, "preset")).select_by_value("llama-3-8b")
    Select(form.find_element(By.NAME, "method")).select_by_value("qlora")
    for name, value in (("r", "32"), ("batch_size", "4"), ("seq_len", "2048")):
        field = form.find_element(By.NAME, name)
        field.clear()
        field.send_keys(value)
    form.find_element(By.NAME, "gradient_checkpointing").click()
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    assert main(["plan", "llama-3-8b", "--method", "qlora", "--r", "32", "--batch-size", "4", "--seq-len", "2048",
                 "--gradient-checkpointing", "--json"]) == 0
    want = json.loads(capsys.readouterr().out)
    total = browser.find_element(By.ID, "plan-total")
    wait(browser, lambda d: total.get_attribute("data-gib") == str(want["total_gib"]))
    assert total.text == f"{want['total_gib']:.2f} GiB"
    assert browser.find_element(By.ID, "plan-params").get_attribute("data-trainable") == str(want["trainable_params"])
    gpus = {r.get_attribute("data-gpu"): r.find_element(By.CSS_SELECTOR, ".fit").text
            for r in css(browser, "#gpu-table tbody tr")}
    assert gpus == {g["gpu"]: g["one_gpu"] for g in want["gpus"]}
    assert browser.find_element(By.ID, "plan-rec").text == want["recommendation"]
    bars = [b.get_attribute("data-label") for b in css(browser, "#plan-chart rect.bar")]
    assert bars == [k for k, v in want["parts_gib"].items() if v > 0]
    no_page_error(browser)
    shot(browser, "plan")


def test_sweep_page_charts_the_trials_and_rings_the_recommendation(browser, console, folder):
    record = json.loads((folder["root"] / "sweeps/first/sweep.json").read_text())
    browser.get(console + "/#sweep")
    wait(browser, lambda d: css(d, "#sweep-chart circle.point"))
    rec = browser.find_element(By.ID, "sweep-rec")
    assert rec.get_attribute("data-name") == record["recommendation"]["name"]
    assert rec.text == record["recommendation"]["text"]
    ok = [t for t in record["trials"] if t["status"] == "ok"]
    assert sorted(p.get_attribute("data-name") for p in css(browser, "#sweep-chart circle.point")) == sorted(
        t["name"] for t in ok)
    assert [r.get_attribute("data-name") for r in css(browser, "#sweep-chart circle.recommended")] == [
        record["recommendation"]["name"]]
    assert css(browser, "#sweep-chart line.limit")  # --max-memory, dashed
    rows = css(browser, "#trials-table tbody tr")
    assert [r.get_attribute("data-trial") for r in rows] == [t["name"] for t in record["trials"] + record["skipped"]]
    first = rows[0].find_element(By.CSS_SELECTOR, ".eval-loss").text
    assert first == f"{record['trials'][0]['eval_loss']:.4f}"
    no_page_error(browser)
    shot(browser, "sweep")
    browser.find_element(By.CSS_SELECTOR, "input[name=sweep-x][value=step_s]").click()
    wait(browser, lambda d: "seconds per step" in d.find_element(By.ID, "sweep-chart").text)
    shot(browser, "sweep_step_time")


def test_playground_streams_the_base_and_two_adapters_side_by_side(browser, console):
    import httpx

    browser.get(console + "/#play")
    wait(browser, lambda d: len(css(d, "#play-models input")) == 3)
    names = [i.get_attribute("value") for i in css(browser, "#play-models input")]
    assert names[1:] == ["runs-run-a", "runs-run-b"] and all(i.is_selected() for i in css(browser, "#play-models input"))
    form = browser.find_element(By.ID, "play-form")
    prompt = form.find_element(By.NAME, "prompt")
    prompt.clear()
    prompt.send_keys("Name a fruit.")
    tokens = form.find_element(By.NAME, "max_tokens")
    tokens.clear()
    tokens.send_keys("8")
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait(browser, lambda d: len(css(d, "#play-columns .column")) == 3
         and all(c.get_attribute("data-state") != "streaming" for c in css(d, "#play-columns .column")), timeout=30)
    columns = {c.get_attribute("data-model"): c for c in css(browser, "#play-columns .column")}
    assert list(columns) == names
    for name, column in columns.items():
        assert column.get_attribute("data-state") == "done", column.text
        assert int(column.get_attribute("data-pieces")) >= 2  # it came in pieces: streamed
        direct = httpx.post(console + "/api/play/v1/chat/completions", timeout=30, json={
            "model": name, "messages": [{"role": "user", "content": "Name a fruit."}], "max_tokens": 8,
            "temperature": 0, "stream": False}).json()
        shown = column.find_element(By.CSS_SELECTOR, ".out").get_attribute("textContent")
        assert shown == direct["choices"][0]["message"]["content"]  # greedy: the same answer
    texts = [c.find_element(By.CSS_SELECTOR, ".out").get_attribute("textContent") for c in columns.values()]
    assert len(set(texts)) > 1  # the adapters answer differently from the base
    no_page_error(browser)
    shot(browser, "playground")


def test_a_console_with_a_token_opens_from_its_printed_address_and_hides_the_token(browser, folder):
    token = "browser-test-token-0123456789"
    with Served(create_app(folder["root"], token=token)) as served:
        browser.get(served.url + "/#runs")
        assert "access token" in browser.find_element(By.TAG_NAME, "body").text  # the 401's JSON, no console
        browser.get(f"{served.url}/?token={token}#runs")
        wait(browser, lambda d: len(css(d, "#runs-table tbody tr")) == 3)  # the page's own API calls pass too
        assert "token" not in browser.current_url  # redirected without it
        assert token not in browser.execute_script("return document.cookie")  # HttpOnly: no script reads it
    browser.delete_all_cookies()
