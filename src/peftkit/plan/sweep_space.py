"""What a sweep searches: its settings, its candidates (a method, a rank, and with --search tpe a learning
rate), the command line's values for them, and the order in which the grid's candidates run."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .. import registry
from ..train import options as opts

# methods with a rank get one candidate per rank; the others one candidate each
RANKED_METHODS = tuple(n for n in registry.train_names() if registry.by_train_name(n).ranked)
MAX_TRIALS = 1000  # --trials: far more than any budget holds; bounds what a typo can ask for
MAX_RANK = 4096


@dataclass(frozen=True)
class Candidate:
    """One configuration to try: a method, its rank where the method has one, and (TPE) its own learning rate;
    `tag` keeps TPE trials of the same method and rank apart (their trial number)."""

    method: str
    r: int | None = None
    lr: float | None = None
    tag: str = ""

    @property
    def name(self) -> str:
        name = f"{self.method}-r{self.r}" if self.r else self.method
        name += f"-lr{self.lr:.1e}" if self.lr is not None else ""
        return f"{self.tag}-{name}" if self.tag else name

    @property
    def label(self) -> str:
        text = f"{self.method} r={self.r}" if self.r else self.method
        return text + (f" lr={self.lr:.1e}" if self.lr is not None else "")


@dataclass(frozen=True)
class SweepSettings:
    """What to sweep and the limits that decide it; everything about the trials' training is a TrainOptions.

    search "grid" runs every method x rank candidate; "tpe" lets Optuna's TPE sampler choose `trials`
    candidates from the methods, the ranks (or `rank_range`) and `lr_range`. The pruner stops a trial whose
    validation loss is behind the others part-way; `resume` continues the study in output_dir/study.db."""

    methods: tuple[str, ...]
    ranks: tuple[int, ...]
    budget_s: float
    output_dir: Path
    steps: int | None = None  # per trial, at most
    max_memory_mb: float | None = None
    max_step_s: float | None = None
    suggest_rank: bool = False
    energy: float = 0.9
    search: str = "grid"
    trials: int | None = None  # TPE: how many trials
    rank_range: tuple[int, int] | None = None  # TPE: ranks from this range (log scale) instead of `ranks`
    lr_range: tuple[float, float] | None = None  # TPE: default the base lr / 10 to x 10
    pruner: str = "median"
    resume: bool = False


# --- parsing the command line's values ---------------------------------------------------------------------------
_SECONDS = {"s": 1, "m": 60, "h": 3600}
_MEGABYTES = {"kb": 2**-10, "k": 2**-10, "mb": 1, "m": 1, "mib": 1, "gb": 1024, "g": 1024, "gib": 1024,
              "tb": 2**20, "t": 2**20, "tib": 2**20}


def parse_duration(text: str) -> float:
    """Seconds in '15m', '90s', '1h', '1h30m', '2.5m' or a bare number of seconds."""
    s = str(text).strip().lower().replace(" ", "")
    parts = re.findall(r"(\d+(?:\.\d+)?)([smh])", s)
    if re.fullmatch(r"\d+(?:\.\d+)?", s):
        seconds = float(s)
    elif parts and "".join(n + u for n, u in parts) == s:
        seconds = sum(float(n) * _SECONDS[u] for n, u in parts)
    else:
        raise ValueError(f"--budget {text!r} is not a duration; write it like 15m, 90s, 1h or 1h30m")
    if seconds <= 0:
        raise ValueError(f"--budget {text!r} must be more than zero")
    return seconds


def parse_memory(text: str) -> float:
    """Mebibytes in '2GB', '1500MB', '1.5G', '800M' (binary units, as peak memory is reported in MiB)."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([a-z]*)", str(text).strip().lower())
    if not m or m.group(2) not in _MEGABYTES or float(m.group(1)) <= 0:
        raise ValueError(f"--max-memory {text!r} is not a memory size; write it like 2GB, 1500MB or 1.5G")
    return float(m.group(1)) * _MEGABYTES[m.group(2)]


def parse_methods(text: str) -> tuple[str, ...]:
    """The --methods list: known training methods, each once, in the order given."""
    names = [s.strip().lower() for s in str(text).split(",") if s.strip()]
    unknown = [n for n in names if n not in opts.METHODS]
    if unknown or not names:
        raise ValueError(f"--methods: unknown method(s) {', '.join(unknown) or '(none given)'}; "
                         f"known methods: {', '.join(opts.METHODS)}")
    return tuple(dict.fromkeys(names))


def parse_ranks(text: str) -> tuple[int, ...]:
    """The --ranks list, sorted, each once."""
    items = [s.strip() for s in str(text).split(",") if s.strip()]
    bad = [s for s in items if not s.isdigit() or not 1 <= int(s) <= MAX_RANK]
    if bad or not items:
        raise ValueError(f"--ranks: {', '.join(bad) or '(none given)'} not a whole number from 1 to {MAX_RANK}; "
                         "write the ranks like 4,8,16 (or, with --search tpe, a range like 4-64)")
    return tuple(sorted({int(s) for s in items}))


def parse_rank_range(text: str) -> tuple[int, int] | None:
    """'4-64' as (4, 64): TPE draws ranks from it on a log scale; None when `text` is a list of ranks."""
    m = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", str(text))
    if not m:
        return None
    lo, hi = int(m.group(1)), int(m.group(2))
    if not 1 <= lo < hi <= MAX_RANK:
        raise ValueError(f"--ranks {text!r}: a range needs 1 <= low < high <= {MAX_RANK}, like 4-64")
    return lo, hi


def parse_lr_range(text: str) -> tuple[float, float]:
    """'1e-5,1e-3' as (1e-5, 1e-3): TPE draws learning rates from it on a log scale."""
    try:
        lo, hi = (float(x) for x in str(text).split(","))
    except ValueError:
        raise ValueError(f"--lr-range {text!r} is not two numbers; write it like 1e-5,1e-3") from None
    if not 0 < lo < hi <= 1:
        raise ValueError(f"--lr-range {text!r}: needs 0 < low < high <= 1, like 1e-5,1e-3")
    return lo, hi


# --- which trials, in which order ----------------------------------------------------------------------------------
def candidates(methods: tuple[str, ...], ranks: tuple[int, ...]) -> list[Candidate]:
    """The grid: one candidate per rank for each ranked method, one for each other method."""
    return [Candidate(m, r) for m in methods for r in (ranks if m in RANKED_METHODS else (None,))]


def _spread(xs: list) -> list:
    """Middle first, then the ends, then the middles of the gaps: every prefix covers the range evenly."""
    if len(xs) <= 2:
        return list(xs)
    mid = len(xs) // 2
    order, gaps = [mid, 0, len(xs) - 1], [(0, mid), (mid, len(xs) - 1)]
    while gaps:
        wider = [(lo, hi) for lo, hi in gaps if hi - lo > 1]
        order += [(lo + hi) // 2 for lo, hi in wider]
        gaps = [g for lo, hi in wider for g in ((lo, (lo + hi) // 2), ((lo + hi) // 2, hi))]
    return [xs[i] for i in order]


def information_order(cands: list[Candidate], suggest_rank: bool = False) -> list[Candidate]:
    """The order that learns most early: the cheapest candidate first (it measures time per step), then
    round-robin over methods with each method's ranks spread out, so a cut-short sweep still covers the
    methods and the range of ranks. With suggest_rank the highest-rank LoRA trial comes second."""
    by_method: dict[str, list[Candidate]] = {}
    for c in cands:
        by_method.setdefault(c.method, []).append(c)
    queues = [_spread(sorted(cs, key=lambda c: c.r or 0)) for cs in by_method.values()]
    order = [q[i] for i in range(max(map(len, queues), default=0)) for q in queues if i < len(q)]
    ranked = [c for c in order if c.method in RANKED_METHODS]
    first = min(ranked, key=lambda c: (c.method != "lora", c.r)) if ranked else order[0] if order else None
    front = [first] if first else []
    if suggest_rank and ranked:
        top = max(ranked, key=lambda c: (c.r, c.method == "lora"))
        front += [top] if top != first else []
    return front + [c for c in order if c not in front]
