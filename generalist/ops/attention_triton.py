"""The "triton" attention backend: the flash-attention kernels of generalist/kernels/triton/attention.py
behind the `generalist::attention_fwd` / `attention_bwd` ops.

Registered into generalist.ops.attention.BACKENDS (priority 20, above the reference) when triton
imports; without triton the package imports as before and the backend is simply not available.

It serves fp16, bf16 and fp32 inputs with head dim <= 256:
  - CUDA tensors, on a GPU of compute capability 8.0 or newer (Ampere, Hopper, ...);
  - CPU tensors only when the kernels run in Triton's interpreter (TRITON_INTERPRET=1 set before
    import) AND GENERALIST_TRITON_ON_CPU=1. The interpreter exists to test the kernels, not to run
    models, so "auto" never picks it for CPU tensors unless a test opts in. bf16 is refused on CPU
    because Triton 3.6's interpreter computes bf16 products wrongly.
Shapes and semantics are those of generalist.ops.attention (varlen layout).
"""

from __future__ import annotations



from generalist.ops._triton_device import OFFSET_LIMIT, device_unsupported, offsets_unsupported
from generalist.ops._registry import Implementation

try:
    from generalist.kernels.triton import attention as kernels
except ImportError:  # triton is not installed: the backend is not registered
    kernels = None



def unsupported(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                prefix_lens) -> str | None:
    """None when the Triton kernels can serve these inputs, else the reason why not."""
    if q.dtype not in kernels.DTYPES:
        return f"dtype {q.dtype} is not supported (float16, bfloat16, float32)"
    if q.shape[-1] > kernels.MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} > {kernels.MAX_HEAD_DIM}"
    (tq, h, d), hkv = q.shape, k.shape[1]
    qs, ks, vs = q.stride(), k.stride(), v.stride()
    rows = max(max_seqlen_q, max_seqlen_k, 1)
    # a bound on every span below, which the model's inputs are far under: one comparison for them
    if rows * (abs(qs[0]) + abs(ks[0]) + abs(vs[0]) + 2 * h * d) + h * (abs(qs[1]) + abs(ks[1]) + abs(vs[1]) + tq) \
            >= OFFSET_LIMIT:
        rows_q, rows_k = max(max_seqlen_q, 1), max(max_seqlen_k, 1)
        # one sequence of q, k and v as given, of the outputs and gradients (contiguous, as the
        # kernels make them), and the heads of lse (H, Tq)
        reason = offsets_unsupported(("q", (rows_q, h, d), qs), ("k", (rows_k, hkv, d), ks), ("v", (rows_k, hkv, d), vs),
                                     ("out", (rows_q, h, d), (h * d, d, 1)),
                                     ("k's gradient", (rows_k, hkv, d), (hkv * d, d, 1)), ("lse", (h, 1), (tq, 1)))
        if reason:
            return reason
    return device_unsupported(q, kernels.interpreting())


def forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, prefix_lens):
    """q (Tq, H, D), k/v (Tk, Hkv, D) -> out (Tq, H, D), lse (H, Tq) fp32."""
    return kernels.attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                     softmax_scale, causal, prefix_lens)


def backward(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
             causal, prefix_lens):
    """(dq, dk, dv) in the inputs' dtype; dlse (H, Tq) may be None."""
    if max(max_seqlen_q, 1) * abs(dout.stride(0)) + dout.shape[1] * abs(dout.stride(1)) >= OFFSET_LIMIT:
        dout = dout.contiguous()  # as out's layout, which `unsupported` checked
    return kernels.attention_backward(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                      max_seqlen_k, softmax_scale, causal, prefix_lens)


IMPLEMENTATION = Implementation(name="triton", priority=20, unsupported=unsupported,
                                functions={"forward": forward, "backward": backward})


def register(backends) -> bool:
    """Adds the backend to `backends` when triton is importable; returns whether it did."""
    if kernels is None:
        return False
    backends.register(IMPLEMENTATION)
    return True


if kernels is not None:
    from generalist.ops.attention import BACKENDS

    register(BACKENDS)
