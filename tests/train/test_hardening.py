"""Issue 17 ("Hardening"), the training side, through `peftkit train`: JSON lines that hold U+2028/U+2029/U+0085,
a metrics log cut short by a kill, a run killed before its first checkpoint, a full disk, and data errors
that arrive before the model loads. (Linear-time labels for long chats: test_labels.py.)"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch

import peftkit.files
import peftkit.models
from peftkit.cli import main
from peftkit.train import checkpoints, recipe
from peftkit.train.data import read_records


def train(model: str, data: str, out: Path, *extra: str) -> int:
    return main(["train", "--model", model, "--data", data, "--output-dir", str(out), "--batch-size", "4",
                 "--max-length", "64", "--no-progress", "--threads", "1", *extra])


def metric_steps(out: Path) -> list[int]:
    return [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().split("\n")[:-1]) if "loss" in r]


# --- item 4: JSON lines split at "\n" only ---------------------------------------------------------------------------
def test_jsonl_with_unicode_line_separators_inside_strings_trains(tiny_model_dir, tmp_path):
    records = [{"instruction": f"Say hi {n}\u2028(twice)\u2029 please\x85", "output": f"hi\u2028there {n}"}
               for n in range(8)]
    data = tmp_path / "seps.jsonl"
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    assert all(len(line.splitlines()) > 1 for line in lines)  # what str.splitlines() would have cut apart
    data.write_bytes(("\r\n".join(lines[:4]) + "\n" + "\n".join(lines[4:]) + "\n").encode())  # "\r\n" too
    assert read_records(data) == records
    out = tmp_path / "run"
    assert train(tiny_model_dir, str(data), out, "--max-steps", "1", "--save-every", "0") == 0
    assert json.loads((out / "summary.json").read_text())["data"] == "8 records: 8 kept"


# --- item 5: metrics.jsonl on resume ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished(tiny_model_dir, qa_jsonl, tmp_path_factory) -> Path:
    """A 4-step run with checkpoints after steps 2 and 4."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert train(tiny_model_dir, qa_jsonl, out, "--max-steps", "4", "--save-every", "2") == 0
    return out


def resume_from_step_2(model: str, data: str, out: Path) -> int:
    return train(model, data, out, "--max-steps", "4", "--save-every", "2", "--resume",
                 str(out / "checkpoints" / "step-00000002"))


def test_resume_drops_a_metrics_line_cut_short_by_a_kill_with_a_warning(finished, tiny_model_dir, qa_jsonl,
                                                                        tmp_path):
    out = shutil.copytree(finished, tmp_path / "run")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 0.12')  # the process died in the middle of this write
    inode = os.stat(out / "metrics.jsonl").st_ino
    with pytest.warns(UserWarning, match=r"metrics\.jsonl: dropped its last line, which was cut short"):
        assert resume_from_step_2(tiny_model_dir, qa_jsonl, out) == 0
    assert metric_steps(out) == [1, 2, 3, 4]  # steps 3 and 4 again, once each; the torn line gone
    assert os.stat(out / "metrics.jsonl").st_ino != inode  # rewritten into a new file, renamed into place
    assert not [p for p in os.listdir(out) if p.startswith(".")]  # no temporary file left behind


def test_a_damaged_metrics_line_is_refused_naming_file_and_line(finished, tiny_model_dir, qa_jsonl, tmp_path,
                                                                 capsys, monkeypatch):
    out = shutil.copytree(finished, tmp_path / "run")
    lines = (out / "metrics.jsonl").read_text().split("\n")
    (out / "metrics.jsonl").write_text("\n".join([lines[0], '{"step": 2, "lo', *lines[1:]]))
    monkeypatch.setattr(peftkit.models, "load_model", refuse_to_load)  # refused before the model loads
    assert resume_from_step_2(tiny_model_dir, qa_jsonl, out) == 2
    err = capsys.readouterr().err
    assert f"{out / 'metrics.jsonl'} line 2 is not valid JSON" in err and "--overwrite" in err


def test_the_resume_rewrite_of_metrics_is_atomic(finished, tiny_model_dir, qa_jsonl, tmp_path, capsys, monkeypatch):
    out = shutil.copytree(finished, tmp_path / "run")
    before = (out / "metrics.jsonl").read_bytes()
    real_replace = os.replace

    def replace(src, dst, *args, **kw):
        if Path(dst).name == "metrics.jsonl":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst, *args, **kw)

    monkeypatch.setattr(os, "replace", replace)
    assert resume_from_step_2(tiny_model_dir, qa_jsonl, out) == 2
    err = capsys.readouterr().err
    assert f"could not write the metrics log {out / 'metrics.jsonl'}: no space left on device" in err
    assert (out / "metrics.jsonl").read_bytes() == before  # the old file, whole
    assert not [p for p in os.listdir(out) if p.startswith(".")]


# --- item 9: a run killed before its first checkpoint ------------------------------------------------------------
def test_a_run_killed_before_its_first_checkpoint_says_to_pass_overwrite(tiny_model_dir, qa_jsonl, tmp_path, capsys,
                                                                         monkeypatch):
    out = tmp_path / "run"

    def killed(run, step):
        raise KeyboardInterrupt("killed before the first checkpoint was written")

    monkeypatch.setattr(recipe, "save_checkpoint", killed)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_model_dir, qa_jsonl, out, "--max-steps", "3", "--save-every", "2")
    monkeypatch.undo()
    assert (out / "run_options.json").is_file() and metric_steps(out) == [1, 2]
    capsys.readouterr()

    assert train(tiny_model_dir, qa_jsonl, out, "--max-steps", "3", "--save-every", "2") == 2
    err = capsys.readouterr().err
    assert "stopped before writing its first checkpoint" in err and "pass --overwrite to start it over" in err
    assert train(tiny_model_dir, qa_jsonl, out, "--max-steps", "3", "--save-every", "2", "--resume", "latest") == 2
    err = capsys.readouterr().err
    assert "holds no complete checkpoint" in err and "rerun with --overwrite instead of --resume" in err
    assert train(tiny_model_dir, qa_jsonl, out, "--max-steps", "3", "--save-every", "2", "--overwrite") == 0
    assert metric_steps(out) == [1, 2, 3]


# --- item 9: a full disk ---------------------------------------------------------------------------------------------
def no_space(*args, **kw):
    raise OSError(errno.ENOSPC, "No space left on device")


def enforce_fail(*args, **kw):  # what torch.save raises when the disk fills up under it
    raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 1088 vs 960")


@pytest.mark.parametrize("target, writer, says", [
    (checkpoints, "save_file", "no space left on device: the disk is full"),
    (torch, "save", "RuntimeError: [enforce fail at inline_container.cc:603] . unexpected pos 1088 vs 960; the "
                    "disk may be full"),
])
def test_a_full_disk_while_checkpointing_names_the_checkpoint(tiny_model_dir, qa_jsonl, tmp_path, capsys, monkeypatch,
                                                              target, writer, says):
    monkeypatch.setattr(target, writer, no_space if writer == "save_file" else enforce_fail)
    out = tmp_path / "run"
    assert train(tiny_model_dir, qa_jsonl, out, "--max-steps", "2", "--save-every", "1") == 2
    err = capsys.readouterr().err
    assert f"could not write checkpoint {out / 'checkpoints' / 'step-00000001'}: {says}" in err
    assert not list((out / "checkpoints").iterdir())  # the half-written folder is gone


def test_a_full_disk_while_saving_the_adapter_or_the_summary_names_the_file(tiny_model_dir, qa_jsonl, tmp_path,
                                                                            capsys, monkeypatch):
    real_save = peftkit.files.save_file

    def save_file(tensors, filename, *args, **kw):  # checkpoints fit; the final adapter does not
        if "checkpoints" in Path(filename).parts:
            return real_save(tensors, filename, *args, **kw)
        no_space()

    monkeypatch.setattr(peftkit.files, "save_file", save_file)
    out = tmp_path / "run"
    assert train(tiny_model_dir, qa_jsonl, out, "--max-steps", "1", "--save-every", "0") == 2
    assert f"could not write the adapter {out / 'adapter'}: no space left on device" in capsys.readouterr().err

    monkeypatch.undo()
    real_replace = os.replace

    def replace(src, dst, *args, **kw):
        if Path(dst).name == "summary.json":
            no_space()
        return real_replace(src, dst, *args, **kw)

    monkeypatch.setattr(os, "replace", replace)
    out = tmp_path / "run2"
    assert train(tiny_model_dir, qa_jsonl, out, "--max-steps", "1", "--save-every", "0") == 2
    assert f"could not write the run's record {out / 'summary.json'}: no space left" in capsys.readouterr().err


# --- item 9: data (and other) errors before the model loads ---------------------------------------------------
def refuse_to_load(*args, **kw):
    raise AssertionError("the model was loaded before the data was checked")


@pytest.mark.parametrize("case, says", [
    ("missing", "no such file"),
    ("bad line", "line 2: not valid JSON"),
    ("unknown format", "record 2: unknown record format"),
    ("missing val", "no such file"),
    ("no answer", "record 1: the chat has no assistant message"),
    ("batch split", "--batch-size 4 must divide by processes x --grad-accum (1 x 3)"),
    ("no model", "is neither the embedded default"),
])
def test_data_and_option_errors_come_before_the_model_loads(tiny_model_dir, qa_jsonl, tmp_path, capsys, monkeypatch,
                                                           case, says):
    monkeypatch.setattr(peftkit.models, "load_model", refuse_to_load)
    data, extra, model = tmp_path / "data.jsonl", [], tiny_model_dir
    good = '{"instruction": "a", "output": "b"}\n'
    data.write_text({"bad line": good + '{"instruction": "a", "output": \n' + good,
                     "unknown format": good + '{"text": "x"}\n',
                     "no answer": '{"messages": [{"role": "user", "content": "hi"}]}\n'}.get(case, good * 8))
    if case == "missing":
        data = tmp_path / "missing.jsonl"
    elif case == "missing val":
        extra = ["--val-data", str(tmp_path / "missing.jsonl")]
    elif case == "batch split":
        extra = ["--grad-accum", "3"]
    elif case == "no model":
        model = str(tmp_path / "no-such-model")
    started = time.perf_counter()
    assert train(model, str(data), tmp_path / "run", "--max-steps", "1", *extra) == 2
    assert time.perf_counter() - started < 2.0
    assert says in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_eval_reads_its_data_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import peftkit.train.infer

    monkeypatch.setattr(peftkit.train.infer, "load_for_inference", refuse_to_load)
    assert main(["eval", "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "no such file" in capsys.readouterr().err
