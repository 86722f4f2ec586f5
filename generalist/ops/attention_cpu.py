"""The C++ CPU attention backend: flash-attention-style kernels in csrc/cpu/attention*.cpp.

Registered as backend "cpu" (generalist/ops/attention.py) when the compiled extension is built.
It serves CPU tensors in float32, bfloat16 and float16 (fp32 accumulation, outputs in the input
dtype) with any head dim up to 256, every mask of the contract and GQA; float64 stays with the
reference. Work is split over the intra-op threads (`torch.set_num_threads`), and results do not
depend on the thread count.

Shapes: q (Tq, H, D), k/v (Tk, Hkv, D), lse (H, Tq) fp32, as in attention_reference.py.
"""

from __future__ import annotations

import torch
from torch import Tensor

from generalist import _ext
from generalist.ops._attention_checks import MAX_HEAD_DIM
from generalist.ops._registry import Implementation

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def available() -> bool:
    """Whether the compiled extension is loaded and has these kernels."""
    return _ext.has_extension() and hasattr(torch.ops.generalist, "_attention_fwd_cpu")


def unsupported(q: Tensor, k: Tensor, v: Tensor, *rest) -> str | None:
    if q.device.type != "cpu":
        return f"runs on CPU tensors only, got {q.device}"
    if q.dtype == torch.float64:
        return "float64 is not supported (the kernels compute in float32); use the reference backend"
    if q.dtype not in DTYPES:
        return f"dtype {q.dtype} is not supported (float32, bfloat16, float16)"
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} is above {MAX_HEAD_DIM}"
    return None


def forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, prefix_lens):
    return torch.ops.generalist._attention_fwd_cpu(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                                   softmax_scale, causal, prefix_lens)


def backward(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
             causal, prefix_lens):
    return torch.ops.generalist._attention_bwd_cpu(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                                                   max_seqlen_q, max_seqlen_k, softmax_scale, causal, prefix_lens)


IMPLEMENTATION = Implementation(name="cpu", priority=10, unsupported=unsupported,
                                functions={"forward": forward, "backward": backward})
