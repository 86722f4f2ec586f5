"""Per-task evaluation on held-out splits: every task scores itself through the Predictor."""

from __future__ import annotations

import json
import math
import numbers
import warnings
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

from generalist.data.packing import Example
from generalist.data.tasks import Task, normalize
from generalist.train.checkpoint import replace_file
from generalist.train.data import TaskData


def evaluate(predictor, data: dict[str, TaskData], progress: bool = True,
             answers: dict[str, list[str]] | None = None) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} for every task with test examples; a task without any, and a
    metric that is not a finite number (NaN, inf), is warned of by name.

    `answers`, when a dict, receives {task: what `Generalist.predict` answers for each test
    example}: the decoded text of a generative task (decoded once: the task's own evaluate() gets
    the same texts back when it generates for its test examples), `Task.answer` of one that is
    not (a task that defines none has no entry)."""
    results = {}
    for name in tqdm(sorted(data), desc="evaluate", disable=not progress):
        td = data[name]
        if not td.test:
            continue
        scorer = predictor
        if answers is not None and (said := task_answers(td.task, predictor, td.test)) is not None:
            answers[name] = said
            if td.task.generative:
                scorer = Answered(predictor, td.test, said)
        results[name] = check_scores(name, td.task.evaluate(scorer, td.test))
    untested = sorted(set(data) - set(results))
    if untested:
        warnings.warn(f"{', '.join(untested)}: no test examples, not evaluated", stacklevel=2)
    nonfinite = [f"{t} {m} = {v}" for t, metrics in sorted(results.items()) for m, v in metrics.items()
                 if not math.isfinite(v)]
    if nonfinite:
        warnings.warn(f"metrics that are not finite numbers: {'; '.join(nonfinite)}", stacklevel=2)
    return results


def task_answers(task: Task, predictor, examples: Sequence[Example]) -> list[str] | None:
    """What `Generalist.predict` answers for each of `examples` (see `evaluate`); None for a task
    that neither generates nor defines `answer`. Anything but one str per example is a ValueError
    naming the task."""
    if task.generative:
        said = predictor.generate(examples)
    elif type(task).answer is Task.answer:
        return None
    else:
        said = task.answer(predictor, examples)
    if not isinstance(said, (list, tuple)) or len(said) != len(examples) or not all(isinstance(a, str) for a in said):
        what = f"{len(said)} items" if isinstance(said, (list, tuple)) else type(said).__name__
        raise ValueError(f"task {task.name!r}: {'generate' if task.generative else 'answer'}() must give one str per "
                         f"example ({len(examples)}); got {what}")
    return list(said)


class Answered:
    """`predictor` with the answers to one list of examples already decoded: the first `generate`
    of those very examples (the same objects, in order, with no other arguments) gives the
    answers back instead of decoding again; every later call (the task may have changed the
    examples in place since), and everything else, goes to `predictor`."""

    def __init__(self, predictor, examples: Sequence[Example], answers: list[str]):
        self._predictor, self._examples, self._answers = predictor, list(examples), answers

    def generate(self, examples: Sequence[Example], *args, **kwargs) -> list[str]:
        if self._answers is not None and not args and not kwargs and len(examples) == len(self._examples) and all(
                a is b for a, b in zip(examples, self._examples)):
            answers, self._answers = self._answers, None
            return list(answers)
        return self._predictor.generate(examples, *args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._predictor, name)


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
    replace_file(path, json.dumps(finite, indent=2, sort_keys=True, allow_nan=False))  # (a kill leaves one whole)
    return path


def input_summary(segments) -> list[str]:
    """A few words per segment for predictions.jsonl: a text itself (its first 300 characters),
    a file's name, or the modality and shape of an array ("image 28x28", "audio 0.54 s at
    16000 Hz", "table 2 columns")."""
    out = []
    for modality, value in segments:
        if isinstance(value, str) and modality == "text":
            out.append(value if len(value) <= 300 else value[:299] + "…")
        elif isinstance(value, (str, Path)):
            out.append(f"{modality} {value}")
        elif modality == "audio" and isinstance(value, tuple) and len(value) == 2 and hasattr(value[0], "shape") \
                and isinstance(value[1], numbers.Real) and value[1] > 0:
            out.append(f"{modality} {len(value[0]) / value[1]:.2f} s at {value[1]:g} Hz")
        elif modality == "table" and isinstance(value, tuple) and len(value) == 2 and hasattr(value[0], "__len__"):
            out.append(f"{modality} {len(value[0])} columns")
        elif hasattr(value, "shape"):
            out.append(f"{modality} {'x'.join(map(str, tuple(value.shape)))}")
        else:
            out.append(modality)
    return out


def answer_records(data: dict[str, TaskData], answers: dict[str, list[str]]) -> dict[str, list[dict]]:
    """{task: one record per test example}: its index in the test split, a summary of its inputs,
    target, answer, and whether the answer is the target (both normalized)."""
    return {task: [{"index": i, "inputs": input_summary(e.segments), "target": e.target_text, "answer": a,
                    "match": bool(data[task].task.matches(a, e))}
                   for i, (e, a) in enumerate(zip(data[task].test, said))]
            for task, said in answers.items()}


def write_predictions(run_dir: Path, records: dict[str, list[dict]], name: str = "predictions.jsonl") -> Path:
    """run_dir/name: `answer_records` as JSON lines, each with its task, written whole or not at all."""
    from generalist.train.checkpoint import replace_file

    lines = [json.dumps({"task": task, **r}, ensure_ascii=False) for task, rows in sorted(records.items()) for r in rows]
    path = Path(run_dir) / name
    replace_file(path, "".join(line + "\n" for line in lines))
    return path


def read_predictions(path: Path) -> dict[str, list[dict]]:
    """predictions.jsonl's records by task, in test order; a line that is not a whole record (one
    edited by hand) is left out."""
    out: dict[str, list[dict]] = {}
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if isinstance(r, dict) and isinstance(r.get("task"), str) and isinstance(r.get("index"), int) \
                and isinstance(r.get("target"), str) and isinstance(r.get("answer"), str):
            r["match"] = r.get("match") is True
            r["inputs"] = r["inputs"] if isinstance(r.get("inputs"), list) else []
            out.setdefault(r["task"], []).append(r)
    return {task: sorted(rows, key=lambda r: r["index"]) for task, rows in out.items()}
