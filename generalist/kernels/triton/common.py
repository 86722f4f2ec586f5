"""Pieces shared by the Triton kernels."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

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
