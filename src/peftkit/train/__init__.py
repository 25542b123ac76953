"""Training: data formats, the built-in task, the loop, checkpoints and resume, more than one process.

    from peftkit.train import train, build_options
    summary = train(build_options({"data": "my.jsonl", "r": 16, "max_steps": 200, "output_dir": "runs/mine"}))
"""

from .loop import train
from .options import TrainOptions
from .options import build as build_options

__all__ = ["train", "TrainOptions", "build_options"]
