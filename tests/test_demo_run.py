"""A short real run of the main job (marked slow: ~15 minutes on 2 CPU cores): the demo preset
on the demo mixture must beat chance by a wide margin on every task it trains on."""

import json

import pytest

from generalist.cli import main

# task -> (metric, chance level); the run must reach at least 2x chance (+0.1 for near-1/2 chances).
CHANCE = {
    "fashion": ("accuracy", 0.10),
    "digits": ("accuracy", 0.10),
    "spoken_digits": ("accuracy", 0.10),
    "av_digits": ("accuracy", 0.10),
    "moving_digits": ("digit_accuracy", 0.10),
    "vqa": ("accuracy", 0.15),
    "text_topic": ("accuracy", 1 / 6),
    "tabular": ("accuracy", 0.40),
    "table_image": ("accuracy", 0.10),
    "captions": ("r_at_5", 0.02),
}


@pytest.mark.slow
def test_short_demo_run_beats_chance(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["train", "--preset", "demo", "--mixture", "demo", "--out", str(out), "--max-minutes", "10"]) == 0
    results = json.loads((out / "eval.json").read_text())
    misses = {task: (results[task][metric], chance) for task, (metric, chance) in CHANCE.items()
              if not results[task][metric] >= min(2 * chance, chance + 0.25)}
    assert not misses, f"tasks at chance level: {misses}"
    assert (out / "report.html").is_file()
