"""`generalist bench`: every backend that serves the inputs is timed against its baseline, the
rates are one unit of work over each row's time, and a backend whose output is wrong is named
and not timed."""

import json
import math
from collections import defaultdict

import pytest
import torch

import generalist.bench as bench
from generalist.cli import main
from generalist.ops import ATTENTION_BACKENDS, DECODE_BACKENDS, MOE_BACKENDS

REGISTRIES = {"attention": ATTENTION_BACKENDS, "moe": MOE_BACKENDS, "decode": DECODE_BACKENDS}


def test_quick_bench_on_cpu_times_every_backend_against_its_baseline(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--device", "cpu", "--json", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["device"] == "cpu" and saved["dtype"] == "float32" and saved["quick"] is True
    rows = saved["rows"]
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 2 + len(rows)  # the title, the header, a line per row
    groups = defaultdict(list)
    for r in rows:
        groups[r["op"], r["case"], r["pass"]].append(r)
    assert {op for op, _, _ in groups} == set(bench.OPS)
    assert {p for _, _, p in groups} == {"fwd", "fwd+bwd"}
    for (op, case, pass_), group in groups.items():
        names = [r["provider"] for r in group]
        # each backend here once: timed and checked, or skipped with its reason (Triton: not on a CPU)
        ours = [n for n in REGISTRIES[op].available() if n != "triton"]
        assert sorted(n for n in names if n in ours) == sorted(ours), (op, case, pass_, names)
        assert all(r["status"] == "ok" or r["status"].startswith("skipped: ") for r in group if r["provider"] in ours)
        assert "reference" in names
        base = [r for r in group if r["status"] == "baseline"]
        assert len(base) == 1 and base[0]["provider"] not in ours and base[0]["speedup"] == 1.0
        timed = [r for r in group if r["ms"] is not None]
        for r in timed:
            assert r["ms"] > 0 and math.isfinite(r["rate"]) and r["rate"] > 0
            assert r["speedup"] == pytest.approx(base[0]["ms"] / r["ms"])
            assert r["unit"] == ("GB/s" if op == "decode" else "GFLOP/s")
        # one case, one amount of work: rate x time is the same for every provider
        work = [r["rate"] * r["ms"] for r in timed]
        assert max(work) == pytest.approx(min(work), rel=1e-6)
    # the FLOPs are the visible pairs': a causal dense case does half the work of a bidirectional one
    # (4 B S^2 H D / 2 for the forward), here against the shapes of the quick attention cases
    causal = next(r for r in rows if r["op"] == "attention" and r["case"].startswith("dense")
                  and r["pass"] == "fwd" and r["ms"])
    b, s, h, d = 4, 64, 4, 64
    assert causal["rate"] * causal["ms"] * 1e-3 * 1e9 == pytest.approx(4 * b * h * d * s * (s + 1) / 2, rel=1e-9)


def test_a_backend_whose_output_is_wrong_is_named_and_not_timed(monkeypatch, capsys):
    others = [n for n in ATTENTION_BACKENDS.available() if n not in ("reference", "triton")]
    assert others, "the C++ CPU attention backend must be built for this test"
    real = bench.flash_attn_varlen_func

    def off_by_one(*args, backend="auto", **kw):
        out = real(*args, backend=backend, **kw)
        return out + 1.0 if backend != "reference" else out
    monkeypatch.setattr(bench, "flash_attn_varlen_func", off_by_one)
    rows = bench.run(("attention",), "cpu", quick=True, print_fn=lambda line: None)
    packed = [r for r in rows if not r.case.startswith("dense")]
    assert packed
    for r in packed:
        if r.provider in others:
            assert r.status.startswith("wrong: max |error| 1") and r.ms is None, r
        else:
            assert r.status in ("ok", "baseline") and r.ms > 0, r
    # the command says so and exits with 1
    assert main(["bench", "--quick", "--device", "cpu", "--ops", "attention"]) == 1
    assert "disagrees with the reference" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--ops", "attention,convolution"], "unknown op(s) convolution"),
    (["--dtype", "fp8"], "--dtype must be one of fp32, fp16, bf16, got 'fp8'"),
    (["--device", "mps"], "--device must be cpu or cuda, got 'mps'"),
    (["--device", "cuda"], "--device cuda: this torch sees no CUDA device"),
])
def test_bad_arguments_get_one_line_naming_them(monkeypatch, capsys, argv, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", *argv]) == 2
    assert message in capsys.readouterr().err


def test_cpu_timing_takes_turns_and_reports_medians():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    seconds = bench.time_providers(fns, torch.device("cpu"), reps=5)
    assert calls == list("abc") * 7  # two warm-up rounds, then five timed ones, in turns
    assert seconds.keys() == set("abc") and all(0 <= t < 0.1 for t in seconds.values())
