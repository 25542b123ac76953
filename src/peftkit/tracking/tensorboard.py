"""--report-to tensorboard: event files written with torch's `SummaryWriter`.

Where: <run dir>/tensorboard, or <--tracking-dir>/tensorboard/<run name>, or (a sweep's trial)
$PEFTKIT_TENSORBOARD_DIR/<run name>. Every metrics.jsonl number is a scalar under its own name at its step;
the options are a text table at step 0 and, with the summary's numbers, TensorBoard's HPARAMS view at the end;
the loss curve is an image.

Resume: the writer starts with `purge_step` = the checkpoint's step + 1, so TensorBoard hides what the
interrupted run logged after that checkpoint, as metrics.jsonl drops those rows. A new run purges from step 0,
so a run directory reused with --overwrite shows only the new run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .tracker import RunInfo, require

ENV_DIR = "PEFTKIT_TENSORBOARD_DIR"  # set by `sweep_parent`: one subdirectory per trial under the sweep's
FLUSH_SECONDS = 10


def logdir(info: RunInfo) -> Path:
    """The event file directory of this run."""
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR]) / info.name
    if info.tracking_dir is not None:
        return Path(info.tracking_dir) / "tensorboard" / info.name
    return Path(info.run_dir) / "tensorboard"


def _markdown(values: dict[str, Any]) -> str:
    rows = "\n".join(f"| {k} | {str(v).replace('|', '/')} |" for k, v in values.items())
    return "| name | value |\n|---|---|\n" + rows


def _hparam(value: Any) -> int | float | str | bool:
    """A value the HPARAMS plugin takes (numbers, text, booleans); a list becomes comma-separated text."""
    if isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return "none" if value is None else str(value)


class TensorBoardBackend:
    name = "tensorboard"

    def __init__(self, info: RunInfo) -> None:
        require("tensorboard", self.name)
        from torch.utils.tensorboard import SummaryWriter

        self.info, self.dir = info, logdir(info)
        self.dir.mkdir(parents=True, exist_ok=True)
        purge = info.resume_step + 1 if info.resumed else 0
        self.writer = SummaryWriter(log_dir=str(self.dir), purge_step=purge, flush_secs=FLUSH_SECONDS)
        if not info.resumed:
            self.writer.add_text("options", _markdown(info.params), 0)

    def log(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def flush(self) -> None:
        self.writer.flush()

    def finish(self, step: int, summary: dict[str, Any], files: dict[str, Path]) -> None:
        from torch.utils.tensorboard.summary import hparams

        numbers = {f"summary/{k}": v for k, v in summary.items() if isinstance(v, float)}
        for key, value in numbers.items():
            self.writer.add_scalar(key, value, step)
        self.writer.add_text("summary", _markdown(summary), step)
        # the HPARAMS dashboard: the options beside the summary's numbers, in this run's own event file
        for proto in hparams({k: _hparam(v) for k, v in self.info.params.items()}, numbers):
            self.writer.file_writer.add_summary(proto)
        curve = files.get("loss_curve.png")
        if curve is not None:
            self._image("loss_curve", curve, step)
        self.close("FINISHED")

    def _image(self, tag: str, path: Path, step: int) -> None:
        try:
            import numpy as np
            from PIL import Image
        except ImportError:  # the plot is in the run directory; the numbers are all logged as scalars
            return
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
        self.writer.add_image(tag, pixels, step, dataformats="HWC")

    def close(self, status: str) -> None:
        self.writer.close()

    def state(self) -> dict[str, Any]:
        return {"logdir": str(self.dir)}


def open_backend(info: RunInfo, saved: dict | None) -> TensorBoardBackend:
    """The TensorBoard writer of this run (`saved` is unused: the directory names the run)."""
    return TensorBoardBackend(info)
