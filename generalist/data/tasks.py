"""Tasks: what the generalist learns. A task is one file in `tasks/` that defines `TASK`, an
instance of a `Task` subclass: where its data comes from, how a raw sample becomes an `Example`
(segments + target text), its splits, and its metric. Users add a task by adding one file (or
a directory of them on GENERALIST_TASKS_PATH, whose mixtures.py, if any, adds mixtures:
generalist.train.data.load_mixtures).

Evaluation goes through a `Predictor` (generate text, embed examples), so tasks never touch
the model's internals.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Protocol, Sequence

import torch

from generalist._fields import check_count
from generalist.data.packing import Example
from generalist.metrics import check_pairs, normalize_text

SPLITS = ("train", "test")
RESERVED_NAMES = ("contrastive", "total")  # the training log's loss entries beside the tasks' own
TASKS_DIR = Path(__file__).resolve().parents[2] / "tasks"


class Predictor(Protocol):
    def generate(self, examples: Sequence[Example]) -> list[str]: ...
    def embed(self, examples: Sequence[Example]) -> torch.Tensor: ...  # (B, E), unit norm


class Task(ABC):
    name: str = ""
    contrastive: bool = False  # train the contrastive head on (non-text segments, target text) pairs
    generative: bool = True  # train the text head on target_text
    requires: tuple[str, ...] = ()  # tasks a mixture must hold too (those this one is evaluated through)

    @abstractmethod
    def examples(self, split: str, limit: int | None = None, seed: int = 0) -> list[Example]:
        """Deterministic examples of `split` ("train" or "test"); at most `limit` of them."""

    def evaluate(self, predictor: Predictor, examples: Sequence[Example]) -> dict[str, float]:
        """Default: generate text and score it with `score`."""
        return self.score(predictor.generate(examples), examples)

    def answer(self, predictor: Predictor, examples: Sequence[Example]) -> list[str]:
        """What `Generalist.predict` answers for these examples when the task is not generative
        (a generative task's answer is the generated text): a task trained through the
        contrastive head alone says here how its embeddings become an answer (zero_shot: the
        nearest class prompt)."""
        raise ValueError(f"task {self.name!r} does not answer in text (it is not generative) and its file defines no "
                         "answer(); rank labels through the contrastive head with Generalist.classify instead")

    def score(self, predictions: Sequence[str], examples: Sequence[Example]) -> dict[str, float]:
        """Default metric: exact-match accuracy of the normalised text."""
        hits = [normalize(p) == normalize(e.target_text) for p, e in self.pairs(predictions, examples)]
        return {"accuracy": sum(hits) / len(hits)}

    def matches(self, answer: str, example: Example) -> bool:
        """Whether `answer` counts as right for `example` in predictions.jsonl and the report: by
        default the normalised text equals the target. A task whose metric forgives more (captions'
        `exact`) says so here, so the report's right and wrong agree with its metric table."""
        return normalize(answer) == normalize(example.target_text)

    def pairs(self, predictions: Sequence[str], examples: Sequence[Example]) -> list[tuple[str, Example]]:
        """(prediction, example) pairs for a score, checked as the metrics check theirs: as many
        predictions as examples, at least one (an accuracy of 0.0 would read as a score), every
        prediction a str."""
        check_pairs(predictions, [e.target_text for e in examples], f"task {self.name!r}")
        return list(zip(predictions, examples))


def normalize(text: str) -> str:
    """The one text normalisation every metric compares by (generalist.metrics.normalize_text):
    lower case, single spaces, one trailing period dropped."""
    return normalize_text(text)


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")


def split_indices(n: int, split: str, test_fraction: float, seed: int) -> "np.ndarray":
    """A fixed, seeded partition of range(n) into train and test (disjoint, together all of n):
    the same seed always gives the same partition, whatever `limit` a caller uses."""
    import numpy as np

    check_split(split)
    order = np.random.default_rng([seed, n, 1_000_003]).permutation(n)
    n_test = int(round(n * test_fraction))
    return order[:n_test] if split == "test" else order[n_test:]


def mnist_split(split: str, seed: int):
    """(images, labels, indices of `split`): the one seeded 80/20 split of MNIST-5k that every
    digit task shares, so no task trains on another task's test digits."""
    from generalist.data import sources

    images, labels = sources.mnist5k()
    return images, labels, split_indices(len(images), split, 0.2, seed)


def check_limit(limit) -> int | None:
    """`limit` as `Task.examples` takes it: None (all) or an int >= 0."""
    return None if limit is None else check_count("limit (None for all)", limit, 0)


def how_many(limit: int | None, n: int) -> int:
    """The number of examples a task that makes them one by one makes: `limit`, or n if None."""
    limit = check_limit(limit)
    return n if limit is None else limit


def take(indices, limit: int | None):
    """The first `limit` of `indices` (all if None)."""
    limit = check_limit(limit)
    return indices if limit is None else indices[:limit]


def _task_dirs() -> list[Path]:
    """The project's tasks/ (when this is a checkout, not an installed wheel without it) and the
    folders on GENERALIST_TASKS_PATH, which must exist."""
    extra = [Path(p) for p in os.environ.get("GENERALIST_TASKS_PATH", "").split(os.pathsep) if p]
    for directory in extra:
        if not directory.is_dir():
            raise ValueError(f"GENERALIST_TASKS_PATH names {directory}, which is not a directory")
    dirs = ([TASKS_DIR] if TASKS_DIR.is_dir() else []) + extra
    seen = set()  # a folder named twice (or the project's own tasks/ on the path) is read once
    return [d for d in dirs if not (d.resolve() in seen or seen.add(d.resolve()))]


def load_file(path: Path, what: str):
    """The module that the Python file `path` makes, run apart (never imported by name, so never
    cached); one that fails to load is a ValueError naming it as `what` ("task file"). While it
    runs it is in sys.modules (dataclasses look their module up there) and its folder is on
    sys.path (so it can import a helper file beside it, `_common.py` say)."""
    name = f"generalist_tasks.{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    before, folder = sys.modules.get(name), str(Path(path).resolve().parent)
    sys.modules[name] = module
    sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        raise ValueError(f"{what} {path} failed to load: {type(error).__name__}: {error}") from error
    finally:
        sys.path.remove(folder)
        if before is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = before
    return module


def discover() -> dict[str, Task]:
    """Every task file's TASK, by name (files starting with "_" and mixtures.py are skipped). A
    file that fails to load is a ValueError naming it; so is a directory on GENERALIST_TASKS_PATH
    that does not exist."""
    found: dict[str, Task] = {}
    where: dict[str, Path] = {}
    for directory in _task_dirs():
        for path in sorted(directory.glob("*.py")):
            if path.name.startswith("_") or path.stem == "mixtures":
                continue
            task = getattr(load_file(path, "task file"), "TASK", None)
            if not isinstance(task, Task):
                raise ValueError(f"{path} must define TASK, an instance of generalist.data.tasks.Task")
            if not isinstance(task.name, str) or not task.name:
                raise ValueError(f"{path}: its TASK has no name (set the class attribute `name`)")
            if task.name in RESERVED_NAMES:
                raise ValueError(f"{path}: the task name {task.name!r} is taken by the training log (its "
                                 f"{'contrastive loss' if task.name == 'contrastive' else 'total loss'}); choose another")
            if task.name in found:
                raise ValueError(f"two task files define the task {task.name!r}: {where[task.name]} and {path}")
            found[task.name], where[task.name] = task, path
    return found


def get_task(name: str) -> Task:
    tasks = discover()
    if name not in tasks:
        raise ValueError(f"unknown task {name!r}; known tasks: {sorted(tasks)}")
    return tasks[name]
