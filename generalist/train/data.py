"""The data of one training run: each task of a mixture with its train and test examples."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from generalist.data.packing import Example
from generalist.data.tasks import TASKS_DIR, Task, discover


def load_mixtures(path: Path = TASKS_DIR / "mixtures.py") -> dict[str, dict[str, dict]]:
    """MIXTURES from tasks/mixtures.py: {mixture: {task: {"train": n, "test": n}}}."""
    spec = importlib.util.spec_from_file_location("generalist_tasks.mixtures", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.MIXTURES


def get_mixture(name: str) -> dict[str, dict]:
    mixtures = load_mixtures()
    if name not in mixtures:
        raise ValueError(f"unknown mixture {name!r}; known: {sorted(mixtures)}")
    return mixtures[name]


@dataclass
class TaskData:
    task: Task
    train: list[Example]
    test: list[Example]


def build_data(mixture: dict[str, dict], tasks: dict[str, Task] | None = None, seed: int = 0,
               progress: bool = True) -> dict[str, TaskData]:
    """Builds every task's splits (sources are cached on disk after the first time)."""
    tasks = discover() if tasks is None else tasks
    unknown = sorted(set(mixture) - set(tasks))
    if unknown:
        raise ValueError(f"the mixture names unknown tasks {unknown}; known: {sorted(tasks)}")
    out = {}
    for name in tqdm(sorted(mixture), desc="building task data", disable=not progress):
        limits = mixture[name]
        task = tasks[name]
        out[name] = TaskData(task, task.examples("train", limits.get("train"), seed),
                             task.examples("test", limits.get("test"), seed))
    return out
