"""generalist.kernels.triton.common: the parallel compile hook of the autotuners, and the
launcher that asks the autotuner once per tuning key.

Triton's own Autotuner runs here with a stand-in for the kernel (compiling and launching need a
GPU driver): what is checked is when the hook compiles, with which arguments, that the tuner
goes on as before, and which configuration each launch gets.
"""

import threading

import pytest

triton = pytest.importorskip("triton")

import torch  # noqa: E402

from generalist.kernels.triton.common import TunedLauncher, parallel_compile  # noqa: E402


class StandIn:
    """A JITFunction as the autotuner and the hook use it: warmup compiles, run launches."""

    arg_names = ["X", "n", "KEYED"]

    @staticmethod
    def fn(X, n, KEYED):  # the Python function behind it (the autotuner looks for one)
        pass

    def __init__(self, fail_on=None):
        self.compiled, self.launched, self.threads, self.launch_kwargs = [], [], set(), []
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
        self.launch_kwargs.append(dict(kwargs, grid=grid))


def _tuner(fn, blocks=(16, 32, 64), pre_hook=None):
    configs = [triton.Config({"BLOCK": b}, num_warps=4, num_stages=2, pre_hook=pre_hook) for b in blocks]
    # do_bench: run the candidate once and call the larger block faster (the smaller one when
    # n == 200), so the choice is known and differs between keys
    timing = lambda: 1.0 / tuner._block if tuner._n != 200 else tuner._block
    tuner = triton.autotune(configs=configs, key=["n", "KEYED"],
                            prune_configs_by={"early_config_prune": parallel_compile(fn)},
                            do_bench=lambda call, quantiles: (call(), [timing()] * 3)[1])(fn)
    original = tuner._bench

    def bench(*args, config, **meta):  # remember which candidate do_bench is timing, and for which n
        tuner._block, tuner._n = config.kwargs["BLOCK"], args[1]
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


class CountingTuner:
    """Wraps a tuner: counts the launches that went through it."""

    def __init__(self, tuner):
        self.tuner, self.calls = tuner, 0
        self.fn, self.arg_names, self.keys = tuner.fn, tuner.arg_names, tuner.keys

    def __getitem__(self, grid):
        self.calls += 1
        return self.tuner[grid]

    @property
    def best_config(self):
        return self.tuner.best_config


def test_launcher_asks_the_tuner_once_per_key_then_launches_its_choice():
    fn = StandIn()
    tuner = CountingTuner(_tuner(fn))
    launch = TunedLauncher(tuner)
    x16, x32 = torch.zeros(2, dtype=torch.float16), torch.zeros(2, dtype=torch.float32)
    grid = lambda meta: (meta["BLOCK"],)
    launch[grid](x16, 100, KEYED=True)
    assert tuner.calls == 1 and [b for _, b in fn.launched] == [16, 32, 64, 64]
    for n in range(3):  # same key: straight to the kernel, with the tuner's choice and launch options
        launch[grid](x16, 100, KEYED=True)
    assert tuner.calls == 1 and [b for _, b in fn.launched][4:] == [64, 64, 64]
    last = fn.launch_kwargs[-1]
    assert last["grid"] is grid and last["KEYED"] is True and last["num_warps"] == 4 and last["num_stages"] == 2
    assert fn.launched[-1][0] == (x16, 100)
    # a new key value, a new tensor dtype, a key argument passed by position: each asks the tuner
    launch[grid](x16, 200, KEYED=True)  # (n == 200: the smallest block is the fastest)
    launch[grid](x32, 100, KEYED=True)
    launch[grid](x16, 100, False)
    assert tuner.calls == 4 and [b for _, b in fn.launched][10] == 16
    for _ in range(2):  # each key then launches its own choice
        launch[grid](x16, 200, KEYED=True)
        launch[grid](x32, 100, KEYED=True)
        launch[grid](x16, 100, False)
        launch[grid](x16, 100, KEYED=True)
    assert tuner.calls == 4 and len(fn.launched) == 7 + 3 * 4 + 8
    assert [b for _, b in fn.launched][-8:] == [16, 64, 64, 64] * 2


def test_launcher_leaves_configs_with_a_pre_hook_to_the_tuner():
    hooked = []
    fn = StandIn()
    tuner = CountingTuner(_tuner(fn, pre_hook=lambda nargs: hooked.append(nargs["BLOCK"])))
    launch = TunedLauncher(tuner)
    x = torch.zeros(2)
    for _ in range(3):
        launch[(1,)](x, 100, KEYED=True)
    assert tuner.calls == 3 and hooked[-2:] == [64, 64]
