"""The 16 kHz spoken-digit cache (generalist.data.speech.spoken) follows the espeak-ng version,
as sources.spoken_words' own entry does: a new espeak-ng never serves the old clips."""

import json

import numpy as np
import pytest

from generalist.data import sources
from generalist.data import speech


@pytest.fixture
def fake_espeak(tmp_path, monkeypatch):
    """A temporary cache, a settable espeak-ng version and a fake synthesizer that counts calls
    and says each call's clips at a different level."""
    monkeypatch.setenv("GENERALIST_CACHE", str(tmp_path / "cache"))
    state = {"version": "eSpeak NG text-to-speech: 1.51", "calls": 0}
    monkeypatch.setattr(sources, "_program", lambda name, source: "/usr/bin/espeak-ng")
    monkeypatch.setattr(sources, "_espeak_version", lambda program: state["version"])

    def spoken_words(words, voices, speeds, pitches):
        state["calls"] += 1
        n = len(sources.spoken_words_meta(words, voices, speeds, pitches))
        return [np.full(2205, 0.1 * state["calls"], dtype=np.float32) for _ in range(n)], sources.ESPEAK_RATE

    monkeypatch.setattr(sources, "spoken_words", spoken_words)
    return state


def _versions(root):
    return sorted(json.loads(p.read_text())["version"] for p in (root / "arrays").glob("spoken16k-*.json"))


def test_spoken_cache_follows_the_espeak_version(fake_espeak, tmp_path):
    first = speech.spoken(["seven"], ["en-us"])
    assert fake_espeak["calls"] == 1 and len(first) == len(speech.SPEEDS) * len(speech.PITCHES)
    again = speech.spoken(["seven"], ["en-us"])  # same espeak-ng: read back, not synthesized
    assert fake_espeak["calls"] == 1 and all(np.array_equal(a, b) for (a, _), (b, _) in zip(first, again))
    old_versions = _versions(tmp_path / "cache")

    fake_espeak["version"] = "eSpeak NG text-to-speech: 1.52"
    fresh = speech.spoken(["seven"], ["en-us"])
    assert fake_espeak["calls"] == 2  # the new espeak-ng is asked again
    assert not any(np.allclose(a, b) for (a, _), (b, _) in zip(first, fresh))  # and its clips are served
    new_versions = _versions(tmp_path / "cache")
    assert len(old_versions) == len(new_versions) == 1 and "1.51" in old_versions[0] and "1.52" in new_versions[0]


def test_no_words_or_no_voices_make_no_clips():
    assert speech.spoken([], ["en-us"]) == [] and speech.spoken(["one"], []) == []
