"""Per-task evaluation on held-out splits: every task scores itself through the Predictor."""

from __future__ import annotations

import json
import math
from pathlib import Path

from tqdm import tqdm

from generalist.train.data import TaskData


def evaluate(predictor, data: dict[str, TaskData], progress: bool = True) -> dict[str, dict[str, float]]:
    results = {}
    for name in tqdm(sorted(data), desc="evaluate", disable=not progress):
        td = data[name]
        if td.test:
            results[name] = {k: float(v) for k, v in td.task.evaluate(predictor, td.test).items()}
    return results


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
