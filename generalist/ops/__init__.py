"""Public ops. Attention, decoding, `grouped_mm` and `varlen_positions` are registered
`generalist::` ops with a reference and a fake implementation (and autograd where they train;
`attention_decode` serves inference only); `permute` / `unpermute` are differentiable index
operations in plain torch."""

from generalist.ops._attention_checks import set_value_checks
from generalist.ops._registry import BackendError
from generalist.ops.attention import BACKENDS as ATTENTION_BACKENDS
from generalist.ops.attention import flash_attn_func, flash_attn_varlen_func
from generalist.ops.attention_decode import DECODE_BACKENDS, attention_decode
from generalist.ops.moe import MOE_BACKENDS, grouped_mm, permute, unpermute
from generalist.ops.varlen import varlen_positions

__all__ = [
    "ATTENTION_BACKENDS",
    "attention_decode",
    "DECODE_BACKENDS",
    "BackendError",
    "flash_attn_func",
    "flash_attn_varlen_func",
    "grouped_mm",
    "MOE_BACKENDS",
    "permute",
    "unpermute",
    "set_value_checks",
    "varlen_positions",
]
