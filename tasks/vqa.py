"""vqa — a scene of 2-4 real digits (16 px) on a 48x48 canvas and a question about it ("what digit is
left of the 3?", "how many digits are there?", "is there a 7?") -> a one-word answer.
Metric: accuracy, overall and by question type.

Data: MNIST-5k digits (seeded 80/20 split shared with `digits`: test scenes use unseen digit
images), composed by generalist.data.synth.digit_scene / scene_questions.
"""

import numpy as np

from generalist.data.packing import Example
from generalist.data.synth import digit_scene, scene_questions
from generalist.data.tasks import Task, how_many, mnist_split, normalize
from generalist.metrics import accuracy_by


class VQA(Task):
    name = "vqa"

    def examples(self, split, limit=None, seed=0):
        images, labels, idx = mnist_split(split, seed)
        rng = np.random.default_rng([seed, 31, split == "test"])
        n = how_many(limit, len(idx))
        out = []
        while len(out) < n:
            picks = rng.choice(idx, size=int(rng.integers(2, 5)), replace=False)
            canvas, boxes = digit_scene([(images[i], int(labels[i])) for i in picks], rng, canvas=48, digit_size=16)
            questions = scene_questions(boxes, rng)
            q, a, qtype = questions[int(rng.integers(len(questions)))]
            out.append(Example([("image", canvas), ("text", q)], a, self.name))
            out[-1].meta["qtype"] = qtype
        return out

    def score(self, predictions, examples):
        refs = [e.target_text for e in examples]
        by = accuracy_by(predictions, refs, [e.meta["qtype"] for e in examples])
        hits = [normalize(p) == normalize(r) for p, r in zip(predictions, refs)]
        return {"accuracy": sum(hits) / max(1, len(hits)), **{f"accuracy_{k}": v for k, v in sorted(by.items())}}


TASK = VQA()
