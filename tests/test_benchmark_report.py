"""The benchmark scripts' shared output helpers (benchmarks/_report.py)."""

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _grid(tmp_path, name: str, stop: str):
    """Runs a grid of rows named `name` {i} inside until_stopped, which `stop` (code run after
    row 2) ends, then emits the table and CSV to tmp_path/out.* and exits with exit_status()."""
    code = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(ROOT / "benchmarks")!r})
        from _report import emit, exit_status, pivot, until_stopped
        rows, notes = [], []
        with until_stopped(notes):
            for i in range(1000):
                rows.append((f"{name} {{i}}", False, "fwd", "ours", 1e-3, float(i)))
                if i == 2:
                    {stop}
        emit(pivot(rows, ("shape", "causal", "pass")) + notes, {str(tmp_path / "out.md")!r},
             "shape,causal,pass,provider,s,tflops", rows)
        sys.exit(exit_status())
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    return run, (tmp_path / "out.md").read_text()


def test_a_time_limit_cuts_the_grid_but_the_rows_so_far_are_written(tmp_path):
    """SIGTERM (what `timeout` sends) inside until_stopped ends the loop, and the table of the rows
    measured before it is still written, with a note saying it was cut."""
    run, text = _grid(tmp_path, "shape", "os.kill(os.getpid(), signal.SIGTERM)")
    assert run.returncode == 0, run.stderr
    assert "| shape 2 | False | fwd | 2 |" in text and "shape 3" not in text
    assert text.rstrip().endswith("Cut short by a time limit: the rows above are those measured before it.")


def test_an_error_keeps_the_rows_so_far_and_fails_the_script(tmp_path):
    """An exception inside until_stopped (a compile that fails on some machine) still writes the
    rows measured before it, with a note, its traceback, and exit status 1; the CSV quotes the
    names that hold commas."""
    import csv

    run, text = _grid(tmp_path, "dx+dw, one after the other", "raise RuntimeError('the compile failed')")
    assert run.returncode == 1 and "RuntimeError: the compile failed" in run.stderr
    assert "| dx+dw, one after the other 2 | False | fwd | 2 |" in text
    assert text.rstrip().endswith("Stopped by an error (RuntimeError: the compile failed): the rows above are those "
                                  "measured before it.")
    with open(tmp_path / "out.csv", newline="") as f:
        table = list(csv.reader(f))
    assert table[0] == ["shape", "causal", "pass", "provider", "s", "tflops"] and len(table) == 4
    assert all(len(r) == 6 for r in table) and table[1][0] == "dx+dw, one after the other 0"


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
    real steps of the tiny preset and fill its three rows (it asserts nothing about times)."""
    out = tmp_path / "train.md"
    run = subprocess.run([sys.executable, "train_step.py", "--quick", "--preset", "tiny", "--batch", "5",
                          "--compile", "--out", str(out)], cwd=ROOT / "benchmarks", capture_output=True, text=True,
                         timeout=400)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = out.read_text().splitlines()
    # segments prepared once, as the trainer keeps them; from raw data; prepared, the blocks compiled
    assert any(line.startswith("The compiled row's first step, which compiles: ") for line in lines)
    for kind in ("prepared", "raw", "compiled"):
        rows = [line for line in lines if line.startswith(f"| tiny B5 {kind} |")]
        assert len(rows) == 1, kind
        tokens, step_ms, per_s, issue_ms = rows[0].strip("| ").split(" | ")[1:5]
        assert int(tokens) > 5 and float(step_ms) > 0 and float(issue_ms) > 0
        per_s = float(per_s.replace(",", ""))
        assert abs(per_s - int(tokens) / float(step_ms) * 1e3) <= 0.01 * per_s


def _moe_benchmark():
    import importlib

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module("moe")
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_moe_roofline_floors_each_kernel_by_its_flops_or_its_bytes():
    """A kernel's floor is the larger of the dense matmul's time for its shape and its bytes over
    the bandwidth; the three together add their floors and times."""
    moe = _moe_benchmark()
    t, d, f, e = 1000, 64, 32, 8
    assert moe.kernel_bytes(t, d, f, e, 2) == 2 * (t * d + t * f + e * d * f)
    shape = "s"
    rows = [(shape, 200, "fwd", "triton", 4e-3, 0.0), (shape, 200, "fwd", "dense", 1e-3, 0.0),
            (shape, 200, "dw", "triton", 2e-3, 0.0), (shape, 200, "dw", "dense", 1e-3, 0.0)]
    nbytes = moe.kernel_bytes(t, d, f, e, 2)
    bandwidth = nbytes / 2e-3  # fwd's bytes take 2 ms: its floor is the byte floor, 2 ms of 4
    lines = moe.roofline_lines(rows, {shape: (t, d, f, e)}, bandwidth)
    table = {tuple(c.strip() for c in line.strip("|").split("|"))[1]: line for line in lines if line.startswith("| s |")}
    assert set(table) == {"fwd", "dw", "the three"}
    assert table["fwd"].rstrip().endswith("| 4.000 | 1.000 | 2.000 | 50% |")
    assert table["dw"].rstrip().endswith("| 2.000 | 1.000 | 2.000 | 100% |")  # same bytes as fwd here
    assert table["the three"].rstrip().endswith("| 6.000 | 2.000 | 4.000 | 67% |")

    # dx and dw side by side: one floor for both, their FLOPs (1 + 1 ms dense) or their bytes (2 + 2 ms)
    rows += [(shape, 200, "dx", "dense", 1e-3, 0.0), (shape, 200, "dx+dw, side by side", "triton", 5e-3, 0.0)]
    lines = moe.roofline_lines(rows, {shape: (t, d, f, e)}, bandwidth)
    both = [line for line in lines if line.startswith("| s | dx+dw side by side |")]
    assert len(both) == 1 and both[0].rstrip().endswith("| 5.000 | 2.000 | 4.000 | 80% |")
    bandwidth *= 4  # bytes in 1 ms: the FLOPs' 2 ms are the floor
    both = [line for line in moe.roofline_lines(rows, {shape: (t, d, f, e)}, bandwidth) if "side by side" in line]
    assert both[0].rstrip().endswith("| 5.000 | 2.000 | 1.000 | 40% |")


def test_moe_kernels_counts_the_matmuls_a_row_times():
    moe = _moe_benchmark()
    assert [moe.kernels_in(p) for p in ("fwd", "dw, gradient in L2", "dx+dw, side by side", "dx+dw, one after the other",
                                        "fwd+dx+dw", "autograd fwd+bwd", "autograd fwd",
                                        "autograd fwd+bwd, one thread")] == [1, 1, 2, 2, 3, 3, 1, 3]


def test_moe_host_profile_names_where_the_time_goes():
    """--kernels profiles the autograd call's host side: the table ranks functions by their own
    time per call, so a slow helper inside the call comes first, with its calls per call; the
    backward runs on the calling thread there, with the same gradients."""
    import time

    import torch

    moe = _moe_benchmark()
    w = torch.randn(3, 4, requires_grad=True)

    def slow_helper():
        time.sleep(0.002)

    def step():
        slow_helper()
        slow_helper()
        moe._one_thread(lambda: (w * 2).sum().backward())

    lines = moe._host_profile(step, (w,), "a test", calls=5, top=3)
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| function")]
    assert len(rows) == 3 and "a test: 5 calls" in "".join(lines)
    first = rows[0].split(" | ")
    assert "sleep" in first[0] and first[3].rstrip(" |") == "2"  # time.sleep, twice a call
    assert float(first[1]) > 3000  # two 2 ms sleeps a call, in microseconds
    assert torch.equal(w.grad, torch.full((3, 4), 2.0))


def test_moe_ncu_summary_reads_a_raw_report(tmp_path):
    """--ncu-summary turns ncu's raw CSV page (names, units, one row per launch) into a table of
    the chosen metrics per launch, in the order --ncu launched them, and the largest stalls."""
    moe = _moe_benchmark()
    header = ["ID", "Kernel Name", "gpu__time_duration.sum", "dram__throughput.avg.pct_of_peak_sustained_elapsed",
              "sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active",
              "smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio",
              "smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio"]
    units = ["", "", "usecond", "%", "%", "ratio", "ratio"]
    data = [[str(i), f"kernel_{i}", f"{100 + i}", f"{50 + i}", f"{30 + i}", f"{i}", f"{5 - i}"] for i in range(3)]
    csv = tmp_path / "raw.csv"
    warning = "==WARNING== a line ncu may print before the table"
    csv.write_text(warning + "\n" + "\n".join(",".join(f'"{c}"' for c in row) for row in [header, units] + data) + "\n")
    out = tmp_path / "ncu.md"
    run = subprocess.run([sys.executable, "moe.py", "--ncu-summary", str(csv), "--out", str(out)],
                         cwd=ROOT / "benchmarks", capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    text = out.read_text()
    assert "| metric | " + " | ".join(moe.NCU_LAUNCHES[:3]) + " |" in text
    assert "| duration (usecond) | 100 | 101 | 102 |" in text
    assert "| DRAM throughput % | 50 | 51 | 52 |" in text
    assert "| pipe_tensor_op_gmma_cycles_active % | 30 | 31 | 32 |" in text
    assert f"- {moe.NCU_LAUNCHES[0]}: barrier 5.00, long_scoreboard 0.00" in text
    assert f"- {moe.NCU_LAUNCHES[2]}: barrier 3.00, long_scoreboard 2.00" in text
    # a file with no raw page, or none of the metrics, is an error (gpu_check then says so)
    for bad in ("==PROF== nothing profiled\n", '"ID","Kernel Name"\n"","",\n"0","k"\n'):
        csv.write_text(bad)
        run = subprocess.run([sys.executable, "moe.py", "--ncu-summary", str(csv)],
                             cwd=ROOT / "benchmarks", capture_output=True, text=True, timeout=120)
        assert run.returncode != 0 and str(csv) in run.stderr, run.stderr[-2000:]

