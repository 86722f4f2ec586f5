"""spoken_digits — a digit word ("zero" ... "nine") spoken by espeak-ng -> the word.
Metric: accuracy on voices never heard in training.

Data: apt `espeak-ng`. Of the 24 voices in generalist.data.sources.VOICES a fixed seeded
quarter is held out for testing (`voice_split`: test voices never appear in training, nor does
the variant of one, its timbre, in another accent); every word is
said at 3 speeds x 3 pitches per voice. Waveforms are resampled once to 16 kHz here so training
does not repeat it every step.
"""

import numpy as np

from generalist.data.packing import Example
from generalist.data.speech import RATE, spoken, voice_split
from generalist.data.synth import DIGIT_WORDS
from generalist.data.tasks import Task, take


class SpokenDigits(Task):
    name = "spoken_digits"

    def examples(self, split, limit=None, seed=0):
        clips = spoken(DIGIT_WORDS, voice_split(split, seed))
        order = take(np.random.default_rng([seed, 72, split == "test"]).permutation(len(clips)), limit)
        return [Example([("audio", (clips[i][0], RATE))], clips[i][1]["word"], self.name, {"voice": clips[i][1]["voice"]})
                for i in order]


TASK = SpokenDigits()
