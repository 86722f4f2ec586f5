"""zero_shot — classify Fashion-MNIST test images by comparing their embeddings with those of
text prompts ("a photo of a trouser") through the contrastive head. Nothing is ever trained on
this task (its train split is empty); what it measures is how far the image-text alignment
learned from captions carries to labels the contrastive head has (nearly) never paired with an
image: a few captions name them ("dress", "a t shirt"), and in a mixture with `fashion` the
decoder learns to write them, from Fashion-MNIST's training images, but no contrastive pair holds
a Fashion-MNIST image. Metric: accuracy (chance 0.1).
"""

import numpy as np

from generalist.data import sources
from generalist.data.packing import Example
from generalist.data.tasks import Task, check_split, take

PROMPT = "a photo of a {}"


class ZeroShot(Task):
    name = "zero_shot"
    generative = False
    requires = ("captions",)  # answered through the contrastive head that captions trains

    def examples(self, split, limit=None, seed=0):
        check_split(split)
        if split == "train":
            return []
        images, labels = sources.fashion_mnist("test")
        order = take(np.random.default_rng([seed, 61]).permutation(len(images)), limit)
        return [Example([("image", images[i])], sources.FASHION_CLASSES[labels[i]], "captions") for i in order]

    def answer(self, predictor, examples):
        """The class whose prompt is nearest each example's embedding, both embedded as the
        captions task (the one that trains the contrastive head)."""
        classes = list(sources.FASHION_CLASSES)
        prompts = predictor.embed([Example([("text", PROMPT.format(c))], "", "captions") for c in classes])
        inputs = predictor.embed([Example(e.segments, e.target_text, "captions") for e in examples])
        return [classes[p] for p in (inputs @ prompts.t()).argmax(dim=1).tolist()]

    def evaluate(self, predictor, examples):
        return self.score(self.answer(predictor, examples), examples)


TASK = ZeroShot()
