"""Stopping `peftkit train` cleanly on Ctrl-C, SIGTERM (a job scheduler's preemption, `kill`) or SIGHUP (a closed
terminal).

While the step loop runs, the first such signal only sets a flag: the step under way finishes, a checkpoint of it
is written, the tracking runs end KILLED, and `train` raises `Stopped` (a KeyboardInterrupt), which the command
turns into a line saying how to continue (`--resume latest`) and exit status 128 + the signal's number (130 for
Ctrl-C, 143 for SIGTERM). The same signal a second time stops at once. Outside the loop (loading, scoring, the
finish stages, which write the last checkpoint before they validate) a signal stops at once, also as `Stopped`,
so the tracking runs still end KILLED rather than being left running. With more than one process the ranks agree
after each step (a max over ranks), so all stop after the same step and write one checkpoint together; under
torchrun a rank's first repeat of the signal within REPEAT_S is taken for the launcher's copy of a signal that
reached every process (Slurm's and systemd's stops do that), not for a second request.

Signal handlers belong to the main thread: `StopRequests` installs its handlers only there, and elsewhere (train()
called from a worker thread) changes nothing. Only the `peftkit train` command installs it; `train(o)` from
Python and sweep trials keep Python's own behaviour unless they pass one.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))
REPEAT_S = 5.0  # under torchrun: how soon a repeat may be the launcher's copy of the same signal


class Stopped(KeyboardInterrupt):
    """`train` stopped by a signal. `checkpoint`: the checkpoint that holds the last finished step (None when the
    stop came before any step of this process, or at once, outside the step loop)."""

    def __init__(self, signum: int, step: int | None = None, total: int | None = None,
                 checkpoint: Path | None = None, run_dir: Path | None = None) -> None:
        self.signum, self.step, self.total, self.checkpoint, self.run_dir = signum, step, total, checkpoint, run_dir
        super().__init__(self.describe())

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by a signal: 128 + its number."""
        return 128 + int(self.signum)

    def describe(self) -> str:
        name = signal.Signals(self.signum).name
        if self.checkpoint is None:
            return f"stopped by {name}" + (f" before step {self.step + 1} of {self.total}" if self.step is not None
                                            else "")
        again = f"peftkit train --output-dir {self.run_dir} --resume latest" if self.run_dir else "--resume latest"
        where = f"after step {self.step} of {self.total}; checkpoint" if self.step is not None else "newest checkpoint"
        return f"stopped by {name} {where} {self.checkpoint}; continue with the same options and: {again}"


class StopRequests:
    """A context manager that takes SIGINT, SIGTERM and SIGHUP while it is open (main thread only), except those the
    process was told to ignore (`nohup` ignores SIGHUP, a shell's background job SIGINT): they stay ignored.
    `graceful()` marks the span where a first signal is only recorded (`signum`); anywhere else a signal raises
    `Stopped` at once."""

    def __init__(self, out=None) -> None:
        self.signum: int | None = None
        self._first_at, self._repeated, self._delivered = 0.0, False, False
        self._launched = bool(os.environ.get("TORCHELASTIC_RUN_ID"))  # a rank under torchrun / --nproc
        self._graceful = False
        self._previous: dict[int, Any] = {}
        self._out = out if out is not None else sys.stderr

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()

    @property
    def active(self) -> bool:
        """Whether the handlers are installed (False off the main thread)."""
        return bool(self._previous)

    @contextmanager
    def graceful(self) -> Iterator[StopRequests]:
        """The step loop: inside it a first signal waits for the step to finish. A signal that came after the
        loop's last look (and so was never acted on) stops when the block ends."""
        self._graceful = True
        try:
            yield self
        except BaseException:
            self._graceful = False
            raise
        self._graceful = False
        if self.signum is not None and not self._delivered:
            raise Stopped(self.signum)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self._graceful and self.signum == signum and self._launched and not self._repeated \
                and time.monotonic() - self._first_at < REPEAT_S:
            self._repeated = True  # the launcher passing on the signal this rank already had: not a second one
            return
        if not self._graceful or self.signum == signum:  # outside the loop, or the same signal again: at once
            self._restore()
            self._delivered = True
            print(f"peftkit train: {name}: stopping now", file=self._out, flush=True)
            raise Stopped(signum)
        if self.signum is None:
            self.signum, self._first_at, self._repeated = signum, time.monotonic(), False
            print(f"peftkit train: {name} received: finishing this step, then saving a checkpoint and stopping "
                  f"({name} again stops at once)", file=self._out, flush=True)

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}


def agreed_signal(stop: StopRequests | None, reduce_max) -> int:
    """The signal any rank received (0: none), the same on every rank: `reduce_max(value) -> float` is the max over
    ranks (the value itself with one process)."""
    mine = float(stop.signum or 0) if stop is not None else 0.0
    return int(reduce_max(mine))
