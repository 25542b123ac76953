"""Resuming refuses every option that changes the math (declared once, on the option's field), names it,
and accepts the options that do not (logging, checkpoints, threads)."""

from __future__ import annotations

from pathlib import Path

import pytest

from peftkit.train import loop
from peftkit.train import options as opts


def run_opts(model: str, data: str, out: Path, **kw) -> opts.TrainOptions:
    base = dict(model=model, data=data, output_dir=str(out), max_steps=2, batch_size=4, lr=5e-3, warmup_steps=1,
                r=4, lora_alpha=8, save_every=1, keep_checkpoints=2, val_fraction=0.125, progress=False,
                max_length=64, threads=1)
    base.update(kw)
    return opts.build(base)


def test_same_run_options_are_declared_on_the_fields():
    assert {"max_grad_norm", "dtype", "lr", "r", "seed", "batch_size", "data", "model"} <= set(opts.SAME_RUN)
    assert not {"threads", "progress", "eval_every", "save_every", "keep_checkpoints", "output_dir", "resume",
                "overwrite", "device", "nproc"} & set(opts.SAME_RUN)
    assert all(opts.FIELDS[name].metadata["same_run"] for name in opts.SAME_RUN)


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, qa_jsonl, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("same-run") / "run"
    loop.train(run_opts(tiny_model_dir, qa_jsonl, out))
    return out


@pytest.mark.parametrize("change, shown", [({"max_grad_norm": 0.5}, "max_grad_norm: 1.0 -> 0.5"),
                                           ({"max_grad_norm": 0.0}, "max_grad_norm: 1.0 -> 0.0"),
                                           ({"dtype": "bfloat16"}, "dtype: 'float32' -> 'bfloat16'")])
def test_resume_with_another_clipping_norm_or_dtype_is_refused_naming_it(finished_run, tiny_model_dir, qa_jsonl,
                                                                          change, shown):
    with pytest.raises(ValueError, match="differ") as err:
        loop.train(run_opts(tiny_model_dir, qa_jsonl, finished_run, resume="latest", **change))
    assert shown in str(err.value)
    assert str(err.value).count("->") == 1  # only the option that changed is named


def test_resume_accepts_options_that_do_not_change_the_math(finished_run, tiny_model_dir, qa_jsonl):
    summary = loop.train(run_opts(tiny_model_dir, qa_jsonl, finished_run, resume="latest", eval_every=1,
                                  keep_checkpoints=3, threads=2))
    assert summary["steps"] == 2
