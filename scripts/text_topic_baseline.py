"""The baselines the text_topic target is set by: linear classifiers on TF-IDF features, trained
on the task's training split and scored on its test split (the same examples the model sees).

    .venv/bin/python scripts/text_topic_baseline.py
"""

from collections import Counter

from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.svm import LinearSVC

from generalist.data.tasks import get_task


def main() -> None:
    task = get_task("text_topic")
    train, test = task.examples("train"), task.examples("test")
    x, y = [e.segments[0][1] for e in train], [e.target_text for e in train]
    x_test, y_test = [e.segments[0][1] for e in test], [e.target_text for e in test]
    print(f"{len(train)} training and {len(test)} test quotes in {len(set(y))} categories; "
          f"majority class {Counter(y_test).most_common(1)[0][1] / len(y_test):.3f}")
    features = {"word 1-2-grams": dict(ngram_range=(1, 2)), "character 2-5-grams": dict(analyzer="char_wb",
                                                                                            ngram_range=(2, 5))}
    for name, options in features.items():
        vectorizer = TfidfVectorizer(sublinear_tf=True, min_df=2, **options)
        a, a_test = vectorizer.fit_transform(x), vectorizer.transform(x_test)
        for model_name, model in (("logistic regression (C=10)", LogisticRegression(C=10, max_iter=3000)),
                                  ("linear SVM (C=0.5)", LinearSVC(C=0.5))):
            accuracy = sum(p == t for p, t in zip(model.fit(a, y).predict(a_test), y_test)) / len(y_test)
            print(f"TF-IDF {name} + {model_name}: {accuracy:.3f}")


if __name__ == "__main__":
    main()
