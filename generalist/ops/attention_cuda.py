"""The CUDA attention backend: flash-attention-2 kernels on tensor cores (mma.sync) in csrc/cuda/attention*.

Registered as backend "cuda" (priority 15, below "triton") in generalist.ops.attention.BACKENDS when
the compiled extension was built with CUDA; otherwise the package imports as before and the backend
is simply not available. On an H100 the autotuned Triton kernels (wgmma) are faster in both
directions (BENCHMARKS.md), so "auto" picks "cuda" only where triton is missing; name it with
backend="cuda". It serves:
  - CUDA tensors on a GPU of compute capability 8.x or 9.0 (the extension carries sm_80 and
    sm_90a code) with enough shared memory per block;
  - float16 and bfloat16 (fp32 accumulation, outputs in the input dtype);
  - head dims 64 and 128.
Everything else (fp32, other head dims, other GPUs) gets a reason from `unsupported`, so "auto"
falls through to "triton" and the reference. Every mask of the contract and GQA/MQA are served.

Shapes: q (Tq, H, D), k/v (Tk, Hkv, D), lse (H, Tq) fp32, as in attention_reference.py.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from generalist import _ext
from generalist.ops._registry import Implementation

DTYPES = (torch.float16, torch.bfloat16)
HEAD_DIMS = (64, 128)
# Dynamic shared memory the largest kernel needs per head dim (attention_kernel.cuh launchers:
# the dK/dV kernel at D = 64, the dQ kernel at D = 128); sm_86 / sm_89 have less than the latter.
SMEM_BYTES = {64: 56320, 128: 104448}


def available() -> bool:
    """Whether the compiled extension is loaded with its CUDA kernels."""
    return _ext.cuda_built() and hasattr(torch.ops.generalist, "_attention_fwd_cuda")


@functools.lru_cache(maxsize=None)
def _device_limits(index: int) -> tuple[int, int, int | None]:
    major, minor = torch.cuda.get_device_capability(index)
    smem = getattr(torch.cuda.get_device_properties(index), "shared_memory_per_block_optin", None)
    return major, minor, smem


def unsupported(q: Tensor, k: Tensor, v: Tensor, *rest) -> str | None:
    """None when the CUDA kernels can serve these inputs, else the reason why not."""
    if q.device.type != "cuda":
        return f"runs on CUDA tensors only, got {q.device}"
    if torch.version.hip is not None:
        return "the kernels use NVIDIA PTX (mma.sync); ROCm is not supported"
    if q.dtype not in DTYPES:
        return f"dtype {q.dtype} is not supported (float16, bfloat16)"
    d = q.shape[-1]
    if d not in HEAD_DIMS:
        return f"head dim {d} is not supported (64, 128)"
    major, minor, smem = _device_limits(q.device.index if q.device.index is not None else torch.cuda.current_device())
    if major not in (8, 9):
        return f"built for compute capability 8.x and 9.0 (sm_80, sm_90a), this GPU has {major}.{minor}"
    if smem is not None and smem < SMEM_BYTES[d]:
        return f"head dim {d} needs {SMEM_BYTES[d]} bytes of shared memory per block, this GPU has {smem}"
    return None


def forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, prefix_lens):
    return torch.ops.generalist._attention_fwd_cuda(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                                    softmax_scale, causal, prefix_lens)


def backward(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
             causal, prefix_lens):
    return torch.ops.generalist._attention_bwd_cuda(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                                                    max_seqlen_q, max_seqlen_k, softmax_scale, causal, prefix_lens)


IMPLEMENTATION = Implementation(name="cuda", priority=15, unsupported=unsupported,
                                functions={"forward": forward, "backward": backward})


def register(backends) -> bool:
    """Adds the backend to `backends` when the CUDA kernels are built; returns whether it did."""
    if not available():
        return False
    backends.register(IMPLEMENTATION)
    return True


if available():
    from generalist.ops.attention import BACKENDS

    register(BACKENDS)
