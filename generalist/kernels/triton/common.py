"""Pieces shared by the Triton kernels."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import torch
import triton
import triton.language as tl


@triton.jit
def dot_acc(a, b, acc, zero, DOT_PRECISION: tl.constexpr, BLOCKED_SUM: tl.constexpr):
    """acc + a @ b. With BLOCKED_SUM (fp32 operands, whose dot is one chain of FMAs over all of K
    on a GPU) each call's K slice is summed on its own first and then added to acc, so rounding
    grows like (number of slices + slice length) terms rather than the whole K, as in cuBLAS;
    tensor-core dots keep accumulating in place. `zero` is a runtime 0.0: Triton folds
    acc + dot(a, b, 0) back into dot(a, b, acc)."""
    if BLOCKED_SUM:
        return acc + tl.dot(a, b, tl.full(acc.shape, 0.0, tl.float32) + zero, input_precision=DOT_PRECISION)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


# Host-side integer helpers for grids and block sizes. triton.cdiv and triton.next_power_of_2 are
# constexpr functions in Triton 3.6, whose calls from Python cost microseconds each (several a
# launch); these are the plain arithmetic.


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


# Compiling the candidates of an autotuner in parallel. Triton's autotuner compiles each candidate
# when it first times it, one after another; Triton's compiler leaves the GIL to its native passes
# and ptxas, so a thread pool compiles them several at a time (2x on 2 cores, for four dkdv
# candidates). The autotuner calls its early_config_prune hook exactly when it is about to tune a
# key it has not met, so that is where this runs: no cost on the calls after.


def parallel_compile(fn):
    """An early_config_prune hook for triton.autotune over the JITFunction `fn`: compiles every
    candidate for the call's arguments on a thread pool (nothing is launched) and keeps them all.
    A candidate that fails to compile, or any other error, is left to the tuner, which compiles
    (and reports) as usual. GENERALIST_TRITON_PARALLEL_COMPILE=0 turns it off."""

    def hook(configs, named_args, **kwargs):
        if len(configs) > 1 and os.environ.get("GENERALIST_TRITON_PARALLEL_COMPILE", "1") != "0":
            precompile(fn, configs, tuple(named_args.values()),
                       {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")})
        return configs

    return hook


def precompile(fn, configs, args: tuple, kwargs: dict) -> None:
    """Compile `fn` for each config at these arguments, in parallel."""
    try:
        workers = max(1, min(len(configs), os.cpu_count() or 1))
        with ThreadPoolExecutor(workers) as pool, triton.AsyncCompileMode(pool, ignore_errors=True):
            for config in configs:
                fn.warmup(*args, grid=(1,), **kwargs, **config.all_kwargs())
    except Exception:  # e.g. another AsyncCompileMode active: the tuner compiles as it would
        pass


# Launching with the tuner's choice. Triton's Autotuner.run rebuilds its tuning key from every
# argument on every launch (a dict of all arguments, hasattr and str(dtype) on each); on an H100
# host its share was about a third of a launch's host time. TunedLauncher asks the autotuner once
# per key and then launches the kernel with the chosen configuration itself, which is what the
# autotuner's own cache hit does.


class TunedLauncher:
    """`launcher[grid](*args, **kwargs)` for a `triton.autotune`-wrapped kernel (`tuner`): the
    first call with a tuning key goes through the tuner (tuning it, or reading its cache), later
    calls with that key launch `tuner.fn` with the configuration it chose. The key is the tuner's:
    the values of its key arguments and the dtypes of the tensor arguments. Like the tuner, it
    expects one thread to tune a key (two racing on a new key could store either's choice)."""

    def __init__(self, tuner):
        self.tuner = tuner
        names = list(tuner.arg_names)
        self._key_args = [(names.index(k), k) for k in tuner.keys]
        self._chosen: dict[tuple, triton.Config] = {}

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.run(grid, args, kwargs)

    def _key(self, args: tuple, kwargs: dict) -> tuple:
        values = tuple(args[i] if i < len(args) else kwargs.get(name) for i, name in self._key_args)
        return values + tuple(a.dtype for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))

    def run(self, grid, args: tuple, kwargs: dict):
        key = self._key(args, kwargs)
        config = self._chosen.get(key)
        if config is None:
            result = self.tuner[grid](*args, **kwargs)
            if self.tuner.best_config.pre_hook is None:  # a pre_hook runs through the tuner each time
                self._chosen[key] = self.tuner.best_config
            return result
        return self.tuner.fn.run(*args, grid=grid, warmup=False, **kwargs, **config.all_kwargs())


def tuned_launcher(fn, configs: list, key: list[str]) -> TunedLauncher:
    """triton.autotune over the JITFunction `fn` with `configs` and tuning `key`, as the kernels
    use it: the timings go to Triton's cache directory (cache_results), so a later process (a
    resumed run) reuses a choice instead of timing every candidate again; every candidate is
    compiled on a thread pool before a new key is timed (parallel_compile); and launches after a
    key's first go straight to its choice (TunedLauncher)."""
    prune = {"early_config_prune": parallel_compile(fn)}
    return TunedLauncher(triton.autotune(configs=configs, key=key, cache_results=True, prune_configs_by=prune)(fn))
