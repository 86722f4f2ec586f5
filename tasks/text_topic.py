"""text_topic — a quotation from the `fortunes` collection -> its category ("science",
"literature", ...). Metric: accuracy. Baseline to beat: scikit-learn logistic regression on
TF-IDF reached 0.71 on this task's source (majority class 0.29).

Data: apt `fortunes`; categories with at least 150 quotes; a seeded 80/20 split.
"""

from collections import Counter

from generalist.data import sources
from generalist.data.packing import Example
from generalist.data.tasks import Task, split_indices, take

MIN_PER_CATEGORY = 150


class TextTopic(Task):
    name = "text_topic"

    def _data(self):
        texts, cats = sources.fortunes()
        keep = {c for c, n in Counter(cats).items() if n >= MIN_PER_CATEGORY}
        return [(t, c) for t, c in zip(texts, cats) if c in keep]

    def examples(self, split, limit=None, seed=0):
        data = self._data()
        idx = take(split_indices(len(data), split, 0.2, seed), limit)
        return [Example([("text", data[i][0])], data[i][1], self.name) for i in idx]


TASK = TextTopic()
