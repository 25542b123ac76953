"""What a sweep's trials say: their ranking, the recommendation, a rank from the update's spectrum, and the
outputs (the table, sweep.json, the quality-versus-cost plot sweep.png).

A trial is a plain dict (JSON as written): name, method, r (None for rankless methods), status ("ok",
"failed"), and for a finished trial eval_loss, exact_match (built-in task only), step_s (median seconds per
step), peak_memory_mb, trainable_params, trainable_share.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

TOLERANCE = 0.02  # "within 2%": a cheaper alternative worth naming
CHEAPER = 0.95  # ... if it takes at most 95% of the memory or of the time per step


# --- ranking and choosing ------------------------------------------------------------------------------------------
def quality_key(t: dict) -> tuple[float, float]:
    """Sort key, best first: exact match (higher is better) where measured, then eval loss (lower is better)."""
    em = t.get("exact_match")
    loss = t.get("eval_loss")
    return (-(em if em is not None else -1.0), loss if loss is not None else math.inf)


def rank_trials(trials: list[dict]) -> list[dict]:
    """Finished trials best first, with their 1-based "rank", then the failed ones (rank None)."""
    ok = sorted((t for t in trials if t["status"] == "ok"), key=quality_key)
    return [{**t, "rank": i + 1} for i, t in enumerate(ok)] + [{**t, "rank": None} for t in trials
                                                                 if t["status"] != "ok"]


def within_limits(t: dict, max_memory_mb: float | None, max_step_s: float | None) -> bool:
    return ((max_memory_mb is None or t["peak_memory_mb"] <= max_memory_mb)
            and (max_step_s is None or t["step_s"] <= max_step_s))


def recommend(ranked: list[dict], max_memory_mb: float | None = None, max_step_s: float | None = None) -> dict:
    """The best-ranked trial within the limits; the cheapest trial of nearly its quality (eval loss at most
    2% higher, exact match at most 2 points lower; least memory + time per step, relative to the best);
    the better-ranked trials that a limit excluded."""
    ok = [t for t in ranked if t["status"] == "ok"]
    fits = [t for t in ok if within_limits(t, max_memory_mb, max_step_s)]
    if not fits:
        return {"name": None, "alternative": None, "over_limits": [t["name"] for t in ok]}
    best = fits[0]

    def close(t: dict) -> bool:
        loss_ok = (t["eval_loss"] is None or best["eval_loss"] is None
                   or t["eval_loss"] <= best["eval_loss"] * (1 + TOLERANCE))
        em_ok = t.get("exact_match") is None or t["exact_match"] >= (best.get("exact_match") or 0) - TOLERANCE
        return loss_ok and em_ok

    cheaper = [t for t in fits[1:] if close(t) and (t["peak_memory_mb"] < CHEAPER * best["peak_memory_mb"]
                                                    or t["step_s"] < CHEAPER * best["step_s"])]
    alternative = min(cheaper, key=lambda t: (t["peak_memory_mb"] / best["peak_memory_mb"]
                                              + t["step_s"] / best["step_s"]), default=None)
    over = [t["name"] for t in ok if t not in fits and quality_key(t) < quality_key(best)]
    return {"name": best["name"], "method": best["method"], "r": best["r"],
            "alternative": alternative["name"] if alternative else None, "over_limits": over}


# --- a rank from the spectrum of a trained update ------------------------------------------------------------------
def energy_rank(singular_values, energy: float = 0.9) -> int | None:
    """The fewest directions whose squared singular values hold `energy` of the total (None for a zero update)."""
    import torch

    s2 = torch.as_tensor(singular_values, dtype=torch.float64).flatten() ** 2
    s2 = s2.sort(descending=True).values
    if s2.sum() <= 0:
        return None
    share = s2.cumsum(0) / s2.sum()
    return int((share < energy - 1e-12).sum()) + 1


def lora_spectra(adapter_dir: str | Path) -> dict:
    """Per adapted module, the singular values of its update scaling * B @ A, computed from the r x r core
    (B = Qb Rb, A^T = Qa Ra, so B A = Qb (Rb Ra^T) Qa^T) rather than the full out x in matrix."""
    import torch

    from ..checkpoint import read_adapter

    config, tensors = read_adapter(adapter_dir)
    out = {}
    for key, a in tensors.items():
        b_key = key.removesuffix("lora_A.weight") + "lora_B.weight"
        if not key.endswith(".lora_A.weight") or b_key not in tensors:
            continue
        module = key.removesuffix(".lora_A.weight")
        _, rb = torch.linalg.qr(tensors[b_key].double())  # (out, r) -> R (r, r)
        _, ra = torch.linalg.qr(a.double().flatten(1).T)  # (in, r) -> R (r, r)
        out[module] = config.scaling_for(module) * torch.linalg.svdvals(rb @ ra.T)
    return out


def allocated_ranks(ranked: list[dict]) -> dict | None:
    """The per-module ranks that a rank-allocating method (AdaLoRA) left in the best such finished trial's file:
    per module, their median, smallest, largest and sum; None when no finished trial allocated ranks."""
    from ..checkpoint import read_adapter
    from ..registry import allocated_ranks as ranks_of

    for t in ranked:  # best first
        if t["status"] != "ok" or not t.get("adapter_dir"):
            continue
        per_module = ranks_of(read_adapter(t["adapter_dir"])[0])
        if per_module:
            values = list(per_module.values())
            return {"from": t["name"], "steps": t.get("steps"), "modules": len(values),
                    "median_rank": math.ceil(statistics.median(values)), "min_rank": min(values),
                    "max_rank": max(values), "total_rank": sum(values), "per_module": per_module}
    return None


def suggest_rank(ranked: list[dict], swept_ranks: tuple[int, ...], energy: float = 0.9) -> dict:
    """From the highest-rank LoRA-family trial: per module, the fewest directions holding `energy` of the
    update's spectral energy; their median over modules, and the smallest swept rank that holds it. Where a
    trial of a rank-allocating method finished (AdaLoRA), its final per-module ranks too ("allocated")."""
    allocated = allocated_ranks(ranked)
    found = _spectral_suggestion(ranked, swept_ranks, energy)
    return {**found, "allocated": allocated} if allocated else found


def _spectral_suggestion(ranked: list[dict], swept_ranks: tuple[int, ...], energy: float) -> dict:
    runs = [t for t in ranked if t["status"] == "ok" and t.get("r") and t.get("adapter_dir")]
    if not runs:
        return {"from": None, "note": "no LoRA-family trial finished, so there is no update to measure"}
    # the highest-rank trial whose file holds A/B factors (other ranked methods, LoHa, LoKr, VeRA, have none)
    found = ((t, lora_spectra(t["adapter_dir"])) for t in sorted(runs, key=lambda t: -t["r"]))
    top, spectra = next(((t, s) for t, s in found if s), (None, {}))
    if top is None:
        return {"from": None, "note": "no finished trial holds low-rank A/B factors (lora, qlora, dora), so there "
                "is no update to measure"}
    per_module = {m: energy_rank(s, energy) for m, s in spectra.items()}
    ranks = [k for k in per_module.values() if k is not None]
    if not ranks:
        return {"from": top["name"], "note": "the trained update is zero; train longer or with a higher --lr"}
    median = math.ceil(statistics.median(ranks))
    swept = [r for r in sorted(swept_ranks) if r >= median]
    return {"from": top["name"], "r_trained": top["r"], "steps": top["steps"], "energy": energy,
            "median_rank": median, "modules": len(ranks), "smallest_swept_rank": swept[0] if swept else None,
            "per_module": per_module}


# --- words and tables ----------------------------------------------------------------------------------------------
def label(t: dict) -> str:
    text = f"{t['method']} r={t['r']}" if t.get("r") else t["method"]
    return text + (f" lr={t['lr']:.1e}" if t.get("lr") is not None else "")  # a TPE trial's own learning rate


def memory(mb: float) -> str:
    return f"{mb / 1024:.1f} GB" if mb >= 1024 else f"{mb:.0f} MB"


def trial_line(t: dict) -> str:
    """One progress line for a trial that just ended."""
    if t["status"] == "pruned":
        return f"{label(t)}: pruned {t['reason']}, after {t.get('wall_s', 0):.0f} s"
    if t["status"] != "ok":
        return f"{label(t)}: FAILED after {t.get('wall_s', 0):.0f} s: {t.get('error')}"
    em = f", exact match {100 * t['exact_match']:.0f}%" if t.get("exact_match") is not None else ""
    loss = f"{t['eval_loss']:.4f}" if t["eval_loss"] is not None else "n/a (no validation examples)"
    return (f"{label(t)}: eval loss {loss}{em}, {t['step_s']:.2f} s/step, {memory(t['peak_memory_mb'])} peak, "
            f"{t['wall_s']:.0f} s in all")


def format_table(record: dict) -> str:
    """The ranked table: finished trials best first, then failed, then skipped ones."""
    with_em = any(t.get("exact_match") is not None for t in record["trials"])
    head = ["rank", "candidate", "trainable", "eval loss"] + (["exact match"] if with_em else []) + [
        "s/step", "peak MB", "status"]
    rows = []
    for t in record["trials"] + record["skipped"]:
        if t["status"] == "ok":
            cells = [str(t["rank"]), label(t), f"{t['trainable_params']:,} ({100 * t['trainable_share']:.2f}%)",
                     f"{t['eval_loss']:.4f}" if t["eval_loss"] is not None else "-"]
            cells += [f"{100 * t['exact_match']:.0f}%" if t.get("exact_match") is not None else "-"] if with_em else []
            cells += [f"{t['step_s']:.2f}", f"{t['peak_memory_mb']:.0f}", "ok"]
        else:
            why = (f"failed: {t.get('error')}" if t["status"] == "failed" else f"pruned ({t['reason']})"
                   if t["status"] == "pruned" else f"skipped ({t['reason']})")
            cells = ["-", label(t)] + ["-"] * (len(head) - 3) + [why[:100]]
        rows.append(cells)
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head) - 1)]
    return "\n".join("  ".join(c.ljust(w) if i in (1, 2) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     + "  " + r[-1] for r in [head] + rows)


def recommendation_text(record: dict) -> str:
    """The recommendation in words, honest about its limits and about a cheaper near-equal."""
    rec, s = record["recommendation"], record["settings"]
    by_name = {t["name"]: t for t in record["trials"]}
    limits = [f"--max-memory {memory(s['max_memory_mb'])}" if s["max_memory_mb"] else "",
              f"--max-step-time {s['max_step_s']:g} s" if s["max_step_s"] else ""]
    limits = " and ".join(x for x in limits if x)
    ok = [t for t in record["trials"] if t["status"] == "ok"]
    if rec["name"] is None:
        if not ok:
            return "No recommendation: no trial finished (see the errors above and each trial's trial.log)."
        least, fastest = min(ok, key=lambda t: t["peak_memory_mb"]), min(ok, key=lambda t: t["step_s"])
        return (f"No recommendation: no finished trial is within {limits}; the least memory was "
                f"{memory(least['peak_memory_mb'])} ({label(least)}), the fastest {fastest['step_s']:.2f} s/step "
                f"({label(fastest)}).")
    best = by_name[rec["name"]]
    ems = {t.get("exact_match") for t in ok}
    if best["eval_loss"] is None:
        quality = "the best"
    elif best.get("exact_match") is None:
        quality = f"best eval loss {best['eval_loss']:.4f}"
    elif len(ems) == 1:  # exact match does not separate the trials: eval loss decides
        quality = f"best eval loss {best['eval_loss']:.4f} (exact match {100 * best['exact_match']:.0f}% for all)"
    else:
        quality = f"best exact match {100 * best['exact_match']:.0f}% (eval loss {best['eval_loss']:.4f})"
    where = (f"within {limits}" if limits else f"of {len(ok)} finished trial(s)")
    text = (f"Recommended: {label(best)}: {quality} {where} ({memory(best['peak_memory_mb'])} peak, "
            f"{best['step_s']:.2f} s/step, {record['steps_per_trial']} steps per trial)")
    if rec["alternative"]:
        alt = by_name[rec["alternative"]]
        shares = [(alt["peak_memory_mb"] / best["peak_memory_mb"], "of the memory"),
                  (alt["step_s"] / best["step_s"], "of the time per step")]
        text += (f"; {label(alt)} is within {100 * TOLERANCE:.0f}% of it at "
                 + " and ".join(f"{100 * x:.0f}% {what}" for x, what in shares if x < CHEAPER))
    if rec["over_limits"]:
        text += f". Ranked higher but over the limits: {', '.join(label(by_name[n]) for n in rec['over_limits'])}"
    return text + "."


def rank_suggestion_text(sug: dict | None) -> str | None:
    if sug is None:
        return None
    alloc = sug.get("allocated")
    allocated = ("" if not alloc else
                 f" {alloc['from']} allocated ranks {alloc['min_rank']}-{alloc['max_rank']} (median "
                 f"{alloc['median_rank']}, {alloc['total_rank']} in all over {alloc['modules']} modules) after "
                 f"{alloc['steps']} steps; sweep.json lists them per module.")
    if "median_rank" not in sug:
        return f"Rank suggestion: none; {sug['note']}.{allocated}"
    swept = (f"; the smallest swept rank that holds it is r={sug['smallest_swept_rank']}"
             if sug["smallest_swept_rank"] else "")
    return (f"Rank suggestion: {100 * sug['energy']:.0f}% of the trained update's spectral energy lies in its top "
            f"{sug['median_rank']} directions (median over {sug['modules']} modules of {sug['from']} after "
            f"{sug['steps']} steps){swept}. A short run's update is often more concentrated than a long one's."
            + allocated)


def next_command(record: dict) -> str | None:
    """The `peftkit train` command for the recommended configuration, with the options the sweep changed."""
    from ..train import options as opts

    rec, o = record["recommendation"], record["train_options"]
    o = {**o, "lr": rec.get("lr") or o["lr"]}  # a TPE trial's own learning rate
    if rec["name"] is None:
        return None
    default = opts.build({"data": o["data"]}).to_dict()
    parts = ["peftkit train", f"--method {rec['method']}"] + ([f"--r {rec['r']}"] if rec["r"] else [])
    for k in ("model", "data", "val_data", "target_modules", "batch_size", "max_length", "lr", "seed", "dtype",
              "device", "threads"):
        if (o.get(k) != default.get(k) or k == "data" and o[k]) and (k != "target_modules" or rec["r"]):
            parts.append(f"--{k.replace('_', '-')} {o[k]}")
    return " ".join(parts)


# --- files ---------------------------------------------------------------------------------------------------------
def plot(record: dict, path: Path) -> Path:
    """Eval loss against peak memory and against step time, one labelled point per finished trial, the
    recommendation ringed in red and the limits dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, rec = record["settings"], record["recommendation"]
    ok = [t for t in record["trials"] if t["status"] == "ok" and t["eval_loss"] is not None]
    colours = {m: f"C{i}" for i, m in enumerate(dict.fromkeys(t["method"] for t in ok))}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    panels = ((axes[0], "peak_memory_mb", "peak memory (MB)", s["max_memory_mb"]),
              (axes[1], "step_s", "seconds per step", s["max_step_s"]))
    for ax, key, xlabel, limit in panels:
        for i, t in enumerate(ok):
            ax.scatter(t[key], t["eval_loss"], color=colours[t["method"]], s=40, zorder=3)
            em = f" ({100 * t['exact_match']:.0f}%)" if t.get("exact_match") is not None else ""
            ax.annotate(label(t) + em, (t[key], t["eval_loss"]), textcoords="offset points", fontsize=8,
                        xytext=(6, 4) if i % 2 == 0 else (6, -11))  # alternate, so near points stay readable
            if t["name"] == rec["name"]:
                ax.scatter(t[key], t["eval_loss"], s=260, facecolors="none", edgecolors="red", linewidths=2,
                           zorder=4, label="recommended")
        if limit:
            ax.axvline(limit, color="grey", linestyle="--", label="limit")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    axes[0].set_ylabel("eval loss (lower is better)")
    if not ok:
        axes[0].text(0.5, 0.5, "no finished trial", transform=axes[0].transAxes, ha="center")
    fig.suptitle(f"{record['train_options']['model']}: quality vs cost, {record['steps_per_trial'] or 'no'} steps "
                 "per trial")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(record: dict, out: Path) -> dict:
    """Write sweep.png and sweep.json into `out`; the record with their paths under "files"."""
    out.mkdir(parents=True, exist_ok=True)
    record["files"] = {"json": str(out / "sweep.json"), "plot": str(plot(record, out / "sweep.png")),
                       "trials": str(out / "trials")}
    (out / "sweep.json").write_text(json.dumps(record, indent=2))
    return record
