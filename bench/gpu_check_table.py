"""The one table of bench/gpu_check.sh: each part's status and time, and the figures from its JSON.

Usage (gpu_check.sh calls it): python bench/gpu_check_table.py LOG_DIR DEVICE
LOG_DIR holds status.tsv (part, exit code, seconds, log file, JSON file per line), the benchmarks' JSON files
and pytest's junit XML. A JSON that is missing or unreadable is shown as such, never guessed.
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

MAX_JSON_BYTES = 16 * 2**20  # our own benchmarks' output; anything larger is not what they write


def _load(path: Path) -> dict | None:
    if not path.is_file() or path.stat().st_size > MAX_JSON_BYTES:
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _num(value: object, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else str(value)


def tests_figures(path: Path) -> list[tuple[str, str, str]]:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return [("junit report", "missing", "")]
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    get = lambda k: int(suite.get(k, 0))  # noqa: E731
    failed = get("failures") + get("errors")
    figures = [("passed / failed / skipped", f"{get('tests') - failed - get('skipped')} / {failed} / {get('skipped')}",
                "0 failed")]
    for case in suite.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            figures.append((f"FAILED {case.get('name')}", "", ""))
    return figures


def train_figures(data: dict) -> list[tuple[str, str, str]]:
    out = []
    for r in data.get("results", []):
        label = f"{r.get('model', '?')} {r.get('batch', '?')}x{r.get('seq', '?')}"
        for key, value in r.items():
            if key.endswith("ratio") and isinstance(value, (int, float)):
                out.append((f"{label} {key} (peftkit / HF)", _num(value), "< 1"))
    return out


def serve_figures(data: dict) -> list[tuple[str, str, str]]:
    out = []
    for r in data.get("rows", []):
        label = f"{r.get('lengths', '?')} K={r.get('adapters', '?')}"
        out += [(f"{label} peftkit / HF mixed", _num(r.get("vs_hf_mixed"), 2), ">= 2"),
                (f"{label} peftkit / HF swap", _num(r.get("vs_hf_swap"), 2), ">= 2"),
                (f"{label} K adapters / 1", _num(r.get("vs_single"), 2), ">= 0.8")]
    cold = sorted(data.get("cold_load_ms") or [])
    if cold:
        out.append(("cold adapter load, median ms", _num(cold[len(cold) // 2], 1), "< 100"))
    return out


def nf4_figures(data: dict) -> list[tuple[str, str, str]]:
    out = []
    for r in data.get("rows", []):
        goal = "" if r.get("target") is None else f"<= {r['target']:g}" + ("" if r.get("met") else "  NOT MET")
        out.append((r.get("row", "?"), _num(r.get("value")), goal))
    if data.get("failed"):
        out.append((data["failed"], "", ""))
    return out


FIGURES = {"train": train_figures, "serve": serve_figures, "nf4": nf4_figures}


def main(log_dir: str, device: str) -> int:
    logs = Path(log_dir)
    lines = [line.split("\t") for line in (logs / "status.tsv").read_text().splitlines() if line.strip()]
    rows: list[tuple[str, str, str, str, str, str]] = []
    worst = 0
    for part, rc, seconds, log, result in lines:
        status = {"0": "ok", "124": "TIMEOUT", "skip": "skipped"}.get(rc, f"FAILED ({rc})")
        worst = worst or (0 if rc in ("0", "skip") else 1)
        if part == "tests":
            figures = tests_figures(Path(result))
        elif rc == "skip":
            figures = [(Path(log).read_text().strip() if Path(log).is_file() else "", "", "")]
        else:
            data = _load(Path(result))
            figures = FIGURES[part](data) if data is not None else [(f"no JSON (see {log})", "", "")]
        figures = figures or [("(no figures)", "", "")]
        for i, (what, value, goal) in enumerate(figures):
            rows.append((part if i == 0 else "", status if i == 0 else "", seconds if i == 0 else "", what, value, goal))
    widths = [max(len(r[i]) for r in rows + [("part", "status", "s", "figure", "value", "goal")]) for i in range(6)]
    head = ("part", "status", "s", "figure", "value", "goal")
    print(f"\n== gpu_check --device {device} ==")
    print(" | ".join(h.ljust(w) for h, w in zip(head, widths)))
    print("-+-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths)))
    return worst


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python bench/gpu_check_table.py LOG_DIR DEVICE")
    raise SystemExit(main(sys.argv[1], sys.argv[2]))
