"""Training: data formats, the built-in task, the recipe and its loop, checkpoints and resume, more than
one process.

    from peftkit.train import train, build_options
    summary = train(build_options({"data": "my.jsonl", "r": 16, "max_steps": 200, "output_dir": "runs/mine"}))

`train` changes no process-wide setting; `configure_process(options, init_distributed(options.device))`
makes the ones `peftkit train` makes (--threads, and on a CPU the allocator setting of allocator.py).
"""

from .distributed import init_distributed
from .loop import train
from .options import TrainOptions
from .options import build as build_options
from .process import configure_process

__all__ = ["train", "TrainOptions", "build_options", "configure_process", "init_distributed"]
