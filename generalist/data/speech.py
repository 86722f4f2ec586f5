"""Spoken digits shared by the speech tasks: the held-out voice split and 16 kHz clips."""

import hashlib
import json

import numpy as np
import torch

from generalist.data import sources
from generalist.data.cache import cached_arrays
from generalist.data.tasks import check_split
from generalist.modalities.audio import resample

SPEEDS, PITCHES, RATE = (130, 165, 200), (30, 50, 70), 16000


def voice_split(split: str, seed: int) -> list[str]:
    """A fixed seeded quarter of sources.VOICES (6 of 24) is for testing only; the rest for
    training. Voices with the same espeak-ng variant ("en-us+f2", "en-gb-scotland+f2": one
    timbre in two accents, as alike as one speaker) fall on the same side, so no test voice's
    variant is heard in training: the groups are taken in a seeded order, each into the test
    split while it fits in the quarter, else into training."""
    check_split(split)
    groups: dict[str, list[str]] = {}
    for v in sources.VOICES:
        # a voice with no variant speaks with espeak-ng's default timbre: those are one group too
        groups.setdefault(v.partition("+")[2] or "(default)", []).append(v)
    members = list(groups.values())
    test, train = [], []
    for g in np.random.default_rng([seed, 71]).permutation(len(members)):
        (test if len(test) + len(members[g]) <= len(sources.VOICES) // 4 else train).extend(members[g])
    return test if split == "test" else train


def spoken(words, voices) -> list[tuple[np.ndarray, dict]]:
    """(16 kHz float32 waveform, meta) for every word x voice x speed x pitch, resampled once
    here so training does not repeat it every step. Cached by the request and, like
    sources.spoken_words, the espeak-ng version: a new espeak-ng gives new clips."""
    words, voices = list(words), list(voices)
    if not words or not voices:
        return []  # (as sources.spoken_words: no clips to make)
    meta = sources.spoken_words_meta(words, voices, SPEEDS, PITCHES)
    request = json.dumps([words, voices, SPEEDS, PITCHES, RATE])

    def build():
        waves, rate = sources.spoken_words(words, voices, SPEEDS, PITCHES)
        out = [resample(torch.from_numpy(w), rate, RATE).numpy().astype(np.float32) for w in waves]
        offsets = np.cumsum([0] + [len(w) for w in out])
        return {"samples": np.concatenate(out), "offsets": offsets, "request": np.array([request])}

    version = "1:" + sources._espeak_version(sources._program(sources.ESPEAK, "spoken_words"))
    arrays = cached_arrays(f"spoken16k-{hashlib.sha256(request.encode()).hexdigest()[:20]}", version, build)
    if arrays["request"][0] != request:
        raise AssertionError("spoken-word cache entries collided")
    o = arrays["offsets"].tolist()
    return [(arrays["samples"][a:b], m) for a, b, m in zip(o[:-1], o[1:], meta)]
