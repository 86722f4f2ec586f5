"""The benchmark scripts' shared output helpers (benchmarks/_report.py)."""

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_time_limit_cuts_the_grid_but_the_rows_so_far_are_written(tmp_path):
    """SIGTERM (what `timeout` sends) inside until_stopped ends the loop, and the table of the rows
    measured before it is still written, with a note saying it was cut."""
    code = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(ROOT / "benchmarks")!r})
        from _report import emit, pivot, until_stopped
        rows, notes = [], []
        with until_stopped(notes):
            for i in range(1000):
                rows.append((f"shape {{i}}", False, "fwd", "ours", 1e-3, float(i)))
                if i == 2:
                    os.kill(os.getpid(), signal.SIGTERM)
        emit(pivot(rows, ("shape", "causal", "pass")) + notes, {str(tmp_path / "out.md")!r})
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    text = (tmp_path / "out.md").read_text()
    assert "| shape 2 | False | fwd | 2 |" in text and "shape 3" not in text
    assert text.rstrip().endswith("Cut short by a time limit: the rows above are those measured before it.")


def test_host_overhead_benchmark_runs_on_cpu(tmp_path):
    """benchmarks/host_overhead.py reaches into the kernels' launch tables to stub them on a CPU;
    it must still run there and fill every cell of its table (it asserts nothing about times)."""
    out = tmp_path / "host.md"
    run = subprocess.run([sys.executable, "host_overhead.py", "--quick", "--cpu", "--out", str(out)],
                         cwd=ROOT / "benchmarks", capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [tuple(r.split(" | ")[:2]) for r in rows] == [
        ("| attention varlen", "fwd"), ("| attention varlen", "fwd+bwd"), ("| decode", "fwd"),
        ("| grouped_mm", "fwd"), ("| grouped_mm", "fwd+bwd")]
    for row in rows:
        cells = row.strip("| ").split(" | ")[2:]
        assert len(cells) == 5 and all(float(c) > 0 for c in cells), row
    assert (tmp_path / "host.csv").read_text().count("\n") == 1 + 3 * len(rows)


def test_train_step_benchmark_runs_on_cpu(tmp_path):
    """benchmarks/train_step.py builds a model and a mixed batch itself: on a CPU it must time
    real steps of the tiny preset and fill its row (it asserts nothing about times)."""
    out = tmp_path / "train.md"
    run = subprocess.run([sys.executable, "train_step.py", "--quick", "--preset", "tiny", "--batch", "5",
                          "--out", str(out)], cwd=ROOT / "benchmarks", capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [line for line in out.read_text().splitlines() if line.startswith("| tiny B5 |")]
    assert len(rows) == 1
    tokens, step_ms, per_s, issue_ms = rows[0].strip("| ").split(" | ")[1:5]
    assert int(tokens) > 5 and float(step_ms) > 0 and float(issue_ms) > 0
    per_s = float(per_s.replace(",", ""))
    assert abs(per_s - int(tokens) / float(step_ms) * 1e3) <= 0.01 * per_s
