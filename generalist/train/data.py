"""The data of one training run: each task of a mixture with its train and test examples."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from generalist.data.packing import Example, segment_problem
from generalist.data.tasks import Task, _task_dirs, check_limit, discover, load_file


def load_mixtures(path: Path | None = None) -> dict[str, dict[str, dict]]:
    """MIXTURES, {mixture: {task: {"train": n, "test": n}}}, of the mixtures.py in tasks/ and in
    each folder on GENERALIST_TASKS_PATH that has one (or of the file `path` alone). A file that
    fails to load, or a mixture two files define, is a ValueError naming them."""
    paths = [path] if path is not None else [d / "mixtures.py" for d in _task_dirs() if (d / "mixtures.py").is_file()]
    found: dict[str, dict] = {}
    where: dict[str, Path] = {}
    for file in paths:
        mixtures = getattr(load_file(file, "mixtures file"), "MIXTURES", None)
        if not isinstance(mixtures, dict) or not all(isinstance(m, str) for m in mixtures):
            raise ValueError(f"{file} must define MIXTURES, a dict {{mixture name: {{task: {{'train': n, 'test': n}}}}}}")
        for name, mixture in mixtures.items():
            if name in found:
                raise ValueError(f"two files define the mixture {name!r}: {where[name]} and {file}")
            found[name], where[name] = mixture, file
    return found


def get_mixture(name: str) -> dict[str, dict]:
    """Mixture `name` (`load_mixtures`), checked (`check_mixture`, `check_requires`)."""
    mixtures = load_mixtures()
    if name not in mixtures:
        raise ValueError(f"unknown mixture {name!r}; known: {sorted(mixtures)} (from tasks/mixtures.py and the "
                         "mixtures.py of each folder on GENERALIST_TASKS_PATH)")
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


def check_requires(names, tasks: dict[str, Task], every_task: bool = True) -> None:
    """The tasks `names` (of one model) hold every task that one of them requires (`Task.requires`:
    zero_shot is answered as captions, so a model trained without captions cannot answer it).
    `every_task`: `tasks` holds every task there is, so a required task not in it does not exist."""
    for name in names:
        requires = tasks[name].requires
        if not isinstance(requires, (tuple, list)) or not all(isinstance(t, str) for t in requires):
            raise ValueError(f"task {name!r}: requires must be a tuple of task names, got {requires!r}")
        unknown = [t for t in requires if t not in tasks] if every_task else []
        if unknown:
            raise ValueError(f"task {name!r} is answered through {', '.join(map(repr, unknown))}, which no task file "
                             f"defines; known: {sorted(tasks)}")
        missing = [t for t in requires if t not in names]
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
        task, splits = tasks[name], {}
        for split in ("train", "test"):
            limit = mixture[name].get(split)
            try:
                examples = task.examples(split, limit, seed)
            except ValueError as error:  # (other errors keep their traceback, into the task's code)
                raise ValueError(f"task {name!r}: examples({split!r}) failed: {error}") from error
            splits[split] = check_examples(task, split, examples, limit, set(mixture))
        out[name] = TaskData(task, splits["train"], splits["test"])
    return out


def check_examples(task: Task, split: str, examples, limit: int | None, names: set[str]) -> list[Example]:
    """What a task's `examples(split, limit)` returned, checked before anything trains on it: a
    list of at most `limit` Examples, each of a task in `names` or of one the task `requires`,
    with (modality, data) segments (text data a non-empty str) and a str target, non-empty for a
    generative task. Else a ValueError naming the task, split and example. Returns the list."""
    where = f"task {task.name!r}, {split} split"
    requires = set(task.requires) if isinstance(task.requires, (tuple, list)) else set()  # (zero_shot's are captions')
    if not isinstance(examples, list):
        raise ValueError(f"{where}: examples() must return a list of Example, got {type(examples).__name__}")
    if limit is not None and len(examples) > limit:
        raise ValueError(f"{where}: examples() returned {len(examples)} examples for limit {limit}")
    for i, ex in enumerate(examples):
        problem = None
        if not isinstance(ex, Example):
            problem = f"is a {type(ex).__name__}, not an Example"
        elif not isinstance(ex.target_text, str):
            problem = f"target_text must be a str, got {type(ex.target_text).__name__}"
        elif task.generative and not ex.target_text.strip():
            problem = ("target_text is empty, and the task is generative (its text head trains on targets, and its "
                       "answers are scored against them)")
        elif ex.task not in names and ex.task not in requires:
            problem = (f"its task is {ex.task!r} (Example's task=), which the mixture lacks" if isinstance(ex.task, str)
                       else f"its task must be a str, got {type(ex.task).__name__}")
        elif not isinstance(ex.segments, (list, tuple)) or not ex.segments:
            problem = "has no input segments (a list of (modality, data) pairs)"
        else:
            for j, seg in enumerate(ex.segments):
                problem = segment_problem(j, seg) or (f"text segment {j} is empty" if seg[0] == "text"
                                                      and not seg[1].strip() else None)
                if problem:
                    break
        if problem:
            raise ValueError(f"{where}, example {i}: {problem}")
    return examples
