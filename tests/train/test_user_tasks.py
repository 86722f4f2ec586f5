"""A task and a mixture of the user's own, on GENERALIST_TASKS_PATH: found, and every usual
mistake in them named (task, split, example, metric) before or instead of a deep traceback."""

import math
import warnings

import numpy as np
import pytest
import torch

from generalist.cli import main
from generalist.data.packing import Example
from generalist.data.tasks import Task, discover
from generalist.train.data import TaskData, build_data, check_requires, get_mixture, load_mixtures
from generalist.train.evaluate import check_scores, evaluate

TASK_FILE = '''
from generalist.data.packing import Example
from generalist.data.tasks import Task, how_many

class Reverse(Task):
    name = "reverse"

    def examples(self, split, limit=None, seed=0):
        words = ["red", "cat", "sun", "blue", "dog"]
        out = []
        for i in range(how_many(limit, 40 if split == "train" else 8)):
            text = " ".join(words[(i + j) % 5] for j in range(3))
            out.append(Example([("text", text)], " ".join(reversed(text.split())), self.name))
        return out

TASK = Reverse()
'''


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "reverse.py").write_text(TASK_FILE)
    (folder / "mixtures.py").write_text('MIXTURES = {"mine": {"reverse": {"train": 16, "test": 4}}}\n')
    monkeypatch.setenv("GENERALIST_TASKS_PATH", str(folder))
    return folder


def test_a_mixture_on_the_tasks_path_trains_and_evaluates(user_dir, tmp_path, capsys, monkeypatch):
    assert get_mixture("mine") == {"reverse": {"train": 16, "test": 4}}
    assert "demo" in load_mixtures()  # the project's own still there
    out = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--mixture", "mine", "--steps", "2", "--set", "warmup=1",
                 "--set", "batch_size=4", "--out", str(out)]) == 0
    assert "reverse" in (out / "eval.json").read_text()
    capsys.readouterr()
    # evaluated without the folder on the path: the lost task is named, with the likely cause
    monkeypatch.delenv("GENERALIST_TASKS_PATH")
    assert main(["eval", str(out)]) == 2
    err = capsys.readouterr().err
    assert "trained on 'reverse', which no task file defines here" in err and "GENERALIST_TASKS_PATH" in err


def test_a_mixture_defined_twice_or_broken_is_named(user_dir):
    (user_dir / "mixtures.py").write_text('MIXTURES = {"demo": {"reverse": {}}}\n')
    with pytest.raises(ValueError, match=r"two files define the mixture 'demo': .*tasks/mixtures.py and .*mine/mixtures.py"):
        load_mixtures()
    (user_dir / "mixtures.py").write_text("MIXTURES = [1]\n")
    with pytest.raises(ValueError, match="must define MIXTURES, a dict"):
        load_mixtures()
    (user_dir / "mixtures.py").write_text("MIXTURES = {\n")
    with pytest.raises(ValueError, match="mixtures file .*mixtures.py failed to load: SyntaxError"):
        load_mixtures()
    (user_dir / "mixtures.py").write_text("MIXTURES = {}\n")
    with pytest.raises(ValueError, match=r"unknown mixture 'mine'; known: .* GENERALIST_TASKS_PATH"):
        get_mixture("mine")


class _Made(Task):
    """A task whose examples() returns whatever `make(split)` gives."""
    name = "made"

    def __init__(self, make, generative=True):
        self.make, self.generative = make, generative

    def examples(self, split, limit=None, seed=0):
        return self.make(split)


def _ok(target="yes"):
    return Example([("text", "a question")], target, "made")


@pytest.mark.parametrize("make,match", [
    (lambda s: (e for e in [_ok()]), "train split: examples\\(\\) must return a list of Example, got generator"),
    (lambda s: None, "must return a list of Example, got NoneType"),
    (lambda s: [_ok(), ("text", "x")], "train split, example 1: is a tuple, not an Example"),
    (lambda s: [_ok(7)], "example 0: target_text must be a str, got int"),
    (lambda s: [_ok(" ")], "example 0: target_text is empty, and the task is generative"),
    (lambda s: [Example([("text", "q")], "a")], "its task is 'default' \\(Example's task=\\), which the mixture lacks"),
    (lambda s: [Example([], "a", "made")], "example 0: has no input segments"),
    (lambda s: [Example(["a b"], "a", "made")], "segment 0 must be a \\(modality, data\\) pair, got str"),
    (lambda s: [Example([("txt", "a b")], "a", "made")], "segment 0 has unknown modality 'txt'"),
    (lambda s: [Example([("text", 3)], "a", "made")], "text segment 0 must be a str, got int"),
    (lambda s: [Example([("image", 0), ("text", " ")], "a", "made")], "text segment 1 is empty"),
    (lambda s: [_ok()] * 5, "examples\\(\\) returned 5 examples for limit 2"),
    (lambda s: int("abc"), ": examples\\('train'\\) failed: invalid literal for int"),
])
def test_what_examples_returns_is_checked_when_built(make, match):
    with pytest.raises(ValueError, match="task 'made'.*" + match):
        build_data({"made": {"train": 2}}, {"made": _Made(make)}, progress=False)


def test_an_empty_target_is_fine_where_no_text_head_trains_on_it():
    data = build_data({"made": {}}, {"made": _Made(lambda s: [_ok("")], generative=False)}, progress=False)
    assert len(data["made"].train) == len(data["made"].test) == 1


def test_requires_must_name_known_tasks():
    tasks = discover()
    bad = _Made(lambda s: [])
    tasks["made"] = bad
    bad.requires = ("nosuchtask",)
    with pytest.raises(ValueError, match="answered through 'nosuchtask', which no task file defines"):
        check_requires(["made"], tasks)
    bad.requires = "captions"  # a str, not a tuple: 'c', 'a', 'p', ... before
    with pytest.raises(ValueError, match="requires must be a tuple of task names, got 'captions'"):
        check_requires(["made"], tasks)


@pytest.mark.parametrize("scores,match", [
    ([0.5], "evaluate\\(\\) must return {metric name: number}, got list"),
    ({"accuracy": "good"}, "metric 'accuracy' must be a number, got 'good'"),
    ({"accuracy": torch.ones(2)}, "metric 'accuracy' must be a number"),
    ({"accuracy": True}, "metric 'accuracy' must be a number, got True"),
    ({1: 0.5}, "evaluate\\(\\) returned the metric name 1"),
    ({"accuracy": 0.5, "Accuracy ": 0.7}, "evaluate\\(\\) returned the metrics 'accuracy' and 'Accuracy '"),
])
def test_evaluate_must_return_named_numbers(scores, match):
    with pytest.raises(ValueError, match="task 'made': " + match):
        check_scores("made", scores)


def test_scores_of_every_number_type_are_floats():
    got = check_scores("made", {"a": 1, "b": np.float32(0.5), "c": torch.tensor(0.25), "d": float("nan")})
    assert got["a"] == 1.0 and got["b"] == 0.5 and got["c"] == 0.25 and math.isnan(got["d"])
    assert all(type(v) is float for v in got.values())


def test_evaluate_warns_of_a_task_without_test_examples_and_of_a_nan_metric():
    class Scored(Task):
        name, generative = "scored", True

        def examples(self, split, limit=None, seed=0):
            return []

        def evaluate(self, predictor, examples):
            return {"accuracy": float("nan") if len(examples) == 2 else 0.5, "count": len(examples)}

    one = [Example([("text", "a b")], "b a", "scored")]
    data = {"scored": TaskData(Scored(), one, one * 2), "untested": TaskData(Scored(), one, []),
            "fine": TaskData(Scored(), one, one)}
    with pytest.warns(UserWarning) as caught:
        results = evaluate(None, data, progress=False)
    assert set(results) == {"scored", "fine"} and results["fine"] == {"accuracy": 0.5, "count": 1.0}
    said = [str(w.message) for w in caught]
    assert said == ["untested: no test examples, not evaluated",
                    "metrics that are not finite numbers: scored accuracy = nan"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn of
        evaluate(None, {"fine": data["fine"]}, progress=False)


@pytest.mark.parametrize("name", ["total", "contrastive"])
def test_a_task_may_not_take_a_name_of_the_log(user_dir, name):
    (user_dir / "reverse.py").write_text(TASK_FILE.replace('name = "reverse"', f'name = "{name}"'))
    with pytest.raises(ValueError, match=f"reverse.py: the task name '{name}' is taken by the training log"):
        discover()


def test_a_task_file_may_hold_dataclasses_and_import_a_helper_beside_it(user_dir):
    """A task file runs as a module of its own (dataclasses look it up in sys.modules) with its
    folder on sys.path (a helper file beside it imports; files starting with "_" are no tasks)."""
    import sys

    (user_dir / "_words.py").write_text('WORDS = ["red", "cat", "sun"]\n')
    (user_dir / "reverse.py").write_text("from __future__ import annotations\n" + TASK_FILE.replace(
        "class Reverse(Task):", """from dataclasses import dataclass
from _words import WORDS

@dataclass
class Options:
    n: int = 3

class Reverse(Task):""").replace('words = ["red", "cat", "sun", "blue", "dog"]', "words = WORDS + ['blue', 'dog']"))
    tasks = discover()
    assert tasks["reverse"].examples("test", 2)[0].target_text == "sun cat red"
    assert str(user_dir) not in sys.path and not any(m.startswith("generalist_tasks.") for m in sys.modules)
    sys.modules.pop("_words", None)


def test_a_task_defined_twice_names_both_files_and_a_folder_named_twice_is_read_once(user_dir, tmp_path, monkeypatch):
    import os

    other = tmp_path / "other"
    other.mkdir()
    (other / "again.py").write_text(TASK_FILE)
    monkeypatch.setenv("GENERALIST_TASKS_PATH", os.pathsep.join([str(user_dir), str(other)]))
    with pytest.raises(ValueError, match=r"two task files define the task 'reverse': .*mine/reverse.py and "
                                         r".*other/again.py"):
        discover()
    monkeypatch.setenv("GENERALIST_TASKS_PATH", os.pathsep.join([str(user_dir), f"{user_dir}/"]))
    assert "reverse" in discover() and "mine" in load_mixtures()  # (not "two files define the mixture")


def test_a_mixture_that_gives_no_training_example_is_named(tmp_path):
    import sys
    from pathlib import Path

    from generalist.train.trainer import TrainConfig, Trainer

    sys.path.insert(0, str(Path(__file__).parent))
    import toy_tasks

    data = build_data({"bars": {"train": 0, "test": 2}}, toy_tasks.TASKS, progress=False)
    with pytest.raises(ValueError, match=r"no task of mixture 'demo' gives a training example .*bars.*nothing to train"):
        Trainer(TrainConfig(preset="tiny", out=str(tmp_path / "run"), steps=2, warmup=1), data, progress=False)


def test_a_task_that_trains_on_nothing_is_warned_of(tmp_path):
    import sys
    from pathlib import Path

    from generalist.train.trainer import TrainConfig, Trainer

    sys.path.insert(0, str(Path(__file__).parent))
    import toy_tasks

    data = build_data({"bars": {"train": 4, "test": 2}, "echo": {"train": 0, "test": 2}}, toy_tasks.TASKS,
                      progress=False)
    with pytest.warns(UserWarning, match="'echo' trains on no example \\(the mixture gives it none\\)"):
        Trainer(TrainConfig(preset="tiny", out=str(tmp_path / "run"), steps=2, warmup=1), data, progress=False)
