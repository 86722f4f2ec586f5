"""fashion — a Fashion-MNIST image -> its class name ("ankle boot"). Metric: accuracy.

Data: apt `dataset-fashion-mnist`; the official 60k/10k train/test split (test images are never
trained on). `limit` takes the first examples of a fixed seeded shuffle of each split.
"""

import numpy as np

from generalist.data import sources
from generalist.data.packing import Example
from generalist.data.tasks import Task, check_split, take


class Fashion(Task):
    name = "fashion"

    def examples(self, split, limit=None, seed=0):
        check_split(split)
        images, labels = sources.fashion_mnist(split)
        order = take(np.random.default_rng([seed, 11]).permutation(len(images)), limit)
        return [Example([("image", images[i])], sources.FASHION_CLASSES[labels[i]], self.name) for i in order]


TASK = Fashion()
