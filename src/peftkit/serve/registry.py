"""Which adapters can be served, and which are loaded where: discovery, name safety, validation, LRU, reload.

Adapters in `adapter_dir` are found by subdirectory name; explicit `adapters={name: path}` entries (the CLI's
--adapter NAME=PATH) are trusted paths. A name is a plain name (letters, digits, '.', '_', '-'; no '..', no
separators, nothing encoded); the directory it resolves to, symlinks followed, must lie inside adapter_dir, or
the adapter does not exist (404) and no file outside is opened.

Loading reads the two files' bytes once, hashes those bytes (the content key) and parses the tensors from
the same bytes, so a slot never holds a mix of old and new weights. Everything is validated before a slot is
touched: LoRA only (not DoRA, not embeddings, not prefix or bottleneck adapters), every key a wrapped layer
with the right shape, rank <= max_rank, safetensors only (a pickle is never opened).

Loaded adapters live in an LRU of max_loaded slots. A Lease pins its slot: a pinned slot is never evicted
and never rewritten. When an adapter's files change (cheap check on acquire: mtime and size), the new
content loads into a NEW slot and the name points there; leases on the old slot keep it until released.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..files import CONFIG_NAME, PICKLE_NAME, WEIGHTS_NAME
from .batched import SlotBank, wrap_linears
from .validate import AdapterError, parse_adapter

log = logging.getLogger("peftkit.serve.adapters")  # load, reload, eviction, refusal (access.py prints it)
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_name(name: object) -> str:
    """The name itself if it is a plain adapter name; AdapterError(400) otherwise."""
    if not isinstance(name, str) or not NAME.fullmatch(name) or ".." in name:
        shown = repr(name)[:80]
        raise AdapterError(400, f"adapter name {shown} is not a plain name: use 1-128 letters, digits, '.', '_' "
                                "and '-', starting with a letter or digit, without '..' or path separators")
    return name


@dataclass
class _Entry:
    """One loaded version of an adapter, in one slot."""

    name: str
    slot: int
    key: str  # sha256 of adapter_config.json and adapter_model.safetensors bytes
    signature: tuple  # (mtime_ns, size) of both files when they were read
    rank: int
    nbytes: int
    loaded_at: float
    load_seconds: float
    leases: int = 0
    current: bool = True  # False once evicted, unloaded or replaced by a reload: freed at the last release

    def info(self) -> dict:
        return {"name": self.name, "rank": self.rank, "slot": self.slot, "bytes": self.nbytes,
                "loaded_at": self.loaded_at, "load_seconds": self.load_seconds, "key": self.key,
                "leases": self.leases}


class Lease:
    """A pinned adapter version: `slot` keeps its weights until release() (also as a context manager)."""

    def __init__(self, registry: AdapterRegistry, entry: _Entry) -> None:
        self.name = entry.name
        self.slot = entry.slot
        self.key = entry.key
        self._registry = registry
        self._entry: _Entry | None = entry

    def release(self) -> None:
        """Unpin the slot; a second call does nothing."""
        entry, self._entry = self._entry, None
        if entry is not None:
            self._registry._release(entry)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"Lease({self.name!r}, slot={self.slot}, released={self._entry is None})"


@dataclass
class _Stats:
    loads: int = 0
    evictions: int = 0
    reloads: int = 0
    load_errors: int = 0
    load_seconds: list[float] = field(default_factory=list)


class AdapterRegistry:
    """Adapters for one base model; wraps the model's linear layers with slot layers at construction."""

    def __init__(self, model: nn.Module, adapter_dir: str | Path | None = None,
                 adapters: dict[str, str | Path] | None = None, max_loaded: int = 64, max_rank: int = 64,
                 dtype: torch.dtype | None = None) -> None:
        if max_loaded < 1 or max_rank < 1:
            raise ValueError(f"max_loaded and max_rank must be at least 1, got {max_loaded} and {max_rank}")
        self.model = model
        self.max_loaded = max_loaded
        self.max_rank = max_rank
        self.root = os.path.realpath(adapter_dir) if adapter_dir is not None else None
        if self.root is not None and not os.path.isdir(self.root):
            raise FileNotFoundError(f"adapter directory {str(adapter_dir)!r} does not exist")
        self.explicit: dict[str, str] = {}
        for name, path in (adapters or {}).items():
            try:
                check_name(name)
            except AdapterError as err:
                raise ValueError(err.message) from None
            if not (Path(path) / CONFIG_NAME).is_file():
                raise FileNotFoundError(f"--adapter {name}={path}: no {CONFIG_NAME} in that directory")
            self.explicit[name] = os.path.realpath(path)
        self.bank: SlotBank = wrap_linears(model, max_loaded, dtype)
        self._lock = threading.Lock()  # bookkeeping: entries, slots, stats (held briefly, never while loading)
        self._load_lock = threading.Lock()  # one load at a time (reading, parsing, writing a slot)
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # current versions, least recently used first
        self._retired: dict[int, _Entry] = {}  # slot -> old version still leased
        self._reserved: set[int] = set()  # slots being written
        self._failed: dict[str, tuple[tuple, AdapterError]] = {}  # name -> (signature, error) of a failed load
        self._stats = _Stats()

    # --- names ------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Every adapter name that can be served now (discovered in adapter_dir, and explicit), sorted."""
        found = set(self.explicit)
        if self.root is not None:
            for child in os.scandir(self.root):
                name = child.name
                folder = self._folder(name) if NAME.fullmatch(name) and ".." not in name else None
                if folder is not None and name not in found and self._servable(name, folder):
                    found.add(name)
        return sorted(found)

    def has(self, name: str) -> bool:
        """Whether `name` is a servable adapter, looking at that one name only (names() scans the directory)."""
        try:
            check_name(name)
        except AdapterError:
            return False
        folder = self._folder(name)
        return folder is not None and self._servable(name, folder)

    def _servable(self, name: str, folder: str) -> bool:
        """False for a folder whose files lead outside adapter_dir (invalid content still shows, and a 422
        on use says why)."""
        try:
            self._files(name, folder)
        except AdapterError as err:
            return err.status != 404
        return True

    def _folder(self, name: str) -> str | None:
        """The real directory of adapter `name`, or None when there is none inside adapter_dir."""
        if name in self.explicit:
            return self.explicit[name]
        if self.root is None:
            return None
        real = os.path.realpath(os.path.join(self.root, name))
        if not self._inside(real) or not os.path.isfile(os.path.join(real, CONFIG_NAME)):
            return None
        return real

    def _inside(self, real: str) -> bool:
        return self.root is not None and real.startswith(self.root + os.sep)

    def _files(self, name: str, folder: str) -> tuple[str, str]:
        """Real paths of the config and weights; for a discovered adapter both must lie inside adapter_dir."""
        config, weights = (os.path.realpath(os.path.join(folder, f)) for f in (CONFIG_NAME, WEIGHTS_NAME))
        if name not in self.explicit and not (self._inside(config) and self._inside(weights)):
            raise AdapterError(404, f"adapter {name!r}: its files lead outside the adapter directory; "
                                    "copy them into it instead of linking")
        if not os.path.isfile(weights):
            if os.path.isfile(os.path.join(folder, PICKLE_NAME)):
                raise AdapterError(422, f"adapter {name!r} has only {PICKLE_NAME} (a pickle, which can run code "
                                        f"when opened); the server loads safetensors only: re-save it with "
                                        f"peftkit.save_adapter or PEFT's save_pretrained(safe_serialization=True)")
            raise AdapterError(422, f"adapter {name!r} has {CONFIG_NAME} but no {WEIGHTS_NAME}")
        return config, weights

    # --- leases -----------------------------------------------------------------------------------
    def acquire(self, name: str) -> Lease:
        """Pin adapter `name` for one request, loading it first (or reloading it when its files changed)."""
        check_name(name)
        folder = self._folder(name)
        if folder is None:
            raise AdapterError(404, f"unknown adapter {name!r}; GET /v1/models lists the adapters served")
        files = self._files(name, folder)
        signature = _signature(files)
        with self._lock:
            entry = self._entries.get(name)
            if entry is not None and entry.signature == signature:
                return self._pin(entry)
        return self._load(name, files, signature)

    def _pin(self, entry: _Entry) -> Lease:
        entry.leases += 1
        self._entries.move_to_end(entry.name)
        return Lease(self, entry)

    def _release(self, entry: _Entry) -> None:
        with self._lock:
            entry.leases -= 1
            if entry.leases == 0 and not entry.current:
                self._retired.pop(entry.slot, None)

    def load(self, name: str) -> dict:
        """Load `name` now (if it is not loaded with its current files) and return its info()."""
        with self.acquire(name) as lease:
            with self._lock:
                entry = self._entries.get(name)
                return entry.info() if entry is not None and entry.slot == lease.slot else {"name": name}

    def unload(self, name: str) -> bool:
        """Drop `name` from the cache (False if it was not loaded); running requests keep their slot."""
        check_name(name)
        with self._lock:
            entry = self._entries.pop(name, None)
            if entry is None:
                return False
            self._retire(entry)
        log.info("adapter %s unloaded (admin request)", name)
        return True

    def _retire(self, entry: _Entry) -> None:
        """Under the lock: `entry` is no longer the current version; its slot frees at its last release."""
        entry.current = False
        if entry.leases > 0:
            self._retired[entry.slot] = entry

    # --- loading ----------------------------------------------------------------------------------
    def _load(self, name: str, files: tuple[str, str], signature: tuple) -> Lease:
        with self._load_lock:
            with self._lock:  # another thread may have loaded it while this one waited
                entry = self._entries.get(name)
                if entry is not None and entry.signature == signature:
                    return self._pin(entry)
                failed = self._failed.get(name)
                if failed is not None and failed[0] == signature:
                    raise AdapterError(failed[1].status, failed[1].message)  # a fresh object per request
            start = time.perf_counter()
            try:
                raw = [_read(path, None if name in self.explicit else self.root) for path in files]
                key = _content_key(*raw)
                with self._lock:
                    entry = self._entries.get(name)
                    if entry is not None and entry.key == key:  # touched, not changed
                        entry.signature = signature
                        return self._pin(entry)
                factors, rank, nbytes = parse_adapter(name, *raw, self.model, self.bank, self.max_rank)
            except Exception as err:  # noqa: BLE001 - the files are at fault: remembered until they change
                if not isinstance(err, AdapterError):  # e.g. a config whose fields have the wrong types
                    err = AdapterError(422, f"adapter {name!r} cannot be used: {type(err).__name__}: {err}; "
                                            f"check {CONFIG_NAME} and {WEIGHTS_NAME}, or save the adapter again")
                with self._lock:
                    self._failed[name] = (signature, err)
                    self._stats.load_errors += 1
                log.warning("adapter %s refused (%d): %s", name, err.status, err.message)
                raise err from None
            with self._lock:
                reloading = name in self._entries  # an older version is loaded: this load replaces it
            try:
                slot = self._reserve_slot(name)  # a 503 here is about the load, not the files: not remembered
            except AdapterError as err:
                log.warning("adapter %s refused (%d): %s", name, err.status, err.message)
                raise
            try:
                self.bank.write(slot, factors)
            finally:
                with self._lock:
                    self._reserved.discard(slot)
            seconds = time.perf_counter() - start
            with self._lock:
                old = self._entries.pop(name, None)
                if old is not None:
                    self._retire(old)
                    self._stats.reloads += 1
                entry = _Entry(name, slot, key, signature, rank, nbytes, time.time(), seconds)
                log.info("adapter %s %s: rank %d, slot %d, %d bytes, %.3f s (key %s)", name,
                         "reloaded, its files changed" if reloading else "loaded", rank, slot, nbytes, seconds,
                         key[:12])
                self._entries[name] = entry
                self._failed.pop(name, None)
                self._stats.loads += 1
                self._stats.load_seconds.append(seconds)
                del self._stats.load_seconds[:-100]
                return self._pin(entry)

    def _reserve_slot(self, name: str) -> int:
        """A free slot, evicting the least recently used unpinned adapter if needed; 503 when all are pinned."""
        with self._lock:
            while True:
                used = {e.slot for e in self._entries.values()} | set(self._retired) | self._reserved
                free = [s for s in range(self.max_loaded) if s not in used]
                if free and len(self._entries) < self.max_loaded + (name in self._entries):
                    self._reserved.add(free[0])
                    return free[0]
                victims = [e for e in self._entries.values() if e.leases == 0]  # least recently used first
                victim = next((e for e in victims if e.name == name), victims[0] if victims else None)
                if victim is None:
                    raise AdapterError(503, f"all {self.max_loaded} adapter slots are in use by running requests; "
                                            "retry shortly, or start the server with a larger --max-loaded")
                del self._entries[victim.name]
                self._retire(victim)
                if victim.name == name:  # its own old version, unpinned: the reload replaces it
                    self._stats.reloads += 1
                else:
                    self._stats.evictions += 1
                    log.info("adapter %s evicted: least recently used, to make room for %s (--max-loaded %d)",
                             victim.name, name, self.max_loaded)

    # --- reporting --------------------------------------------------------------------------------
    def info(self) -> list[dict]:
        """The loaded adapters (current versions), least recently used first."""
        with self._lock:
            return [e.info() for e in self._entries.values()]

    def stats(self) -> dict:
        with self._lock:
            s = self._stats
            return {"loaded": len(self._entries), "loads": s.loads, "evictions": s.evictions, "reloads": s.reloads,
                    "load_errors": s.load_errors, "bytes": sum(e.nbytes for e in self._entries.values()),
                    "slot_bytes": self.bank.nbytes(), "retired": len(self._retired),
                    "last_load_seconds": s.load_seconds[-1] if s.load_seconds else None}


def _signature(files: tuple[str, str]) -> tuple:
    """(mtime_ns, size) of each file: the cheap check whether an adapter may have changed."""
    out = []
    for path in files:
        try:
            st = os.stat(path)
        except OSError:
            return ()
        out.append((st.st_mtime_ns, st.st_size))
    return tuple(out)


def _read(path: str, root: str | None = None) -> bytes:
    """The file's bytes, opened without following a symlink at its last component. With `root`, the file that
    was actually opened must lie inside it: a folder swapped for a symlink between the check and the open (a
    local writer racing the server) is refused instead of read (Linux: the open descriptor's real path)."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except OSError as err:
        raise AdapterError(422, f"{os.path.basename(path)} cannot be read ({err.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        if root is not None:
            try:
                opened = os.readlink(f"/proc/self/fd/{f.fileno()}")
            except OSError:  # no /proc: the realpath checks before the open are what there is
                opened = None
            if opened is not None and not opened.startswith(root + os.sep):
                raise AdapterError(404, f"{os.path.basename(path)} leads outside the adapter directory; copy the "
                                        "adapter into it instead of linking")
        return f.read()


def _content_key(config_bytes: bytes, weight_bytes: bytes) -> str:
    h = hashlib.sha256()
    for part in (config_bytes, weight_bytes):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()
