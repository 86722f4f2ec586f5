import hashlib
import io
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest

from generalist.data import cache
from generalist.data.cache import cache_dir, cached_arrays, entry_bytes, entry_paths


@pytest.fixture(autouse=True)
def tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GENERALIST_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


class Builder:
    """A build function that counts its calls and can fail on demand."""

    def __init__(self, fail=False):
        self.calls, self.fail = 0, fail

    def __call__(self):
        self.calls += 1
        if self.fail:
            raise RuntimeError("build interrupted")
        return {"x": np.arange(1000, dtype=np.int64).reshape(10, 100), "names": np.array(["koala", "électrique", ""])}


def _check(arrays):
    assert np.array_equal(arrays["x"], np.arange(1000).reshape(10, 100)) and arrays["x"].dtype == np.int64
    assert arrays["names"].tolist() == ["koala", "électrique", ""] and arrays["names"].dtype.kind == "U"


def _leftovers(folder: Path) -> list[str]:
    """Files in the cache folder but the entries' lock files (empty; what processes flock)."""
    return sorted(p.name for p in folder.iterdir() if p.suffix != ".lock") if folder.exists() else []


def test_cache_dir_env_and_default(tmp_cache, monkeypatch, tmp_path):
    assert cache_dir() == tmp_cache
    monkeypatch.delenv("GENERALIST_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "generalist"


def test_builds_once_then_reads_back(tmp_cache):
    build = Builder()
    _check(cached_arrays("thing", "1", build))
    _check(cached_arrays("thing", "1", build))
    assert build.calls == 1
    payload, sidecar = entry_paths("thing")
    meta = json.loads(sidecar.read_text())
    assert meta["version"] == "1" and len(meta["sha256"]) == 64 and meta["created"]
    assert meta["arrays"] == {"x": {"shape": [10, 100], "dtype": "<i8"}, "names": {"shape": [3], "dtype": "<U10"}}
    assert payload.suffix == ".npz" and entry_bytes("thing") == payload.stat().st_size + sidecar.stat().st_size
    assert entry_bytes("thin") == 0 and entry_bytes() == entry_bytes("thing")
    assert _leftovers(payload.parent) == ["thing.json", "thing.npz"]  # no temp files
    # a family made from a source's data under another name counts as the source's
    cached_arrays("spoken16k-abc", "1", Builder())
    derived = sum(p.stat().st_size for p in entry_paths("spoken16k-abc"))
    assert entry_bytes("spoken_words") == derived and entry_bytes() == entry_bytes("thing") + derived


def test_failed_build_leaves_no_entry(tmp_cache):
    with pytest.raises(RuntimeError, match="build interrupted"):
        cached_arrays("thing", "1", Builder(fail=True))
    assert _leftovers(tmp_cache / "arrays") == []
    build = Builder()
    _check(cached_arrays("thing", "1", build))
    assert build.calls == 1


def test_interrupted_payload_write_leaves_nothing(tmp_cache, monkeypatch):
    real_fsync = os.fsync

    def crash(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(cache.os, "fsync", crash)
    with pytest.raises(KeyboardInterrupt):
        cached_arrays("thing", "1", Builder())
    monkeypatch.setattr(cache.os, "fsync", real_fsync)
    assert _leftovers(tmp_cache / "arrays") == []  # the temp file is removed, nothing is in place


def test_interrupted_before_sidecar_is_rebuilt(tmp_cache, monkeypatch, caplog):
    real = cache._atomic_write

    def payload_only(path, write):
        if path.suffix == ".json":
            raise KeyboardInterrupt
        real(path, write)

    monkeypatch.setattr(cache, "_atomic_write", payload_only)
    with pytest.raises(KeyboardInterrupt):
        cached_arrays("thing", "1", Builder())
    monkeypatch.setattr(cache, "_atomic_write", real)
    payload, sidecar = entry_paths("thing")
    assert payload.exists() and not sidecar.exists()
    build = Builder()
    with caplog.at_level(logging.WARNING, logger="generalist.data.cache"):
        _check(cached_arrays("thing", "1", build))
    assert build.calls == 1 and str(payload) in caplog.text and "sidecar" in caplog.text


def test_rebuild_replaces_old_sidecar_first(tmp_cache, monkeypatch):
    """A crash while replacing an entry of another version must not leave the old sidecar
    beside the new payload."""
    cached_arrays("thing", "1", Builder())
    real = cache._atomic_write

    def payload_only(path, write):
        if path.suffix == ".json":
            raise KeyboardInterrupt
        real(path, write)

    monkeypatch.setattr(cache, "_atomic_write", payload_only)
    with pytest.raises(KeyboardInterrupt):
        cached_arrays("thing", "2", Builder())
    assert not entry_paths("thing")[1].exists()


def test_truncated_payload_is_rebuilt(tmp_cache, caplog):
    cached_arrays("thing", "1", Builder())
    payload, _ = entry_paths("thing")
    data = payload.read_bytes()
    payload.write_bytes(data[: len(data) // 2])
    build = Builder()
    with caplog.at_level(logging.WARNING, logger="generalist.data.cache"):
        _check(cached_arrays("thing", "1", build))
    assert build.calls == 1 and str(payload) in caplog.text and "sha256" in caplog.text
    again = Builder()
    _check(cached_arrays("thing", "1", again))
    assert again.calls == 0  # the rebuilt entry is whole


@pytest.mark.parametrize("where", ["start", "middle", "end"])
def test_flipped_bytes_are_detected_and_rebuilt(tmp_cache, caplog, where):
    cached_arrays("thing", "1", Builder())
    payload, _ = entry_paths("thing")
    data = bytearray(payload.read_bytes())
    at = {"start": 0, "middle": len(data) // 2, "end": len(data) - 1}[where]
    data[at] ^= 0xFF
    payload.write_bytes(bytes(data))
    build = Builder()
    with caplog.at_level(logging.WARNING, logger="generalist.data.cache"):
        _check(cached_arrays("thing", "1", build))
    assert build.calls == 1 and str(payload) in caplog.text


def test_payload_and_sidecar_rewritten_together_still_checked(tmp_cache, caplog):
    """A payload that matches its checksum but not the sidecar's array list is refused too."""
    cached_arrays("thing", "1", Builder())
    payload, sidecar = entry_paths("thing")
    buffer = io.BytesIO()
    np.savez(buffer, x=np.zeros(3))
    payload.write_bytes(buffer.getvalue())
    meta = json.loads(sidecar.read_text())
    meta["sha256"] = hashlib.sha256(buffer.getvalue()).hexdigest()
    sidecar.write_text(json.dumps(meta))
    build = Builder()
    with caplog.at_level(logging.WARNING, logger="generalist.data.cache"):
        _check(cached_arrays("thing", "1", build))
    assert build.calls == 1 and "arrays differ" in caplog.text


@pytest.mark.parametrize("sidecar_text", ["", "{not json", "[]", '{"version": "1"}'])
def test_bad_sidecar_is_rebuilt(tmp_cache, caplog, sidecar_text):
    cached_arrays("thing", "1", Builder())
    _, sidecar = entry_paths("thing")
    sidecar.write_text(sidecar_text)
    build = Builder()
    with caplog.at_level(logging.WARNING, logger="generalist.data.cache"):
        _check(cached_arrays("thing", "1", build))
    assert build.calls == 1 and "thing.npz" in caplog.text


def test_missing_payload_is_rebuilt(tmp_cache, caplog):
    cached_arrays("thing", "1", Builder())
    entry_paths("thing")[0].unlink()
    build = Builder()
    with caplog.at_level(logging.WARNING, logger="generalist.data.cache"):
        _check(cached_arrays("thing", "1", build))
    assert build.calls == 1 and "unreadable" in caplog.text


def test_version_change_rebuilds(tmp_cache, caplog):
    first = Builder()
    cached_arrays("thing", "1", first)
    second = Builder()
    with caplog.at_level(logging.WARNING, logger="generalist.data.cache"):
        _check(cached_arrays("thing", "2", second))
    assert second.calls == 1 and "version '1'" in caplog.text
    third = Builder()
    cached_arrays("thing", "2", third)
    assert third.calls == 0


def test_refuses_objects_and_bad_names(tmp_cache):
    with pytest.raises(TypeError, match="dtype object"):
        cached_arrays("thing", "1", lambda: {"x": np.array([{"a": 1}], dtype=object)})
    with pytest.raises(TypeError, match="numpy array"):
        cached_arrays("thing", "1", lambda: {"x": [1, 2]})
    with pytest.raises(TypeError, match="non-empty dict"):
        cached_arrays("thing", "1", lambda: {})
    for bad in ["", "../x", "a/b", ".hidden", "x.npz"]:
        with pytest.raises(ValueError, match="cache entry name"):
            cached_arrays(bad, "1", Builder())
    assert _leftovers(tmp_cache / "arrays") == []


def test_processes_building_one_entry_build_it_once(tmp_cache, tmp_path):
    """The ranks of a torchrun launch on a fresh cache: one process builds, the others wait for it
    and read its entry (the build writes a line to `calls` each time it runs)."""
    import subprocess
    import sys

    calls = tmp_path / "calls"
    script = ("import os, sys, time, numpy as np\n"
              "from generalist.data.cache import cached_arrays\n"
              "def build():\n"
              f"    open({str(calls)!r}, 'a').write('built\\n')\n"
              "    time.sleep(1.0)\n"
              "    return {'x': np.arange(5)}\n"
              "print(cached_arrays('shared', 'v1', build)['x'].sum())\n")
    env = {**os.environ, "GENERALIST_CACHE": str(tmp_cache)}
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(3)]
    outputs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0] and outputs == ["10"] * 3
    assert calls.read_text() == "built\n"
