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
from generalist.ops import ATTENTION_BACKENDS, DECODE_BACKENDS, MOE_BACKENDS, flash_attn_varlen_func
from generalist.testing import random_varlen, visible_keys

REGISTRIES = {"attention": ATTENTION_BACKENDS, "moe": MOE_BACKENDS, "decode": DECODE_BACKENDS}


def test_quick_bench_on_cpu_times_every_backend_against_its_baseline(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--device", "cpu", "--json", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["device"] == "cpu" and saved["dtype"] == "float32" and saved["quick"] is True
    rows = saved["rows"]
    printed = capsys.readouterr().out.splitlines()
    triton_note = any("triton" in r.available() for r in REGISTRIES.values())
    assert len(printed) == 2 + triton_note + len(rows)  # the title, Triton's note, the header, a line per row
    assert ("not timed on a CPU" in printed[1]) == triton_note
    groups = defaultdict(list)
    for r in rows:
        groups[r["op"], r["case"], r["pass"]].append(r)
    assert {op for op, _, _ in groups} == set(bench.OPS)
    assert {p for _, _, p in groups} == {"fwd", "fwd+bwd"}
    for (op, case, pass_), group in groups.items():
        names = [r["provider"] for r in group]
        # each backend once (Triton not on a CPU): timed and checked, or skipped with its reason
        ours = [n for n in REGISTRIES[op].available() if n != "triton"]
        assert sorted(n for n in names if n in ours) == sorted(ours) and "triton" not in names, (op, case, names)
        assert all(r["status"] == "ok" or r["status"].startswith("skipped: ") for r in group if r["provider"] in ours)
        base = [r for r in group if r["status"] == "baseline"]
        assert len(base) == 1 and base[0]["provider"] not in ours and base[0]["speedup"] == 1.0
        for r in group:
            if r["ms"] is not None:
                assert r["ms"] > 0 and math.isfinite(r["rate"]) and r["rate"] > 0
                assert r["speedup"] == pytest.approx(base[0]["ms"] / r["ms"])
                assert r["unit"] == ("GB/s" if op == "decode" else "GFLOP/s")
    # the work is the visible (query, key) pairs' 4 D H FLOPs, H the query heads, 3.5 times that
    # forward and backward: the quick attention cases are dense causal B4 S64 H4 D64 and packed
    # causal sequences of 75, 9, 64, 30, 127 tokens, H4 over 1 key / value head, D64
    def work(case, pass_):
        r = next(r for r in rows if r["op"] == "attention" and r["case"].startswith(case) and r["pass"] == pass_
                 and r["ms"])
        return r["rate"] * 1e9 * r["ms"] * 1e-3
    assert work("dense B4 S64 H4 D64, causal", "fwd") == pytest.approx(4 * 64 * 4 * 4 * 64 * 65 / 2, rel=1e-9)
    pairs = sum(n * (n + 1) // 2 for n in (75, 9, 64, 30, 127))
    assert work("packed 5 seqs, 305 tok H4/1 D64, causal", "fwd") == pytest.approx(4 * 64 * 4 * pairs, rel=1e-9)
    assert work("packed 5 seqs, 305 tok H4/1 D64, causal", "fwd+bwd") == pytest.approx(3.5 * 4 * 64 * 4 * pairs,
                                                                                      rel=1e-9)


@pytest.mark.parametrize("index", range(5))
def test_padded_sdpa_baseline_sees_what_the_packed_op_sees(index):
    """The baseline of a packed case (SDPA on the batch padded, with a mask) attends like the
    packed op on each case kind: dense, causal, grouped-query heads, cross with other key
    lengths, prefix mask; rows that see no key are left out (the op gives zeros there)."""
    case = bench._attention_cases(torch.device("cpu"), quick=False)[index]
    c = random_varlen(case.lens_q, case.lens_k, case.h, case.hkv, case.d, prefix=case.prefix)
    want = flash_attn_varlen_func(c.q, c.k, c.v, c.cu_q, c.cu_k, max(c.lens_q), max(c.lens_k), causal=case.causal,
                                  prefix_lens=c.prefix_lens, backend="reference")
    padded = bench._padded_sdpa(c, case.causal).run()  # (B, H, Sq, D)
    prefixes = [None] * len(c.lens_q) if c.prefix_lens is None else c.prefix_lens.tolist()
    start = 0
    for i, (nq, nk, p) in enumerate(zip(c.lens_q, c.lens_k, prefixes)):
        seen = torch.tensor(visible_keys(nq, nk, case.causal, p)) > 0
        got = padded[i, :, :nq].transpose(0, 1)
        torch.testing.assert_close(got[seen], want[start:start + nq][seen], atol=1e-5, rtol=1e-5)
        start += nq


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
            assert r.status.startswith("wrong: output: max |error| 1") and r.ms is None, r
        else:
            assert r.status in ("ok", "baseline") and r.ms > 0, r
    # the command says so and exits with 1
    assert main(["bench", "--quick", "--device", "cpu", "--ops", "attention"]) == 1
    assert "disagrees with the reference" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--ops", "attention,convolution"], "unknown op(s) convolution"),
    (["--dtype", "fp8"], "--dtype must be one of fp32, fp16, bf16, got 'fp8'"),
    (["--device", "mps"], "unknown device 'mps'"),
    (["--device", "cuda"], "device 'cuda' asked for, but no CUDA GPU is available here"),
    (["--device", "gpu"], "unknown device 'gpu'"),
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


def test_the_check_catches_wrong_gradients_shapes_and_memory_and_says_when_it_cannot_check():
    x = torch.randn(6, 5, requires_grad=True)

    def grad_times(k):  # the right values, the gradient k times too large
        return lambda: x * 2 + (x * 2 * (k - 1) - (x * 2 * (k - 1)).detach())

    def out_of_memory():
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
    providers = [bench.Provider("reference", lambda: x * 2, (x,), ours=True),
                 bench.Provider("good", grad_times(1), (x,), ours=True),
                 bench.Provider("bad gradient", grad_times(1000), (x,), ours=True),
                 bench.Provider("bad shape", lambda: (x * 2)[None], (x,), ours=True),
                 bench.Provider("greedy", out_of_memory, (x,), ours=True),
                 bench.Provider("baseline", lambda: x + x, (x,), ours=False)]
    rows = list(bench._measure("moe", "toy", providers, 1e6, "GFLOP/s", torch.device("cpu"), 3, ("fwd", "fwd+bwd"),
                               [("absent", "cannot serve")]))
    status = {(r.provider, r.pass_): r.status for r in rows}
    for pass_ in ("fwd", "fwd+bwd"):
        assert status["absent", pass_] == "skipped: cannot serve"
        assert status["good", pass_] == status["reference", pass_] == "ok"
        assert status["bad gradient", pass_].startswith("wrong: the gradient of input 1: max |error|")
        assert status["bad shape", pass_] == ("wrong: output is (1, 6, 5) torch.float32, the reference's (6, 5) "
                                              "torch.float32")
        assert status["greedy", pass_] == "skipped: out of memory"
        assert status["baseline", pass_] == "baseline"
    assert [r.ms is not None for r in rows] == [r.status in ("ok", "baseline") for r in rows]
    # without a reference backend, ours are timed but not called checked
    rows = list(bench._measure("moe", "toy", providers[1:2] + providers[-1:], 1e6, "GFLOP/s", torch.device("cpu"), 3,
                               ("fwd",), []))
    assert [r.status for r in rows] == ["unchecked: no reference to compare with", "baseline"]


def test_a_run_cut_short_keeps_the_rows_it_measured(tmp_path, monkeypatch):
    out = tmp_path / "bench.json"
    real = bench._measure

    def stop_after_first_case(*args):
        yield from real(*args)
        raise KeyboardInterrupt
    monkeypatch.setattr(bench, "_measure", stop_after_first_case)
    with pytest.raises(KeyboardInterrupt):
        bench.run(("moe",), "cpu", quick=True, json_path=str(out), print_fn=lambda line: None)
    rows = json.loads(out.read_text())["rows"]
    assert rows and {r["case"] for r in rows} == {rows[0]["case"]} and {r["pass"] for r in rows} == {"fwd", "fwd+bwd"}
