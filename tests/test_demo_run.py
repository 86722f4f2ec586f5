"""A short real run of the main job (marked slow: ~15 minutes on 2 CPU cores): the demo preset
on the demo mixture must beat chance by a wide margin on every task it trains on."""

import json

import pytest

from generalist.cli import main

# task -> (metric, chance level, floor). The floors sit about halfway between chance and what a
# 12-minute `make demo` reached on 2 CPU cores on 2026-11-27 (README, "What `make demo`
# reaches"); this run trains 10 minutes.
FLOORS = {
    "fashion": ("accuracy", 0.10, 0.35),
    "digits": ("accuracy", 0.10, 0.35),
    "spoken_digits": ("accuracy", 0.10, 0.40),
    "av_digits": ("accuracy", 0.10, 0.40),
    "moving_digits": ("digit_accuracy", 0.10, 0.18),  # direction varies most from run to run (README)
    "vqa": ("accuracy", 0.15, 0.21),
    "text_topic": ("accuracy", 1 / 6, 0.28),
    "tabular": ("accuracy", 0.40, 0.65),
    "table_image": ("accuracy", 0.10, 0.16),
}


@pytest.mark.slow
def test_short_demo_run_beats_chance(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["train", "--preset", "demo", "--mixture", "demo", "--out", str(out), "--steps", "100000",
                 "--max-minutes", "10"]) == 0
    results = json.loads((out / "eval.json").read_text())
    misses = {task: (metric, results[task][metric], floor) for task, (metric, chance, floor) in FLOORS.items()
              if not results[task][metric] >= floor}
    assert not misses, f"tasks below their floor (metric, value, floor): {misses}"
    assert (out / "report.html").is_file()
