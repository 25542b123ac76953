"""peftkit inside other training frameworks.

`peftkit.integrations.transformers`: transformers' `Trainer` and TRL's `SFTTrainer` train a peftkit-injected
model unchanged; `use_peftkit(trainer)` keeps adapter-only checkpoints in HF PEFT's format, resumes from them
and can swap in peftkit's lean answer-only loss (`pip install peftkit[trl]` for TRL). Imported on demand, so
that `import peftkit` never loads transformers' Trainer.
"""
