"""Per-task evaluation on held-out splits: every task scores itself through the Predictor."""

from __future__ import annotations

import json
import math
import numbers
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

from generalist.train.data import TaskData


def evaluate(predictor, data: dict[str, TaskData], progress: bool = True) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} for every task with test examples; a task without any, and a
    metric that is not a finite number (NaN, inf), is warned of by name."""
    results = {}
    for name in tqdm(sorted(data), desc="evaluate", disable=not progress):
        td = data[name]
        if td.test:
            results[name] = check_scores(name, td.task.evaluate(predictor, td.test))
    untested = sorted(set(data) - set(results))
    if untested:
        warnings.warn(f"{', '.join(untested)}: no test examples, not evaluated", stacklevel=2)
    nonfinite = [f"{t} {m} = {v}" for t, metrics in sorted(results.items()) for m, v in metrics.items()
                 if not math.isfinite(v)]
    if nonfinite:
        warnings.warn(f"metrics that are not finite numbers: {'; '.join(nonfinite)}", stacklevel=2)
    return results


def check_scores(task: str, scores) -> dict[str, float]:
    """A task's evaluate() result as {metric: float}; anything but {non-empty str: real number}
    (a bool is no score), or two metrics named alike but for spaces and case, is a ValueError
    naming the task and metric."""
    if not isinstance(scores, dict):
        raise ValueError(f"task {task!r}: evaluate() must return {{metric name: number}}, got {type(scores).__name__}")
    out, seen = {}, {}
    for key, value in scores.items():
        if not isinstance(key, str) or not key.strip():
            raise ValueError(f"task {task!r}: evaluate() returned the metric name {key!r}; names are non-empty str")
        if key.strip().lower() in seen:
            raise ValueError(f"task {task!r}: evaluate() returned the metrics {seen[key.strip().lower()]!r} and {key!r}")
        seen[key.strip().lower()] = key
        if isinstance(value, bool) or not isinstance(value, numbers.Real) and not (
                isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_complex):
            raise ValueError(f"task {task!r}: metric {key!r} must be a number, got {value!r:.60}")
        out[key] = float(value)
    return out


def format_table(results: dict[str, dict[str, float]]) -> str:
    rows = [(task, metric, value) for task, metrics in sorted(results.items()) for metric, value in metrics.items()]
    if not rows:
        return "(no tasks with test examples)"
    w1 = max(len("task"), *(len(r[0]) for r in rows))
    w2 = max(len("metric"), *(len(r[1]) for r in rows))
    lines = [f"{'task':<{w1}}  {'metric':<{w2}}  value", f"{'-' * w1}  {'-' * w2}  -----"]
    lines += [f"{t:<{w1}}  {m:<{w2}}  {v:.3f}" for t, m, v in rows]
    return "\n".join(lines)


def write_results(run_dir: Path, results: dict, name: str = "eval.json") -> Path:
    """run_dir/name (eval.json); a metric that is not a finite number (a NaN) is written as null,
    so the file stays JSON that any reader parses."""
    path = Path(run_dir) / name
    finite = {task: {m: v if math.isfinite(v) else None for m, v in metrics.items()} for task, metrics in results.items()}
    path.write_text(json.dumps(finite, indent=2, sort_keys=True, allow_nan=False))
    return path
