"""The sweep page's API: every sweep under the folder, and one sweep's trials (quality against cost) with its
recommendation.

sweep.json is read defensively (its writer, peftkit.plan.sweep, may gain or rename fields): a trial is shown
with whatever it has of name, method, r, status, eval_loss, exact_match, peak_memory_mb, step_s and rank, and a
field that is missing or not a finite number is null; only the trials list and the recommendation are looked
for, under their current names.
"""

from __future__ import annotations

from fastapi import APIRouter, Query, Request

from .api_runs import finite, folder_of
from .folder import Folder, UiError

router = APIRouter()
TRIAL_NUMBERS = ("eval_loss", "exact_match", "peak_memory_mb", "step_s", "trainable_params", "trainable_share",
                 "steps", "wall_s", "final_loss")
TRIAL_TEXTS = ("name", "method", "status", "error", "reason")
MAX_TRIALS = 10_000


def trial_view(t: dict) -> dict:
    """The fields of one trial the page shows, numbers checked."""
    view = {k: (t.get(k) if isinstance(t.get(k), str) else None) for k in TRIAL_TEXTS}
    view |= {k: finite(t.get(k)) for k in TRIAL_NUMBERS}
    view["r"] = t["r"] if isinstance(t.get("r"), int) and not isinstance(t.get("r"), bool) else None
    view["rank"] = t["rank"] if isinstance(t.get("rank"), int) else None
    view["name"] = view["name"] or (f"trial {t['number']}" if isinstance(t.get("number"), int) else "?")
    view["label"] = f"{view['method']} r={view['r']}" if view["r"] else (view["method"] or view["name"])
    return view


def trial_list(record: dict, key: str) -> list[dict]:
    items = record.get(key)
    if items is None:
        return []
    if not isinstance(items, list):
        raise UiError(422, f"sweep.json: '{key}' is a {type(items).__name__}, not a list of trials")
    return [trial_view(t) for t in items[:MAX_TRIALS] if isinstance(t, dict)]


def recommendation_view(record: dict) -> dict:
    rec = record.get("recommendation")
    rec = rec if isinstance(rec, dict) else {}
    over = rec.get("over_limits")
    return {"name": rec.get("name") if isinstance(rec.get("name"), str) else None,
            "alternative": rec.get("alternative") if isinstance(rec.get("alternative"), str) else None,
            "text": rec.get("text") if isinstance(rec.get("text"), str) else None,
            "over_limits": [x for x in over if isinstance(x, str)] if isinstance(over, list) else []}


def sweep_summary(folder: Folder, where) -> dict:
    """One row of the sweeps list; a sweep.json that cannot be read is named in `problem`."""
    entry = {"path": folder.relative(where), "name": where.name, "problem": None}
    try:
        record = folder.read_json(where / "sweep.json")
        trials = trial_list(record, "trials")
    except UiError as err:
        return entry | {"problem": err.message}
    return entry | {"trials": len(trials), "finished": sum(t["status"] == "ok" for t in trials),
                    "recommended": recommendation_view(record)["name"]}


@router.get("/api/sweeps")
def list_sweeps(request: Request) -> dict:
    folder = folder_of(request)
    _, sweeps = folder.find()
    return {"root": str(folder.root), "sweeps": [sweep_summary(folder, s) for s in sweeps]}


def studies(where, record: dict) -> list[str]:
    """The sweep's Optuna study as storage URLs for optuna-dashboard: sweep.json's "study", else the .db files
    in the sweep's folder."""
    study = record.get("study")
    if isinstance(study, str) and study.startswith("sqlite:///") and len(study) < 4096:
        return [study]
    return [f"sqlite:///{p}" for p in sorted(where.glob("*.db"))[:10] if p.is_file()]


@router.get("/api/sweep")
def get_sweep(request: Request, path: str = Query(..., max_length=1024)) -> dict:
    """One sweep: its trials (ranked as written), the skipped candidates, the limits and the recommendation."""
    folder = folder_of(request)
    where = folder.resolve(path, "sweep")
    if not (where / "sweep.json").is_file():
        raise UiError(404, f"sweep {path!r} holds no sweep.json (peftkit sweep --output-dir writes one)")
    record = folder.read_json(where / "sweep.json")
    settings = record.get("settings") if isinstance(record.get("settings"), dict) else {}
    options = record.get("train_options") if isinstance(record.get("train_options"), dict) else {}
    rank = record.get("rank_suggestion")
    return {"path": folder.relative(where), "name": where.name,
            "model": options.get("model") if isinstance(options.get("model"), str) else None,
            "quality": record.get("quality") if isinstance(record.get("quality"), str) else None,
            "steps_per_trial": record.get("steps_per_trial") if isinstance(record.get("steps_per_trial"), int)
            else None,
            "limits": {"max_memory_mb": finite(settings.get("max_memory_mb")),
                       "max_step_s": finite(settings.get("max_step_s"))},
            "trials": trial_list(record, "trials"), "skipped": trial_list(record, "skipped"),
            "recommendation": recommendation_view(record),
            "rank_suggestion": rank if isinstance(rank, dict) else None,
            "has_plot": (where / "sweep.png").is_file(), "studies": studies(where, record)}
