"""The baselines the text_topic target is set by: linear classifiers on TF-IDF features, trained
on the task's training split and scored on its whole test split, and on the 500 test quotes the
demo mixture evaluates the model on (the first 500 of the split at seed 0: ±0.022 of sampling
error against the whole split's figure).

    .venv/bin/python scripts/text_topic_baseline.py
"""

from collections import Counter

from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.svm import LinearSVC

from generalist.data.tasks import get_task
from generalist.train.data import load_mixtures


def main() -> None:
    task = get_task("text_topic")
    train, test = task.examples("train"), task.examples("test")
    demo = {e.segments[0][1] for e in task.examples("test", load_mixtures()["demo"]["text_topic"]["test"], 0)}
    x, y = [e.segments[0][1] for e in train], [e.target_text for e in train]
    x_test, y_test = [e.segments[0][1] for e in test], [e.target_text for e in test]
    in_demo = [q in demo for q in x_test]

    def majority(labels):
        return Counter(labels).most_common(1)[0][1] / len(labels)

    print(f"{len(train)} training and {len(test)} test quotes ({sum(in_demo)} of them in the demo's evaluation) in "
          f"{len(set(y))} categories; majority class {majority(y_test):.3f} "
          f"(demo's: {majority([t for t, d in zip(y_test, in_demo) if d]):.3f})")
    features = {"word 1-2-grams": dict(ngram_range=(1, 2)), "character 2-5-grams": dict(analyzer="char_wb",
                                                                                            ngram_range=(2, 5))}
    for name, options in features.items():
        vectorizer = TfidfVectorizer(sublinear_tf=True, min_df=2, **options)
        a, a_test = vectorizer.fit_transform(x), vectorizer.transform(x_test)
        for model_name, model in (("logistic regression (C=10)", LogisticRegression(C=10, max_iter=3000)),
                                  ("linear SVM (C=0.5)", LinearSVC(C=0.5))):
            hits = [p == t for p, t in zip(model.fit(a, y).predict(a_test), y_test)]
            on_demo = [h for h, d in zip(hits, in_demo) if d]
            print(f"TF-IDF {name} + {model_name}: {sum(hits) / len(hits):.3f} (the demo's {len(on_demo)}: "
                  f"{sum(on_demo) / len(on_demo):.3f})")


if __name__ == "__main__":
    main()
