"""Attention: `flash_attn_func` (dense) and `flash_attn_varlen_func` (packed), the public op.

Names mirror flash-attn, and so does the order of the arguments the two share; flash-attn 2's
`dropout_p` (its 4th argument of flash_attn_func, 8th of the varlen one) has no counterpart, so
code moving from flash-attn 2 passes softmax_scale and causal by keyword. Both lower to one pair of
registered ops, `generalist::attention_fwd` and `generalist::attention_bwd` (varlen layout;
dense inputs become equal-length sequences), each with a fake implementation and autograd, so
`torch.compile(fullgraph=True)` and `torch.library.opcheck` work. The implementation behind
them is picked by `backend` from a registry (attention_reference.py is always there; compiled
and Triton backends register themselves when they can run). Masks, GQA and the no-visible-key
rule are documented in attention_reference.py.

Shapes: B batch, Sq/Sk dense lengths, Tq/Tk packed lengths, H query heads, Hkv key/value
heads, D head dim. lse is fp32 (fp64 for fp64 inputs): (B, H, Sq) dense, (H, Tq) varlen.
"""

from __future__ import annotations

import torch
from torch import Tensor

from generalist.ops import _attention_checks as checks
from generalist.ops import attention_cpu
from generalist.ops import attention_reference as reference
from generalist.ops._registry import Implementation, Registry

BACKENDS = Registry("attention", known=("reference", "triton", "cuda", "cpu"))


def _reference_unsupported(q, k, v, *rest) -> str | None:
    return None  # the reference serves every valid input on every device


BACKENDS.register(Implementation(
    name="reference", priority=0, unsupported=_reference_unsupported,
    functions={"forward": reference.attention_forward, "backward": reference.attention_backward},
))

if attention_cpu.available():
    BACKENDS.register(attention_cpu.IMPLEMENTATION)


def _lse_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@torch.library.custom_op("generalist::attention_fwd", mutates_args=())
def attention_fwd(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                  max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float, causal: bool,
                  prefix_lens: Tensor | None, backend: str) -> tuple[Tensor, Tensor]:
    """Varlen attention forward: (out (Tq, H, D), lse (H, Tq)). Inputs must be validated."""
    args = (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, prefix_lens)
    return BACKENDS.resolve(backend, *args).functions["forward"](*args)


@attention_fwd.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, prefix_lens, backend):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=_lse_dtype(q))


@torch.library.custom_op("generalist::attention_bwd", mutates_args=())
def attention_bwd(dout: Tensor, dlse: Tensor | None, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                  lse: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
                  max_seqlen_k: int, softmax_scale: float, causal: bool, prefix_lens: Tensor | None,
                  backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """Varlen attention backward: (dq, dk, dv). dlse, the gradient of lse, may be None."""
    args = (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, prefix_lens)
    impl = BACKENDS.resolve(backend, *args)
    return impl.functions["backward"](dout, dlse, q, k, v, out, lse, *args[3:])


@attention_bwd.register_fake
def _(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
      softmax_scale, causal, prefix_lens, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, prefix_lens, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, prefix_lens)
    ctx.static = (max_q, max_k, scale, causal, backend)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k, prefix_lens = ctx.saved_tensors
    max_q, max_k, scale, causal, backend = ctx.static
    dq, dk, dv = attention_bwd(dout, dlse, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, causal,
                               prefix_lens, backend)
    return dq, dk, dv, None, None, None, None, None, None, None, None


attention_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerAttention(torch.autograd.Function):
    """What the registered op and its autograd do, for eager calls that record a graph, calling
    the resolved backend directly: no op dispatch on the way in or out (Registry.call)."""

    @staticmethod
    def forward(ctx, impl, q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, prefix_lens):
        out, lse = impl.functions["forward"](q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, prefix_lens)
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, prefix_lens)
        ctx.static = (impl, max_q, max_k, scale, causal)
        ctx.set_materialize_grads(False)  # an unused lse gets no gradient, not a tensor of zeros
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, cu_q, cu_k, prefix_lens = ctx.saved_tensors
        impl, max_q, max_k, scale, causal = ctx.static
        if dout is None:  # only lse was used
            dout = torch.zeros_like(out)
        args = (dout, dlse, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, causal, prefix_lens)
        if torch.is_grad_enabled():  # create_graph: the registered op, whose result refuses a second backward
            dq, dk, dv = attention_bwd(*args, impl.name)
        else:
            dq, dk, dv = impl.functions["backward"](*args)
        return None, dq, dk, dv, None, None, None, None, None, None, None


def flash_attn_varlen_func(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                           max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float | None = None,
                           causal: bool = False, *, prefix_lens: Tensor | None = None,
                           return_lse: bool = False, backend: str = "auto"):
    """Attention over packed sequences of different lengths (self- or cross-attention).

    q (Tq, H, D); k, v (Tk, Hkv, D) with H % Hkv == 0; cu_seqlens_q / cu_seqlens_k int32 (B+1,)
    cumulative lengths starting at 0; max_seqlen_* at least the longest sequence. Causal masks
    are bottom-right aligned; `prefix_lens` int32 (B,) makes the first keys of each sequence
    visible to all of its queries (needs causal=True). Returns out (Tq, H, D) in q's dtype, and
    lse (H, Tq) fp32 (fp64 for fp64 inputs) too when `return_lse`.
    """
    BACKENDS.check_name(backend)
    causal = checks.check_causal(causal)
    max_q, max_k = checks.check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                       causal, prefix_lens)
    scale = checks.check_scale(softmax_scale, q.shape[-1])
    # strided offsets and lengths (slices of larger tensors) are valid; the kernels read contiguous ones
    cu_q, cu_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()
    prefix_lens = None if prefix_lens is None else prefix_lens.contiguous()
    out, lse = BACKENDS.call(attention_fwd, "forward", backend, q, k, v, cu_q, cu_k, max_q, max_k,
                             scale, causal, prefix_lens, autograd=_EagerAttention)
    return (out, lse) if return_lse else out


def _equal_lengths(b: int, s: int, device) -> Tensor:
    """cu_seqlens of b sequences of s tokens: 0, s, ..., b*s (int32), in one op."""
    if s == 0:
        return torch.zeros(b + 1, dtype=torch.int32, device=device)
    return torch.arange(0, (b + 1) * s, s, dtype=torch.int32, device=device)


def flash_attn_func(q: Tensor, k: Tensor, v: Tensor, softmax_scale: float | None = None, causal: bool = False,
                    *, return_lse: bool = False, backend: str = "auto"):
    """Attention over a dense batch: q (B, Sq, H, D); k, v (B, Sk, Hkv, D) with H % Hkv == 0.

    Returns out (B, Sq, H, D) in q's dtype, and lse (B, H, Sq) fp32 (fp64 for fp64
    inputs) too when `return_lse`.
    """
    BACKENDS.check_name(backend)
    checks.check_dense(q, k, v)
    causal = checks.check_causal(causal)
    scale = checks.check_scale(softmax_scale, q.shape[-1])
    b, sq, h, d = q.shape
    sk = k.shape[1]
    cu_q = _equal_lengths(b, sq, q.device)
    cu_k = cu_q if sk == sq else _equal_lengths(b, sk, q.device)
    out, lse = BACKENDS.call(attention_fwd, "forward", backend, q.reshape(b * sq, h, d),
                             k.reshape(b * sk, *k.shape[2:]), v.reshape(b * sk, *v.shape[2:]), cu_q, cu_k,
                             sq, sk, scale, causal, None, autograd=_EagerAttention)
    out = out.view(b, sq, h, d)
    return (out, lse.view(h, b, sq).transpose(0, 1)) if return_lse else out


from generalist.ops import attention_triton  # noqa: F401,E402  (registers "triton" when triton imports)
from generalist.ops import attention_cuda  # noqa: F401,E402  (registers "cuda" when built with CUDA)
