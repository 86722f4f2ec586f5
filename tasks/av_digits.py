"""av_digits — audio-visual digits (AV-MNIST style): a degraded MNIST image (noise + an
occluding block that hides at most half of the digit's ink) with a degraded spoken word of the
same digit (noise at 0-10 dB SNR) -> the digit word. Metrics: fusion accuracy, and accuracy
with the image alone and the audio alone (the other segment dropped) — fusion should beat both.

Data: MNIST-5k images (the seeded split shared with `digits`) and espeak-ng speech (the voice
split shared with `spoken_digits`, so test voices and images are unseen). A fifth of the
training examples each keep only the image or only the audio, so the model also learns to
answer from one modality.
"""

import numpy as np

from generalist.data.packing import Example
from generalist.data.speech import RATE, spoken, voice_split
from generalist.data.synth import DIGIT_WORDS, degrade_audio, degrade_image
from generalist.data.tasks import Task, how_many, mnist_split


MAX_HIDDEN = 0.5  # the occluder hides at most half of a digit's ink: degraded, still a digit


class AVDigits(Task):
    name = "av_digits"

    def examples(self, split, limit=None, seed=0):
        images, labels, idx = mnist_split(split, seed)
        by_label = {d: idx[labels[idx] == d] for d in range(10)}
        clips = spoken(DIGIT_WORDS, voice_split(split, seed))
        clips_by_label = {d: [c for c, m in clips if m["word"] == DIGIT_WORDS[d]] for d in range(10)}
        rng = np.random.default_rng([seed, 81, split == "test"])
        out = []
        for _ in range(how_many(limit, len(idx))):
            d = int(rng.integers(10))
            image = degrade_image(images[rng.choice(by_label[d])], rng, max_hidden=MAX_HIDDEN)
            wave = degrade_audio(clips_by_label[d][rng.integers(len(clips_by_label[d]))], rng)
            segments = [("image", image), ("audio", (wave, RATE))]
            if split == "train":
                u = rng.random()
                segments = segments[:1] if u < 0.2 else segments[1:] if u < 0.4 else segments
            out.append(Example(segments, DIGIT_WORDS[d], self.name))
        return out

    def evaluate(self, predictor, examples):
        def acc(exs):
            return self.score(predictor.generate(exs), exs)["accuracy"]
        only = lambda m: [Example([s for s in e.segments if s[0] == m], e.target_text, e.task) for e in examples]
        return {"accuracy": acc(examples), "accuracy_image_only": acc(only("image")),
                "accuracy_audio_only": acc(only("audio"))}


TASK = AVDigits()
