"""The data of one training run: each task of a mixture with its train and test examples."""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from generalist.data.packing import Example
from generalist.data.tasks import TASKS_DIR, Task, check_limit, discover


def load_mixtures(path: Path = TASKS_DIR / "mixtures.py") -> dict[str, dict[str, dict]]:
    """MIXTURES from tasks/mixtures.py: {mixture: {task: {"train": n, "test": n}}}."""
    spec = importlib.util.spec_from_file_location("generalist_tasks.mixtures", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.MIXTURES


def get_mixture(name: str) -> dict[str, dict]:
    """Mixture `name` of tasks/mixtures.py, checked (`check_mixture`, `check_requires`)."""
    mixtures = load_mixtures()
    if name not in mixtures:
        raise ValueError(f"unknown mixture {name!r}; known: {sorted(mixtures)}")
    tasks = discover()
    try:
        check_mixture(mixtures[name], tasks)
        check_requires(mixtures[name], tasks)
    except ValueError as error:
        raise ValueError(f"mixture {name!r}: {error}") from None
    return mixtures[name]


@dataclass
class TaskData:
    task: Task
    train: list[Example]
    test: list[Example]


SPLIT_PREFIX = 50  # test examples a split's fingerprint reads


def split_fingerprint(examples: list[Example]) -> dict:
    """{"n", "sha256"} of the target texts of a split's first SPLIT_PREFIX examples (a split
    limited to fewer starts with the same ones): a run records its test splits' fingerprints, so
    that an evaluation notices a task whose test split changed since (new task data, a new way
    of splitting), whose figures are then not comparable with the run's, nor sure to be held out."""
    n = min(SPLIT_PREFIX, len(examples))
    text = "\x00".join(ex.target_text for ex in examples[:n])
    return {"n": n, "sha256": hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]}


def changed_splits(data: dict[str, "TaskData"], recorded: dict) -> list[str]:
    """The tasks of `data` whose test split does not begin as the `recorded` fingerprints say
    (tasks without a record, or with fewer test examples than it read, are not compared)."""
    changed = []
    for t, d in data.items():
        saved = recorded.get(t) if isinstance(recorded, dict) else None
        if isinstance(saved, dict) and isinstance(saved.get("n"), int) and len(d.test) >= saved["n"] > 0:
            if split_fingerprint(d.test[:saved["n"]]) != saved:
                changed.append(t)
    return changed


def check_mixture(mixture: dict[str, dict], tasks: dict[str, Task]) -> None:
    """A mixture names known tasks, each with {"train": limit, "test": limit} (either may be left
    out: all examples); else a ValueError naming what."""
    if not isinstance(mixture, dict) or not mixture:
        raise ValueError(f"a mixture maps task names to their limits, got {mixture!r}")
    unknown = sorted(set(mixture) - set(tasks))
    if unknown:
        raise ValueError(f"the mixture names unknown tasks {unknown}; known: {sorted(tasks)}")
    for name, limits in mixture.items():
        if not isinstance(limits, dict) or not set(limits) <= {"train", "test"}:
            raise ValueError(f"mixture entry {name!r} must be {{'train': limit, 'test': limit}}, got {limits!r}")
        for split, limit in limits.items():
            try:
                check_limit(limit)
            except ValueError as error:
                raise ValueError(f"mixture entry {name!r}, {split}: {error}") from None


def check_requires(names, tasks: dict[str, Task]) -> None:
    """The tasks `names` (of one model) hold every task that one of them requires (`Task.requires`:
    zero_shot is answered as captions, so a model trained without captions cannot answer it)."""
    for name in names:
        missing = [t for t in tasks[name].requires if t not in names]
        if missing:
            raise ValueError(f"task {name!r} is answered through {', '.join(map(repr, missing))}, which the mixture "
                             "lacks: add it to the mixture")


def build_data(mixture: dict[str, dict], tasks: dict[str, Task] | None = None, seed: int = 0,
               progress: bool = True) -> dict[str, TaskData]:
    """Builds every task's splits (sources are cached on disk after the first time)."""
    tasks = discover() if tasks is None else tasks
    check_mixture(mixture, tasks)
    out = {}
    for name in tqdm(sorted(mixture), desc="building task data", disable=not progress):
        limits = mixture[name]
        task = tasks[name]
        out[name] = TaskData(task, task.examples("train", limits.get("train"), seed),
                             task.examples("test", limits.get("test"), seed))
    return out
