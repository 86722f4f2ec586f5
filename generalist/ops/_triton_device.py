"""Where the Triton backends of every op may run: GPUs of compute capability 8.0 or newer (and
ROCm), and CPU tensors only inside Triton's interpreter with an explicit opt-in (for tests)."""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

CPU_OPT_IN = "GENERALIST_TRITON_ON_CPU"
OFFSET_LIMIT = 2 ** 31  # the attention kernels' offsets inside one sequence are 32-bit


def offsets_unsupported(*spans: tuple[str, tuple[int, ...], tuple[int, ...]]) -> str | None:
    """None when every (name, sizes, strides) block, the part of a tensor one sequence (one
    program's rows, heads and features) spans, is addressable with 32-bit offsets, else why not.
    The Triton attention kernels widen each sequence's start to 64 bits but not the offsets within
    it: a longer reach (sequences of ~500k tokens at 4096 features a row) would wrap around and
    read or write the wrong memory, so "auto" takes another backend."""
    for name, sizes, strides in spans:
        reach = sum((n - 1) * abs(s) for n, s in zip(sizes, strides) if n > 0)
        if reach >= OFFSET_LIMIT:
            return (f"{name} spans {reach} elements within one sequence, past the Triton kernels' 32-bit "
                    f"offsets (2^31)")
    return None


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def device_unsupported(x: Tensor, interpreting: bool) -> str | None:
    """None when a Triton kernel can take `x`'s device (and dtype, for the interpreter), else why
    not. `interpreting`: the kernels were imported under TRITON_INTERPRET=1."""
    if x.device.type == "cuda":
        if torch.version.hip is None and not interpreting:
            major, minor = _capability(x.device.index if x.device.index is not None else torch.cuda.current_device())
            if major < 8:
                return f"needs a GPU of compute capability 8.0 or newer, this one has {major}.{minor}"
        return None
    if x.device.type == "cpu":
        if not interpreting:
            return "CPU tensors run the Triton kernels only under TRITON_INTERPRET=1 (set before import)"
        if os.environ.get(CPU_OPT_IN) != "1":
            return f"CPU tensors run the Triton interpreter only with {CPU_OPT_IN}=1 (it is for tests)"
        if x.dtype == torch.bfloat16:
            return "bfloat16 is wrong in Triton 3.6's interpreter; run bfloat16 on a GPU"
        return None
    return f"device {x.device.type} is not supported"
