"""table_image — structured + unstructured input: a real digit image plus a table row
(operator, value) -> the result as a word ("image shows 7, table says + 2 -> nine").
Metric: accuracy.

Data: MNIST-5k digits (seeded 80/20 split shared with `digits`); cases from
generalist.data.synth.table_image_case. Table columns 60 (operator code: + 0, - 1, x 2) and
61 (value) — column ids no other task uses.
"""

import numpy as np

from generalist.data.packing import Example
from generalist.data.synth import OPS, number_word, table_image_case
from generalist.data.tasks import Task, how_many, mnist_split

OP_COLUMN, VALUE_COLUMN = 60, 61


class TableImage(Task):
    name = "table_image"

    def examples(self, split, limit=None, seed=0):
        images, labels, idx = mnist_split(split, seed)
        by_label = {d: idx[labels[idx] == d] for d in range(10)}
        rng = np.random.default_rng([seed, 41, split == "test"])
        out = []
        for _ in range(how_many(limit, len(idx))):
            operand, row, answer = table_image_case(rng)
            image = images[rng.choice(by_label[operand])]
            table = (np.array([OP_COLUMN, VALUE_COLUMN]), np.array([OPS.index(row["op"]), row["value"]], dtype=np.float32))
            out.append(Example([("image", image), ("table", table)], number_word(answer), self.name))
        return out


TASK = TableImage()
