"""The local cache of decoded data: named sets of numpy arrays, built once and read back.

Layout: `cache_dir()/arrays/<name>.npz` holds the arrays (numpy's zip format, no pickles;
strings as numpy unicode arrays) and `<name>.json` beside it is the sidecar that makes the
entry valid: the version the caller asked for, the sha256 of the .npz bytes, every array's
name, shape and dtype, and when it was built.

Writes are atomic: each file is written to a temporary file in the same folder, fsynced and
moved into place with `os.replace`; the old sidecar is removed before the new .npz goes in and
the new sidecar is written last, so an interrupted build leaves either nothing or an entry that
fails its checks. A read that finds a missing or unreadable sidecar, another version, a
checksum mismatch or an unreadable .npz logs a warning naming the file and rebuilds; a broken
entry is never used. Builds of one name are serialised, within a process by a lock and across
processes (the ranks of a torchrun launch on a fresh cache) by `flock` on `<name>.lock`: one
process builds while the others wait and then read its entry. Where that file cannot be locked
(a read-only cache, no fcntl) processes build on their own; each writes a complete entry and the
last one wins.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

log = logging.getLogger(__name__)

ENV_VAR = "GENERALIST_CACHE"
ARRAYS_DIR = "arrays"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,199}")
_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


class CacheCorrupt(Exception):
    """An entry failed a check; the message says which and why."""


def cache_dir() -> Path:
    """The cache root: $GENERALIST_CACHE if set, else ~/.cache/generalist (not created here)."""
    root = os.environ.get(ENV_VAR)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "generalist"


def entry_paths(name: str) -> tuple[Path, Path]:
    """(payload .npz, sidecar .json) of the entry `name`."""
    if not _NAME.fullmatch(name) or name.endswith((".npz", ".json", ".tmp")):
        raise ValueError(f"cache entry name {name!r} must be 1-200 characters of letters, digits, '_', '.', '-' "
                         "starting with a letter or digit")
    folder = cache_dir() / ARRAYS_DIR
    return folder / f"{name}.npz", folder / f"{name}.json"


def cached_arrays(name: str, version: str, build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The arrays stored under `name` at `version`; calls `build()` and stores its result when
    the entry is absent, of another version or corrupt. `build` returns a dict of numpy arrays
    (no object dtype: strings go in as numpy unicode arrays)."""
    payload, sidecar = entry_paths(name)
    with _lock(name), _process_lock(payload.with_suffix(".lock")):
        if payload.exists() or sidecar.exists():
            try:
                return _read(payload, sidecar, version)
            except CacheCorrupt as why:
                log.warning("cache entry %s is unusable (%s); rebuilding it", payload, why)
        arrays = _check_build_result(name, build())
        _write(payload, sidecar, version, arrays)
        return arrays


# entry families made from a source's data under another name: counted as that source's
DERIVED = {"spoken_words": ("spoken16k",)}


def entry_bytes(name: str | None = None) -> int:
    """Bytes on disk of the entry `name` and of the entries named `name-...` (a family such
    as "emoji-32", "emoji-64"), and of the families DERIVED from it; of every entry when `name`
    is None."""
    folder = cache_dir() / ARRAYS_DIR
    if not folder.is_dir():
        return 0
    names = None if name is None else (name, *DERIVED.get(name, ()))
    return sum(p.stat().st_size for p in folder.iterdir()
               if p.suffix in (".npz", ".json") and p.is_file()
               and (names is None or any(p.stem == n or p.stem.startswith(f"{n}-") for n in names)))


def _lock(name: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(name, threading.Lock())


@contextmanager
def _process_lock(path: Path) -> Iterator[None]:
    """Holds an exclusive `flock` on `path` (created, with its folder) while the block runs, when
    it can be taken; else runs the block unlocked."""
    try:
        import fcntl

        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except (ImportError, OSError):
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # a file system without locks
            pass
        yield
    finally:
        os.close(fd)  # (releases the lock)


def _describe(arrays: dict[str, np.ndarray]) -> dict[str, dict]:
    return {k: {"shape": list(a.shape), "dtype": a.dtype.str} for k, a in arrays.items()}


def _read(payload: Path, sidecar: Path, version: str) -> dict[str, np.ndarray]:
    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CacheCorrupt(f"its sidecar {sidecar.name} is missing") from None
    except (OSError, ValueError) as error:
        raise CacheCorrupt(f"its sidecar {sidecar.name} is unreadable: {error}") from None
    if not isinstance(meta, dict) or not {"version", "sha256", "arrays"} <= meta.keys():
        raise CacheCorrupt(f"its sidecar {sidecar.name} lacks version, sha256 or arrays")
    if meta["version"] != version:
        raise CacheCorrupt(f"it was built as version {meta['version']!r}, version {version!r} is wanted")
    try:
        data = payload.read_bytes()
    except OSError as error:
        raise CacheCorrupt(f"the payload is unreadable: {error}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != meta["sha256"]:
        raise CacheCorrupt(f"sha256 {digest[:12]}... differs from the recorded {str(meta['sha256'])[:12]}...")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except Exception as error:  # zipfile, zlib and format errors all mean the same here
        raise CacheCorrupt(f"the payload does not load: {error}") from None
    if _describe(arrays) != meta["arrays"]:
        raise CacheCorrupt("its arrays differ from those the sidecar lists")
    return arrays


def _check_build_result(name: str, arrays) -> dict[str, np.ndarray]:
    if not isinstance(arrays, dict) or not arrays:
        raise TypeError(f"the build function of cache entry {name!r} must return a non-empty dict of numpy arrays")
    for key, a in arrays.items():
        if not isinstance(key, str) or not isinstance(a, np.ndarray):
            raise TypeError(f"cache entry {name!r}: item {key!r} must be a numpy array under a str key, "
                            f"got {type(a).__name__}")
        if a.dtype.hasobject:
            raise TypeError(f"cache entry {name!r}: array {key!r} has dtype object; store strings as a numpy "
                            "unicode array (np.array(list_of_str)) or as encoded bytes")
    return arrays


def _atomic_write(path: Path, write: Callable[[io.BufferedWriter], None]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not every platform opens folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write(payload: Path, sidecar: Path, version: str, arrays: dict[str, np.ndarray]) -> None:
    payload.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # object arrays were refused above, so nothing is pickled
    data = buffer.getvalue()
    meta = {
        "version": version,
        "sha256": hashlib.sha256(data).hexdigest(),
        "arrays": _describe(arrays),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "bytes": len(data),
    }
    sidecar.unlink(missing_ok=True)  # from here until the new sidecar lands, the entry reads as corrupt
    _atomic_write(payload, lambda f: f.write(data))
    _atomic_write(sidecar, lambda f: f.write(json.dumps(meta, indent=1).encode("utf-8")))
    _fsync_dir(payload.parent)
