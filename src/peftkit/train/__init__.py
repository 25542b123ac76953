"""Training: data formats, the built-in task, the loop, checkpoints and resume, more than one process."""
