"""Training checkpoints: written atomically every N steps, the last K kept, resumed bit-exactly.

    run_dir/checkpoints/step-00000100/
        params.safetensors     the trainable parameters by name
        trainer_state.pt       optimizer, scheduler, step, RNG ... (whatever the loop puts in; weights_only-loadable)
        adapter/ ...           one folder per `extra_dirs` entry (the loop writes the PEFT-format adapter there)
        manifest.json          written last: step, format, sha256 and size of every other file

A checkpoint is built in a hidden `.tmp-step-<step>-<pid>` folder, every file and folder is fsynced, and
only then is it renamed to its final name, so a process killed at any instant (even by SIGKILL) leaves
either a complete checkpoint or a hidden folder that nothing lists and a later save deletes. Deleting
and replacing go through hidden names too (`.del-...`, `.old-...`): a half-deleted folder is never listed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..files import honour_umask

FORMAT = 1
MANIFEST = "manifest.json"
PARAMS = "params.safetensors"
TRAINER_STATE = "trainer_state.pt"
_FINAL = re.compile(r"step-(\d+)")
_HIDDEN = re.compile(r"\.(tmp|old|del)-step-(\d+)-(\d+)")  # kind, step, pid of the process that made it


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupted or unreadable; the message names the path and what to do."""


class WriteError(OSError):
    """A run's file could not be written (most often: the disk is full); the message names the path.
    `errno` is ENOSPC when the disk is full, and `filename` the path."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


_DISK_FULL = ("no space left on device", "storagefull", "os error 28", "disk quota exceeded")


@contextmanager
def writing(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Turn a failed write inside the block into a WriteError that names `path` and says why: an OSError,
    torch.save's "[enforce fail at inline_container.cc ...] file write failed" RuntimeError, or a
    SafetensorError, none of which names the file, and the first two not the full disk behind them."""
    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as e:
        if isinstance(e, (WriteError, CheckpointError)):
            raise
        chain, cause = [], e
        while cause is not None and len(chain) < 8:
            chain.append(cause)
            cause = cause.__cause__ or cause.__context__
        full = any(getattr(c, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or
                   any(m in str(c).lower() for m in _DISK_FULL) for c in chain)
        why = ("no space left on device: the disk is full; free some space (or pass an --output-dir on another "
               "disk), then rerun" if full else
               f"{type(e).__name__}: {e}; the disk may be full, or the folder not writable")
        error = WriteError(f"could not write {what} {path}: {why}")
        error.errno, error.filename = (errno.ENOSPC if full else getattr(e, "errno", None)), str(path)
        raise error from e


def capture_rng() -> dict:
    """Every RNG a training step may draw from, in types `torch.load(weights_only=True)` accepts."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"name": str(np_name), "keys": np_keys.tolist(), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    """Put back what `capture_rng` took, so the next draws repeat the ones made right after the capture.

    CUDA states that cannot be restored here (no CUDA, fewer devices) are reported by a warning, not an error:
    the run can continue, only its GPU-side random draws will differ from the original run's.
    """
    torch.set_rng_state(state["torch"].cpu())
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    npy = state["numpy"]
    np.random.set_state((npy["name"], np.asarray(npy["keys"], dtype=np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    cuda = state.get("cuda", [])
    n = min(len(cuda), torch.cuda.device_count())  # device_count() is 0 without CUDA
    if n != len(cuda):
        warnings.warn(f"the checkpoint holds the RNG state of {len(cuda)} CUDA device(s) but {n} can take it here; "
                      "GPU random draws (dropout on GPU) of the other devices will not repeat", stacklevel=2)
    for i, s in enumerate(cuda[:n]):
        torch.cuda.set_rng_state(s.cpu(), device=i)


def save_checkpoint(run_dir: str | os.PathLike, step: int, *, params: dict[str, torch.Tensor], trainer_state: dict,
                    extra_dirs: dict[str, Callable[[Path], None]] | None = None, keep_last: int = 3) -> Path:
    """Write `run_dir/checkpoints/step-{step:08d}/` atomically and return its path; then keep the last `keep_last`.

    `extra_dirs[name](folder)` fills a fresh folder `name/` inside the checkpoint (before the manifest, so its
    files are checksummed too). A checkpoint of the same step that already exists is replaced. Pruning keeps
    the newest `keep_last` complete checkpoints by step (all of them if `keep_last <= 0`), and never the one
    just written; it also deletes hidden leftovers of processes that are no longer alive.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    bad = sorted(str(k) for k, v in params.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor))
    if bad:
        raise TypeError(f"params must map names (str) to tensors; offending entries: {bad}")
    extra_dirs = extra_dirs or {}
    reserved = {PARAMS, TRAINER_STATE, MANIFEST}
    bad = sorted(n for n in extra_dirs if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", n) or n in reserved)
    if bad:
        raise ValueError(f"extra_dirs names must be plain folder names other than {sorted(reserved)}; got {bad}")

    root = Path(run_dir) / "checkpoints"
    final = checkpoint_path(run_dir, step)
    # copies: a snapshot the caller may go on training, and safetensors refuses tensors sharing storage
    params = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in params.items()}
    with writing(final, "checkpoint"):
        _write_checkpoint(root, final, step, params, trainer_state, extra_dirs)
    if keep_last > 0:
        for old in [p for p in list_checkpoints(run_dir)[:-keep_last] if p != final]:
            _delete(old)
    return final


def _write_checkpoint(root: Path, final: Path, step: int, params: dict[str, torch.Tensor], trainer_state: dict,
                      extra_dirs: dict[str, Callable[[Path], None]]) -> None:
    """save_checkpoint's writing: the files into a hidden folder, fsynced, the manifest, the rename."""
    root.mkdir(parents=True, exist_ok=True)
    _fsync_dir(root.parent)
    _clean_leftovers(root)
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        save_file(params, str(tmp / PARAMS), metadata={"format": "pt"})
        torch.save(trainer_state, tmp / TRAINER_STATE)
        _check_weights_only(tmp / TRAINER_STATE)
        for name, fill in extra_dirs.items():
            (tmp / name).mkdir()
            fill(tmp / name)
        honour_umask(tmp)  # save_file makes 0600 files whatever the umask
        files = {}
        for f in sorted(p for p in tmp.rglob("*") if not p.is_dir()):
            if f.is_symlink() or not f.is_file():
                raise CheckpointError(f"{f}: only regular files can go into a checkpoint (not links or devices)")
            files[f.relative_to(tmp).as_posix()] = _digest(f, fsync=True)
        with open(tmp / MANIFEST, "w") as fh:
            json.dump({"step": step, "format": FORMAT, "files": files}, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        for d in [*(p for p in tmp.rglob("*") if p.is_dir()), tmp]:
            _fsync_dir(d)
        if final.exists():
            # rename aside, then into place: at every instant a complete checkpoint or none sits under the name
            aside = root / f".old-step-{step:08d}-{os.getpid()}"
            os.rename(final, aside)
            try:
                os.rename(tmp, final)
            except BaseException:
                os.rename(aside, final)
                raise
            _fsync_dir(root)
            shutil.rmtree(aside)
        else:
            os.rename(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def checkpoint_path(run_dir: str | os.PathLike, step: int) -> Path:
    """Where the checkpoint after `step` optimizer steps of the run in `run_dir` is (once written)."""
    return Path(run_dir) / "checkpoints" / f"step-{step:08d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The complete checkpoints of a run (final name and a readable manifest), oldest first by step."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _FINAL.fullmatch(p.name)
        if m and p.is_dir():
            try:
                _read_manifest(p)
            except CheckpointError:
                continue
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the highest step, or None if the run has none."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def verify_checkpoint(path: str | os.PathLike) -> dict:
    """Check every file the manifest lists (present, same size, same sha256) and return the manifest."""
    path = Path(path)
    manifest = _read_manifest(path)
    problems = []
    for rel, want in manifest["files"].items():
        f = path / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            problems.append(f"{rel}: path leaves the checkpoint")
        elif not f.is_file():
            problems.append(f"{rel}: missing")
        elif f.stat().st_size != want.get("bytes"):
            problems.append(f"{rel}: {f.stat().st_size} bytes, manifest says {want.get('bytes')}")
        elif _digest(f)["sha256"] != want.get("sha256"):
            problems.append(f"{rel}: sha256 checksum mismatch (the file is corrupted)")
    if problems:
        raise CheckpointError(f"checkpoint {path} is damaged: {'; '.join(problems)}. Resume from an earlier "
                              f"checkpoint (list_checkpoints) or delete {path}")
    return manifest


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu"
                    ) -> tuple[dict[str, torch.Tensor], dict]:
    """Verify a checkpoint, then return (params, trainer_state); any failure is a CheckpointError."""
    path = Path(path)
    manifest = verify_checkpoint(path)
    missing = [n for n in (PARAMS, TRAINER_STATE) if n not in manifest["files"]]
    if missing:
        raise CheckpointError(f"checkpoint {path} lists no {missing} in its manifest; it was not written by "
                              "save_checkpoint. Resume from another checkpoint")
    try:
        params = load_file(str(path / PARAMS), device=str(map_location))
    except Exception as e:
        raise CheckpointError(f"checkpoint {path}: cannot read {PARAMS} ({type(e).__name__}: {e}). "
                              "Resume from an earlier checkpoint") from e
    try:
        trainer_state = torch.load(path / TRAINER_STATE, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path}: cannot read {TRAINER_STATE} with weights_only=True "
                              f"({type(e).__name__}: {e}). Resume from an earlier checkpoint") from e
    return params, trainer_state


def resolve_resume(run_dir: str | os.PathLike, resume: str | os.PathLike | bool | None) -> Path | None:
    """Which checkpoint to resume from: True or "latest" -> the newest in `run_dir` (None if none),
    False/None -> None, a path -> that checkpoint (CheckpointError if it is not one)."""
    if resume is None or resume is False:
        return None
    if resume is True or resume == "latest":
        root = Path(run_dir) / "checkpoints"
        if root.is_dir():
            _clean_leftovers(root)  # puts back a checkpoint whose replacement was cut short
        return latest_checkpoint(run_dir)
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"resume checkpoint {path} does not exist; pass an existing checkpoint folder "
                              "(run_dir/checkpoints/step-...) or resume='latest'")
    if not (path / MANIFEST).exists() and (path / "checkpoints").is_dir():
        raise CheckpointError(f"{path} is a run directory, not a checkpoint; pass resume='latest' with this "
                              f"run_dir, or one of {[str(p) for p in list_checkpoints(path)]}")
    _read_manifest(path)
    return path


def _read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is missing, so it is incomplete (its save was "
                              "interrupted) or not a checkpoint. Resume from another checkpoint") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is unreadable ({e}). Resume from another "
                              "checkpoint or delete this one") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} has no 'files' table; not a peftkit checkpoint")
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path}: manifest format {manifest.get('format')!r}, this peftkit "
                              f"reads format {FORMAT}; use the peftkit version that wrote it")
    return manifest


def _check_weights_only(f: Path) -> None:
    """Fail at save time, not at resume time, if the trainer state holds objects a safe load refuses."""
    try:
        torch.load(f, weights_only=True, mmap=True)
    except Exception as e:
        why = next((line.strip() for line in str(e).splitlines() if "WeightsUnpickler error" in line), str(e))
        raise CheckpointError(f"{f.parent}: trainer_state cannot be loaded back with torch.load(weights_only=True) "
                              f"({why}); nothing was saved. Keep it to tensors, numbers, strings, lists, tuples "
                              "and dicts (state_dict()s), or register the type with torch.serialization."
                              "add_safe_globals") from e


def _digest(f: Path, fsync: bool = False) -> dict:
    with open(f, "rb") as fh:
        digest = hashlib.file_digest(fh, "sha256").hexdigest()
        if fsync:
            os.fsync(fh.fileno())
    return {"sha256": digest, "bytes": f.stat().st_size}


def _fsync_dir(d: Path) -> None:
    if os.name == "nt":  # Windows cannot open a directory to fsync it; its renames are durable as they are
        return
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def _delete(p: Path) -> None:
    """Remove a checkpoint by first renaming it to a hidden name, so a half-deleted one is never listed."""
    m = _FINAL.fullmatch(p.name)
    hidden = p.with_name(f".del-step-{int(m.group(1)):08d}-{os.getpid()}")
    os.rename(p, hidden)
    _fsync_dir(p.parent)
    shutil.rmtree(hidden)


def _clean_leftovers(root: Path) -> None:
    """Delete hidden folders of dead processes; put back a replaced checkpoint whose successor never arrived."""
    for p in root.iterdir():
        m = _HIDDEN.fullmatch(p.name)
        if not m or not p.is_dir() or int(m.group(3)) == os.getpid() or _pid_alive(int(m.group(3))):
            continue
        final = root / f"step-{int(m.group(2)):08d}"
        if m.group(1) == "old" and not final.exists():
            try:  # another process may be doing the same: then the rename fails and the folder is gone
                verify_checkpoint(p)
                os.rename(p, final)
                _fsync_dir(root)
                continue
            except (CheckpointError, OSError):
                pass
        shutil.rmtree(p, ignore_errors=True)
