"""tabular — a row of the wine or breast-cancer table -> its class name. Metric: accuracy
(overall and per dataset).

Data: scikit-learn's bundled tables; a seeded stratification-free 75/25 split per dataset;
features standardised with the train split's mean and std. Column ids: wine 0-12, breast
cancer 13-42, so the two tables never share a column embedding.
"""

import numpy as np

from generalist.data import sources
from generalist.data.packing import Example
from generalist.data.tasks import Task, split_indices, take
from generalist.metrics import accuracy_by

DATASETS = {"wine": 0, "breast_cancer": 13}


class Tabular(Task):
    name = "tabular"

    def examples(self, split, limit=None, seed=0):
        out = []
        for name, offset in DATASETS.items():
            x, y, _, classes = sources.sklearn_table(name)
            train = split_indices(len(x), "train", 0.25, seed)
            mean, std = x[train].mean(0), x[train].std(0) + 1e-6
            for i in split_indices(len(x), split, 0.25, seed):
                cols = np.arange(x.shape[1]) + offset
                out.append(Example([("table", (cols, ((x[i] - mean) / std).astype(np.float32)))],
                                   f"{classes[y[i]]}".replace("_", " "), self.name))
                out[-1].meta["dataset"] = name
        order = np.random.default_rng([seed, 51]).permutation(len(out))
        return [out[i] for i in take(order, limit)]

    def score(self, predictions, examples):
        refs = [e.target_text for e in examples]
        by = accuracy_by(predictions, refs, [e.meta["dataset"] for e in examples])
        total = sum(v * sum(e.meta["dataset"] == k for e in examples) for k, v in by.items()) / max(1, len(examples))
        return {"accuracy": total, **{f"accuracy_{k}": v for k, v in sorted(by.items())}}


TASK = Tabular()
