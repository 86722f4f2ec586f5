"""moving_digits — a generated clip of a real digit moving in one of 8 directions ->
"seven moving up-left". Metrics: exact match, digit accuracy and direction accuracy apart.

Data: MNIST-5k digits (the same seeded 80/20 split as `digits`, so test clips are made of
digits never seen in training), animated by generalist.data.synth.moving_digit_clip
(8 frames, 32x32, uint8).
"""

import numpy as np

from generalist.data.packing import Example
from generalist.data.synth import DIRECTIONS, describe_motion, moving_digit_clip
from generalist.data.tasks import Task, how_many, mnist_split, normalize


class MovingDigits(Task):
    name = "moving_digits"
    frames, size = 8, 32

    def examples(self, split, limit=None, seed=0):
        images, labels, idx = mnist_split(split, seed)
        rng = np.random.default_rng([seed, 21, split == "test"])
        out = []
        for k in range(how_many(limit, len(idx))):
            i = idx[k % len(idx)]
            direction = int(rng.integers(len(DIRECTIONS)))
            clip = moving_digit_clip(images[i], direction, rng, frames=self.frames, size=self.size)
            out.append(Example([("video", clip)], describe_motion(int(labels[i]), direction), self.name))
        return out

    def score(self, predictions, examples):
        texts = [(normalize(p), normalize(e.target_text)) for p, e in self.pairs(predictions, examples)]
        pairs = [(_parts(p), _parts(t)) for p, t in texts]
        n = len(pairs)
        return {"accuracy": sum(p == t for p, t in texts) / n,
                "digit_accuracy": sum(p[0] == t[0] for p, t in pairs) / n,
                "direction_accuracy": sum(p[1] == t[1] for p, t in pairs) / n}


def _parts(text: str) -> tuple[str | None, str | None]:
    """(digit, direction) of "seven moving up-left": the first word, and the one word after
    "moving" when the text is "<word> moving <word>"; None for a part the text lacks (then it
    matches no target). "seven moving" still names its digit; punctuation after the digit
    ("seven, moving up-left") does not change it."""
    words = normalize(text).replace(",", " ").split()
    digit = words[0] if words else None
    direction = words[2] if len(words) == 3 and words[1] == "moving" else None
    return digit, direction


TASK = MovingDigits()
