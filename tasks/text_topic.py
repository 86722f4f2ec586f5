"""text_topic — a quotation from the `fortunes` collection -> its category ("science",
"literature", ...). Metric: accuracy. Baseline to beat: a linear SVM on TF-IDF character
2-5-grams reaches 0.575 on these splits, 0.560 on the 500 test quotes the demo evaluates (word
1-2-grams with logistic regression 0.469; the majority class 0.101; scripts/text_topic_baseline.py). 26 categories; the 0.71 of DATA.md was
measured on another choice of categories, where the majority class alone was 0.29.

Data: apt `fortunes`; each distinct quote once (quotes with the same words, whatever their
punctuation, spacing, case or attribution, are one quote: the collection files many quotes
twice, often with the attribution spelled differently, some inside a longer quote, under a
title line or in a list, and some with a word or two changed; one filed under two categories is
dropped); categories with at least 150 of those quotes; a seeded 80/20 split, so no quote is in
both splits.
"""

import difflib
import functools
import re
from collections import Counter

from generalist.data import sources
from generalist.data.packing import Example
from generalist.data.tasks import Task, split_indices, take

MIN_PER_CATEGORY = 150
MIN_CONTAINED_WORDS = 5  # a quote this long or longer found word for word inside another is that quote
NEAR_RATIO = 0.85  # two quotes whose words are this alike (difflib's ratio) are one quote
RARE_TRIPLE = 30  # quotes compared by NEAR_RATIO share a run of three words at most this many use
# a title line the collection puts before a quote it also files bare: "QOTD:", "Matz's Law:",
# "O'Toole's commentary on Murphy's Law:" (a "word, n.:" heading is one too)
HEADING = re.compile(r"^[^\n:]{1,40}:\s+")


def quote_body(text: str) -> str:
    """The quote without its attribution: what follows the last line that begins with "--", or
    in a one-line quote a last " -- " followed by a capitalised name of at most six words ("Bus
    error -- driver executed." keeps its dash)."""
    lines = re.split(r"\n\s*--\s", text)
    if len(lines) > 1:
        return "\n".join(lines[:-1])
    body, dash, tail = text.rpartition(" -- ")
    return body if dash and tail[:1].isupper() and len(tail.split()) <= 6 else text


def quote_key(text: str) -> str:
    """What makes two quotes one: their letters and digits, lower-cased, without the attribution
    (`quote_body`). A quote with no letter or digit is its own key."""
    return re.sub(r"[^a-z0-9]+", "", quote_body(text).lower()) or text


def same_quotes(texts) -> list[int]:
    """A group number for each text: texts with the same `quote_key` are one group, and so is a
    quote of MIN_CONTAINED_WORDS or more words found word for word inside a longer one ("The
    sooner you fall behind, ..." and "Ogden's Law: The sooner you fall behind, ...", "Void where
    prohibited by law." and "Offer void where prohibited by law."), and two quotes whose words
    are NEAR_RATIO alike ("... worth the paper it's printed on" and "... written on", "Old age
    and treachery will overcome youth and skill" and "Age and treachery will always overcome
    ...", a definition under its "word, n.:" heading and without)."""
    parent = list(range(len(texts)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[str, int] = {}
    words = [re.findall(r"[a-z0-9]+", HEADING.sub("", quote_body(t).strip()).lower()) for t in texts]
    for i, t in enumerate(texts):
        parent[root(i)] = root(first.setdefault(quote_key(t), i))
        if words[i]:  # the same words under a title line and without
            parent[root(i)] = root(first.setdefault(" ".join(words[i]), i))
    n = MIN_CONTAINED_WORDS
    starts: dict[tuple, set[int]] = {}  # each n-word run -> the quotes it occurs in
    for i, w in enumerate(words):
        for j in range(len(w) - n + 1):
            starts.setdefault(tuple(w[j:j + n]), set()).add(i)
    spaced = [f" {' '.join(w)} " for w in words]
    for i, w in enumerate(words):
        for j in starts.get(tuple(w[:n]), ()) if len(w) >= n else ():
            if len(words[j]) > len(w) and spaced[i] in spaced[j]:
                parent[root(i)] = root(j)
    # near the same words: pairs that share a word triple few quotes use, then difflib's ratio
    triples: dict[tuple, list[int]] = {}
    for i, w in enumerate(words):
        for t in set(zip(w, w[1:], w[2:])):
            triples.setdefault(t, []).append(i)
    pairs = {(a, b) for ids in triples.values() if len(ids) <= RARE_TRIPLE for k, a in enumerate(ids) for b in ids[k + 1:]}
    for a, b in sorted(pairs):
        if root(a) != root(b):
            m = difflib.SequenceMatcher(None, words[a], words[b], autojunk=False)
            if m.real_quick_ratio() >= NEAR_RATIO and m.quick_ratio() >= NEAR_RATIO and m.ratio() >= NEAR_RATIO:
                parent[root(a)] = root(b)
    return [root(i) for i in range(len(texts))]


@functools.lru_cache(maxsize=2)  # (a second each: once for all the splits a process builds)
def _same_quotes(texts: tuple[str, ...]) -> list[int]:
    return same_quotes(texts)


def distinct(texts, cats) -> list[tuple[str, str]]:
    """(text, category) with each quote (`same_quotes`) once, at its first occurrence, in order;
    a quote that occurs under two or more categories is dropped altogether."""
    groups = _same_quotes(tuple(texts))
    labels: dict[int, set[str]] = {}
    for g, c in zip(groups, cats):
        labels.setdefault(g, set()).add(c)
    seen: set[int] = set()
    out = []
    for g, t, c in zip(groups, texts, cats):
        if len(labels[g]) == 1 and g not in seen:
            seen.add(g)
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
