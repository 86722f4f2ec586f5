"""Pieces shared by the Triton kernels."""

from __future__ import annotations

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
