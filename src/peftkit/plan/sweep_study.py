"""The sweep's Optuna study, kept in <output-dir>/study.db (SQLite) so that an interrupted sweep resumes and
`optuna-dashboard sqlite:///<output-dir>/study.db` shows it.

The grid is a GridSampler over one parameter, "candidate" (the method x rank names; a rankless method is
one candidate, which a product of method and rank could not say); its trials are enqueued in the sweep's
information order, as GridSampler would otherwise visit them in a shuffled order. --search tpe asks a
seeded TPESampler for "method", "r" (ranked methods only) and "lr". A trial's value is its final eval loss
(minimized); its whole record (the row of sweep.json) is its user attribute "record". A pruned trial is
PRUNED; a failed one FAIL. On --resume a trial found RUNNING (its sweep was killed) is marked FAIL and its
candidate runs again, as does one stopped by the budget or by Ctrl-C; finished, pruned and failed trials
are kept. The study's user attributes hold what defines its trials (a resume must agree), the steps per
trial once chosen, and the probes.
"""

from __future__ import annotations

import fcntl
import json
import math
from pathlib import Path

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from ..train import options as opts
from .sweep_space import RANKED_METHODS, Candidate, SweepSettings, candidates
from .sweep_trial import Monitor

STUDY_NAME = "peftkit-sweep"
DB_NAME = "study.db"
LR_SPAN = 10.0  # TPE's default learning rates: the base --lr divided and multiplied by this
STARTUP_TRIALS = 2  # median pruning: trials that finish before any is compared with the others
CHECKS = 4  # with a pruner, validation at each quarter of a trial (from 8 steps; fewer say too little)
RERUN = ("timed_out", "interrupted", "skipped")  # a trial that ended for one of these runs again on --resume


def storage_url(out: Path) -> str:
    """The SQLAlchemy URL of the sweep's study: what optuna-dashboard and optuna.load_study take."""
    return f"sqlite:///{(Path(out) / DB_NAME).resolve()}"


def identity(settings: SweepSettings, base: opts.TrainOptions) -> dict:
    """What defines the sweep's trials; a resumed sweep must agree on every item (budget, limits and pruner
    may change)."""
    return json.loads(json.dumps({"search": settings.search, "methods": list(settings.methods), "ranks": list(settings.ranks),
            "rank_range": list(settings.rank_range) if settings.rank_range else None,
            "lr_range": list(lr_range(settings, base)) if settings.search == "tpe" else None,
            "trials": settings.trials, "steps_requested": settings.steps,
            "train_options": {k: v for k, v in base.to_dict().items() if k != "output_dir"}}))  # as stored


def lr_range(settings: SweepSettings, base: opts.TrainOptions) -> tuple[float, float]:
    return settings.lr_range or (base.lr / LR_SPAN, min(base.lr * LR_SPAN, 1.0))


def checks_every(steps: int, pruner: str) -> int:
    """--eval-every for a trial of `steps` steps: a validation at each quarter when a pruner watches, else 0."""
    return steps // CHECKS if pruner != "none" and steps >= 2 * CHECKS else 0


def make_pruner(kind: str, steps: int) -> optuna.pruners.BasePruner:
    """median: stopped at a check from half-way on when its best eval loss so far is worse than the median of
    the finished trials' at that step, once STARTUP_TRIALS have finished. halving: successive halving with one
    rung at half-way: a trial goes on only if it is in the better half of the trials that reached it (the
    first always does)."""
    if kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=STARTUP_TRIALS, n_warmup_steps=steps // 2)
    if kind == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=max(steps // 2, 1), reduction_factor=2)
    return optuna.pruners.NopPruner()


class SweepStudy:
    """The sweep's side of its Optuna study: starting, watching and ending trials, and what a resume keeps."""

    def __init__(self, study: optuna.Study, settings: SweepSettings, base: opts.TrainOptions, lock) -> None:
        self.study, self.settings, self.base, self._lock = study, settings, base, lock
        self.grid = grid_names(settings)

    @classmethod
    def open(cls, settings: SweepSettings, base: opts.TrainOptions) -> SweepStudy:
        """Create the study in <output_dir>/study.db, or with settings.resume load it and check it is this
        sweep's; trials left RUNNING or WAITING by a killed sweep are marked FAIL."""
        out = Path(settings.output_dir)
        db = out / DB_NAME
        if settings.resume and not db.is_file():
            raise ValueError(f"--resume: {out} holds no {DB_NAME}; start the sweep without --resume")
        if not settings.resume and db.exists():
            raise ValueError(f"{db} already exists; pass --resume to continue that sweep or --overwrite to "
                             "start again")
        out.mkdir(parents=True, exist_ok=True)
        lock = lock_folder(out)
        want = identity(settings, base)
        try:
            if settings.resume:
                study = optuna.load_study(study_name=STUDY_NAME, storage=storage_url(out),
                                          sampler=_sampler(settings, base))
                _check_same_sweep(study.user_attrs.get("sweep"), want, db)
                # seeded, and on a resume not replaying the first run's draws
                study.sampler = _sampler(settings, base, offset=len(study.trials))
            else:
                study = optuna.create_study(study_name=STUDY_NAME, storage=storage_url(out),
                                            sampler=_sampler(settings, base), direction="minimize")
                study.set_user_attr("sweep", want)
        except BaseException:
            lock.close()
            raise
        self = cls(study, settings, base, lock)
        study.pruner = make_pruner(settings.pruner, self.steps or 0)  # set again once the steps are chosen
        self._end_stale_trials()
        return self

    def close(self) -> None:
        self._lock.close()

    def _end_stale_trials(self) -> None:
        for _ in self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            self.study.tell(self.study.ask(), state=TrialState.FAIL)  # ask() takes the oldest waiting trial
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            self.study.tell(t.number, state=TrialState.FAIL)

    # --- what earlier runs of this sweep left ------------------------------------------------------------------
    def kept(self) -> list[dict]:
        """Records of the trials a resumed sweep keeps (the latest per candidate): finished, pruned, or failed
        for a reason that running again would not change."""
        kept: dict[str, dict] = {}
        for t in self.study.get_trials(deepcopy=False):
            rec = t.user_attrs.get("record")
            if rec is not None and t.state.is_finished() and not any(rec.get(k) for k in RERUN):
                kept[rec["name"]] = rec
        return list(kept.values())

    @property
    def steps(self) -> int | None:
        return self.study.user_attrs.get("steps_per_trial")

    def set_steps(self, steps: int) -> None:
        """Fix the steps per trial (every trial of the sweep, resumed or not, trains as many) and the pruner."""
        self.study.set_user_attr("steps_per_trial", steps)
        self.study.pruner = make_pruner(self.settings.pruner, steps)

    @property
    def probes(self) -> list[dict]:
        return self.study.user_attrs.get("probes", [])

    def add_probe(self, rec: dict) -> None:
        self.study.set_user_attr("probes", [p for p in self.probes if p["name"] != rec["name"]] + [rec])

    # --- trials --------------------------------------------------------------------------------------------------
    def start(self, c: Candidate | None) -> tuple[optuna.Trial, Candidate]:
        """A new RUNNING trial: the grid's candidate `c`, or (c None, TPE) the sampler's choice."""
        if c is not None and len(self.grid) > 1:  # a one-point grid: GridSampler itself picks it (see docs)
            self.study.enqueue_trial(self.params(c))
        trial = self.study.ask()
        if self.settings.search == "grid":
            name = trial.suggest_categorical("candidate", self.grid)
            return trial, c if c is not None and c.name == name else next(
                g for g in candidates(self.settings.methods, self.settings.ranks) if g.name == name)
        method = trial.suggest_categorical("method", list(self.settings.methods))
        r = None
        if method in RANKED_METHODS:
            r = (trial.suggest_int("r", *self.settings.rank_range, log=True) if self.settings.rank_range
                 else trial.suggest_categorical("r", list(self.settings.ranks)))
        lr = trial.suggest_float("lr", *lr_range(self.settings, self.base), log=True)
        return trial, Candidate(method, r, lr=lr, tag=f"t{trial.number:02d}")

    def monitor(self, trial: optuna.Trial) -> Monitor:
        """Report a running trial's validation loss to the study and ask the pruner whether to stop it."""

        def check(step: int, val_loss: float) -> bool:
            trial.report(val_loss, step)
            return trial.should_prune()

        return check

    def finish(self, trial: optuna.Trial, rec: dict) -> None:
        """End `trial` with its record: COMPLETE with the eval loss, PRUNED, or FAIL."""
        trial.set_user_attr("record", rec)
        if rec["status"] == "ok":
            loss = rec.get("eval_loss")
            self.study.tell(trial, loss if loss is not None and math.isfinite(loss) else math.inf)
        else:
            self.study.tell(trial, state=TrialState.PRUNED if rec["status"] == "pruned" else TrialState.FAIL)

    def add_finished(self, c: Candidate, rec: dict) -> None:
        """Record a trial that ran outside ask/tell: a probe that is its candidate's trial, or failed."""
        params = self.params(c)
        ok = rec["status"] == "ok"
        value = rec["eval_loss"] if ok and rec.get("eval_loss") is not None else math.inf if ok else None
        self.study.add_trial(optuna.trial.create_trial(
            state=TrialState.COMPLETE if ok else TrialState.FAIL, value=value, params=params,
            distributions={k: self._distribution(k) for k in params}, user_attrs={"record": rec}))

    def params(self, c: Candidate) -> dict:
        if self.settings.search == "grid":
            return {"candidate": c.name}
        return {"method": c.method, **({"r": c.r} if c.r else {}), "lr": c.lr if c.lr is not None else self.base.lr}

    def _distribution(self, name: str):
        s = self.settings
        if name == "candidate":
            return CategoricalDistribution(self.grid)
        if name == "method":
            return CategoricalDistribution(list(s.methods))
        if name == "r":
            return IntDistribution(*s.rank_range, log=True) if s.rank_range else CategoricalDistribution(list(s.ranks))
        return FloatDistribution(*lr_range(s, self.base), log=True)


def grid_names(settings: SweepSettings) -> list[str]:
    """The grid's values of "candidate": every method x rank name, in the order of --methods and rising rank
    (the order they run in is the sweep's information order)."""
    return [c.name for c in candidates(settings.methods, settings.ranks)]


def _sampler(settings: SweepSettings, base: opts.TrainOptions, offset: int = 0):
    if settings.search == "grid":
        return optuna.samplers.GridSampler({"candidate": grid_names(settings)}, seed=base.seed)
    startup = max(3, (settings.trials or 0) // 3)  # random draws before TPE models the results
    return optuna.samplers.TPESampler(seed=base.seed + offset, n_startup_trials=startup)


def _check_same_sweep(stored: dict | None, want: dict, db: Path) -> None:
    if stored is None:
        raise ValueError(f"--resume: {db} is not a peftkit sweep's study (it has no sweep settings)")
    was = {**stored, **stored.get("train_options", {})}
    now = {**want, **want["train_options"]}
    differ = [k for k in now if k != "train_options" and was.get(k) != now[k]]
    if differ:
        says = "; ".join(f"{k}: was {was.get(k)!r}, now {now[k]!r}" for k in differ)
        raise ValueError(f"--resume: {db} was started with other settings ({says}); resume with the same flags "
                         "or start a new sweep in another --output-dir")


def stored_sweep(out: Path) -> dict:
    """What defines the trials of the sweep in `out` (as `identity` wrote it), for --resume."""
    db = Path(out) / DB_NAME
    if not db.is_file():
        raise ValueError(f"--resume: {out} holds no {DB_NAME}; start the sweep without --resume")
    try:
        stored = optuna.load_study(study_name=STUDY_NAME, storage=storage_url(out)).user_attrs.get("sweep")
    except KeyError:
        stored = None
    if stored is None:
        raise ValueError(f"--resume: {db} is not a peftkit sweep's study (no study {STUDY_NAME!r} with its settings)")
    return stored


def lock_folder(out: Path):
    """An exclusive lock on <out>/study.db.lock for this process's life: one sweep at a time per folder."""
    handle = open(out / f"{DB_NAME}.lock", "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise ValueError(f"another peftkit sweep is running in {out} (it holds {DB_NAME}.lock); wait for it to "
                         "end or choose another --output-dir") from None
    return handle
