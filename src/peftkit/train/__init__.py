"""Training: data formats, the built-in task, the recipe and its loop, checkpoints and resume, more than
one process.

    from peftkit.train import train, build_options
    summary = train(build_options({"data": "my.jsonl", "r": 16, "max_steps": 200, "output_dir": "runs/mine"}))

`token_loss(model, input_ids, attention_mask, labels)` is the trainer's loss for a loop of your own: the
summed answer-token cross-entropy and the token count, without ever building the full logits.

`train` changes no process-wide setting; `configure_process(options, init_distributed(options.device))`
makes the ones `peftkit train` makes (--threads, and on a CPU the allocator setting of allocator.py).
"""

from .distributed import init_distributed
from .loop import train
from .loss import token_loss
from .options import TrainOptions
from .options import build as build_options
from .process import configure_process

__all__ = ["train", "TrainOptions", "build_options", "configure_process", "init_distributed", "token_loss"]
