"""Where the Triton backends of every op may run: GPUs of compute capability 8.0 or newer (and
ROCm), and CPU tensors only inside Triton's interpreter with an explicit opt-in (for tests)."""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

CPU_OPT_IN = "GENERALIST_TRITON_ON_CPU"


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
