"""text_topic — a quotation from the `fortunes` collection -> its category ("science",
"literature", ...). Metric: accuracy. Baseline to beat: scikit-learn logistic regression on
TF-IDF reached 0.71 on this task's source (majority class 0.29).

Data: apt `fortunes`; each distinct quote once (quotes equal after normalisation are one quote;
one filed under two categories is dropped); categories with at least 150 of those quotes; a
seeded 80/20 split, so no quote is in both splits.
"""

from collections import Counter

from generalist.data import sources
from generalist.data.packing import Example
from generalist.data.tasks import Task, normalize, split_indices, take

MIN_PER_CATEGORY = 150


def distinct(texts, cats) -> list[tuple[str, str]]:
    """(text, category) with each normalised text once, at its first occurrence, in order;
    a text that occurs under two or more categories is dropped altogether."""
    keys = [normalize(t) for t in texts]
    labels: dict[str, set[str]] = {}
    for key, c in zip(keys, cats):
        labels.setdefault(key, set()).add(c)
    seen: set[str] = set()
    out = []
    for key, t, c in zip(keys, texts, cats):
        if len(labels[key]) == 1 and key not in seen:
            seen.add(key)
            out.append((t, c))
    return out


class TextTopic(Task):
    name = "text_topic"

    def _data(self):
        data = distinct(*sources.fortunes())
        keep = {c for c, n in Counter(c for _, c in data).items() if n >= MIN_PER_CATEGORY}
        return [(t, c) for t, c in data if c in keep]

    def examples(self, split, limit=None, seed=0):
        data = self._data()
        idx = take(split_indices(len(data), split, 0.2, seed), limit)
        return [Example([("text", data[i][0])], data[i][1], self.name) for i in idx]


TASK = TextTopic()
