"""The "triton" MoE backend: the grouped matmul kernels of generalist/kernels/triton/moe.py behind
the `generalist::grouped_mm` / `grouped_mm_bwd` ops.

Registered into generalist.ops.moe.MOE_BACKENDS (priority 20, above the reference) when triton
imports; without triton the package imports as before and the backend is simply not available.

It serves fp16, bf16 and fp32 inputs (int32 or int64 group sizes):
  - CUDA tensors, on a GPU of compute capability 8.0 or newer (Ampere, Hopper, ...);
  - CPU tensors only when the kernels run in Triton's interpreter (TRITON_INTERPRET=1 set before
    import) AND GENERALIST_TRITON_ON_CPU=1. The interpreter exists to test the kernels, not to run
    models, so "auto" never picks it for CPU tensors unless a test opts in. bf16 is refused on CPU
    because Triton 3.6's interpreter computes bf16 products wrongly.
Shapes and semantics are those of generalist.ops.moe.grouped_mm (x_TD, w_EDF, group_sizes_E).
"""

from __future__ import annotations



from generalist.ops._triton_device import device_unsupported
from generalist.ops._registry import Implementation

try:
    from generalist.kernels.triton import moe as kernels
except ImportError:  # triton is not installed: the backend is not registered
    kernels = None



def unsupported(x_TD, w_EDF, group_sizes_E) -> str | None:
    """None when the Triton kernels can serve these inputs, else the reason why not."""
    if x_TD.dtype not in kernels.DTYPES:
        return f"dtype {x_TD.dtype} is not supported (float16, bfloat16, float32)"
    return device_unsupported(x_TD, kernels.interpreting())


def grouped_mm(x_TD, w_EDF, group_sizes_E):
    """x (T, D), w (E, D, F), group_sizes (E,) -> y (T, F) in x's dtype."""
    return kernels.grouped_mm(x_TD, w_EDF, group_sizes_E)


def grouped_mm_bwd(dy_TF, x_TD, w_EDF, group_sizes_E):
    """(dx_TD, dw_EDF) in the inputs' dtype; dw is zero for an empty group."""
    return kernels.grouped_mm_backward(dy_TF, x_TD, w_EDF, group_sizes_E)


IMPLEMENTATION = Implementation(name="triton", priority=20, unsupported=unsupported,
                                functions={"grouped_mm": grouped_mm, "grouped_mm_bwd": grouped_mm_bwd})


def register(backends) -> bool:
    """Adds the backend to `backends` when triton is importable; returns whether it did."""
    if kernels is None:
        return False
    backends.register(IMPLEMENTATION)
    return True


if kernels is not None:
    from generalist.ops.moe import MOE_BACKENDS

    register(MOE_BACKENDS)
