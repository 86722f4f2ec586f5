"""generalist.kernels.triton.common: the parallel compile hook of the autotuners.

Triton's own Autotuner runs here with a stand-in for the kernel (compiling and launching need a
GPU driver): what is checked is when the hook compiles, with which arguments, and that the tuner
goes on as before.
"""

import threading

import pytest

triton = pytest.importorskip("triton")

from generalist.kernels.triton.common import parallel_compile  # noqa: E402


class StandIn:
    """A JITFunction as the autotuner and the hook use it: warmup compiles, run launches."""

    arg_names = ["X", "n", "KEYED"]

    @staticmethod
    def fn(X, n, KEYED):  # the Python function behind it (the autotuner looks for one)
        pass

    def __init__(self, fail_on=None):
        self.compiled, self.launched, self.threads = [], [], set()
        self.fail_on = fail_on
        self.lock = threading.Lock()

    def warmup(self, *args, grid, **kwargs):
        # as JITFunction.warmup under triton.AsyncCompileMode: the compile goes to the pool
        mode = triton.runtime._async_compile.active_mode.get()
        assert mode is not None, "warmup outside an AsyncCompileMode"

        def compile_one():
            with self.lock:
                self.threads.add(threading.get_ident())
            if kwargs["BLOCK"] == self.fail_on:
                raise RuntimeError("does not compile")
            return ("kernel", args, tuple(sorted(kwargs.items())))

        return mode.submit(("key", kwargs["BLOCK"], args[1], kwargs["KEYED"]), compile_one,
                           lambda kernel: self.compiled.append(kernel))

    def run(self, *args, grid, warmup, **kwargs):
        self.launched.append((args, kwargs["BLOCK"]))


def _tuner(fn, blocks=(16, 32, 64)):
    configs = [triton.Config({"BLOCK": b}, num_warps=4, num_stages=2) for b in blocks]
    # do_bench: run the candidate once and call the larger block faster, so the choice is known
    tuner = triton.autotune(configs=configs, key=["n", "KEYED"],
                            prune_configs_by={"early_config_prune": parallel_compile(fn)},
                            do_bench=lambda call, quantiles: (call(), [1.0 / tuner._block] * 3)[1])(fn)
    original = tuner._bench

    def bench(*args, config, **meta):  # remember which candidate do_bench is timing
        tuner._block = config.kwargs["BLOCK"]
        return original(*args, config=config, **meta)

    tuner._bench = bench
    return tuner


def test_hook_compiles_every_candidate_once_per_new_key_then_tuning_goes_on():
    fn = StandIn()
    tuner = _tuner(fn)
    x = object()
    tuner[(1,)](x, 100, KEYED=True)
    assert sorted(k[2][0][1] for k in fn.compiled) == [16, 32, 64]  # each candidate, BLOCK first in its kwargs
    assert all(k[1] == (x, 100) for k in fn.compiled)  # the call's positional arguments
    assert all(("KEYED", True) in k[2] and ("num_warps", 4) in k[2] for k in fn.compiled)
    assert not any(name in ("grid", "warmup") for k in fn.compiled for name, _ in k[2])
    assert [b for _, b in fn.launched] == [16, 32, 64, 64]  # timed each, then ran the fastest
    # the same key again: no compiling, no tuning
    tuner[(1,)](x, 100, KEYED=True)
    assert len(fn.compiled) == 3 and [b for _, b in fn.launched][-1] == 64 and len(fn.launched) == 5
    # a new key: compiled and tuned again
    tuner[(1,)](x, 100, KEYED=False)
    assert len(fn.compiled) == 6 and len(fn.launched) == 9


def test_compiles_run_on_a_pool_and_a_failing_candidate_is_left_to_the_tuner():
    fn = StandIn(fail_on=32)
    tuner = _tuner(fn, blocks=(16, 32, 64, 128))
    tuner[(1,)](object(), 7, KEYED=True)
    assert sorted(k[2][0][1] for k in fn.compiled) == [16, 64, 128]
    assert threading.get_ident() not in fn.threads  # compiled on the pool's threads
    assert [b for _, b in fn.launched] == [16, 32, 64, 128, 128]  # the tuner still timed all four


def test_switched_off_by_environment(monkeypatch):
    monkeypatch.setenv("GENERALIST_TRITON_PARALLEL_COMPILE", "0")
    fn = StandIn()
    tuner = _tuner(fn)
    tuner[(1,)](object(), 5, KEYED=True)
    assert fn.compiled == [] and len(fn.launched) == 4


def test_an_active_async_compile_mode_is_left_alone():
    """Triton refuses nested AsyncCompileModes: the hook then leaves compiling to the tuner."""
    from concurrent.futures import ThreadPoolExecutor

    fn = StandIn()
    tuner = _tuner(fn)
    with ThreadPoolExecutor(1) as pool, triton.AsyncCompileMode(pool):
        tuner[(1,)](object(), 5, KEYED=True)
    assert fn.compiled == [] and len(fn.launched) == 4
