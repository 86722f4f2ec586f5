"""Small synthetic tasks for the training tests (no dataset files needed)."""

import numpy as np
import torch

from generalist.data.packing import Example
from generalist.data.tasks import Task, check_split

COLOURS = ["red", "green", "blue", "yellow", "black", "white"]


class Bars(Task):
    """An 8x8 image with one bright bar -> "horizontal" / "vertical"."""
    name = "bars"

    def examples(self, split, limit=None, seed=0):
        check_split(split)
        rng = np.random.default_rng([seed, 0 if split == "train" else 1])
        out = []
        for _ in range(40 if limit is None else limit):
            img = rng.random((8, 8), dtype=np.float32) * 0.2
            k, vertical = rng.integers(8), bool(rng.integers(2))
            if vertical:
                img[:, k] = 1.0
            else:
                img[k, :] = 1.0
            out.append(Example([("image", torch.from_numpy(img))], "vertical" if vertical else "horizontal", self.name))
        return out


class Echo(Task):
    """Text -> the same words."""
    name = "echo"

    def examples(self, split, limit=None, seed=0):
        check_split(split)
        rng = np.random.default_rng([seed, 2 if split == "train" else 3])
        out = []
        for _ in range(40 if limit is None else limit):
            words = " ".join(rng.choice(COLOURS, size=2))
            out.append(Example([("text", words)], words, self.name))
        return out


class Swatches(Task):
    """A solid-colour swatch paired with its colour name, for the contrastive head only."""
    name = "swatches"
    contrastive, generative = True, False
    RGB = {"red": (1, 0, 0), "green": (0, 1, 0), "blue": (0, 0, 1), "yellow": (1, 1, 0), "black": (0, 0, 0),
           "white": (1, 1, 1)}

    def examples(self, split, limit=None, seed=0):
        check_split(split)
        rng = np.random.default_rng([seed, 4 if split == "train" else 5])
        out = []
        for _ in range(30 if limit is None else limit):
            name = COLOURS[rng.integers(len(COLOURS))]
            img = torch.tensor(self.RGB[name], dtype=torch.float32)[:, None, None].expand(3, 8, 8).clone()
            img += torch.from_numpy(rng.normal(0, 0.05, (3, 8, 8)).astype(np.float32))
            out.append(Example([("image", img.clamp(0, 1))], name, self.name))
        return out


class Beeps(Task):
    """A tenth of a second of a tone at 8 kHz -> "low" (200-500 Hz) / "high" (1.5-3 kHz): the audio
    the trainer warps (freq_warp)."""
    name = "beeps"

    def examples(self, split, limit=None, seed=0):
        check_split(split)
        rng = np.random.default_rng([seed, 6 if split == "train" else 7])
        out, t = [], np.arange(800) / 8000
        for _ in range(30 if limit is None else limit):
            high = bool(rng.integers(2))
            hz = rng.uniform(1500, 3000) if high else rng.uniform(200, 500)
            wave = (0.5 * np.sin(2 * np.pi * hz * t + rng.uniform(0, 2 * np.pi))).astype(np.float32)
            out.append(Example([("audio", (wave, 8000))], "high" if high else "low", self.name))
        return out


TASKS = {t.name: t for t in (Bars(), Echo(), Swatches(), Beeps())}
MIXTURE = {"bars": {"train": 40, "test": 16}, "echo": {"train": 40, "test": 16}, "swatches": {"train": 30, "test": 12},
           "beeps": {"train": 30, "test": 12}}


def _swatch_evaluate(self, predictor, examples):
    """Retrieval among the colour names through the contrastive head."""
    names = sorted(self.RGB)
    texts = predictor.embed([Example([("text", n)], "", self.name) for n in names])
    images = predictor.embed(examples)
    picks = (images @ texts.t()).argmax(dim=1).tolist()
    return {"accuracy": sum(names[p] == e.target_text for p, e in zip(picks, examples)) / len(examples)}


def _swatch_answer(self, predictor, examples):
    """The colour name nearest each example through the contrastive head (what predict answers)."""
    names = sorted(self.RGB)
    texts = predictor.embed([Example([("text", n)], "", self.name) for n in names])
    return [names[p] for p in (predictor.embed(examples) @ texts.t()).argmax(dim=1).tolist()]


Swatches.evaluate = _swatch_evaluate
Swatches.answer = _swatch_answer
