"""varlen_positions: for each token of a packed stream, its sequence and its position in it.

cu_seqlens int32 (B+1,) -> (seq_idx_T int32, pos_T int32) with T = cu_seqlens[-1]. The
reference is plain PyTorch; the compiled extension (csrc/cpu, csrc/cuda) registers faster
kernels for CPU and CUDA when it is built. Used for per-sequence positions (rotary, learned)
and for token -> example maps in the packer.
"""

from __future__ import annotations

import operator

import torch
from torch import Tensor

from generalist import _ext
from generalist.ops import _attention_checks as checks


@torch.library.custom_op("generalist::varlen_positions", mutates_args=())
def _varlen_positions(cu_seqlens: Tensor, total: int) -> tuple[Tensor, Tensor]:
    return varlen_positions_reference(cu_seqlens, total)


def varlen_positions_reference(cu_seqlens: Tensor, total: int) -> tuple[Tensor, Tensor]:
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    seq_idx = torch.repeat_interleave(torch.arange(lens.numel(), device=cu_seqlens.device), lens,
                                      output_size=total)
    pos = torch.arange(total, device=cu_seqlens.device) - cu_seqlens.long()[seq_idx]
    return seq_idx.to(torch.int32), pos.to(torch.int32)


@_varlen_positions.register_fake
def _(cu_seqlens, total):
    return cu_seqlens.new_empty((total,)), cu_seqlens.new_empty((total,))


if _ext.has_extension():
    _varlen_positions.register_kernel("cpu")(torch.ops.generalist._varlen_positions)
if _ext.cuda_built():
    _varlen_positions.register_kernel("cuda")(torch.ops.generalist._varlen_positions)


def varlen_positions(cu_seqlens: Tensor, total: int) -> tuple[Tensor, Tensor]:
    """cu_seqlens int32 (B+1,) starting at 0, non-decreasing, ending at `total`.

    Returns seq_idx (total,) and pos (total,), both int32.
    """
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError("cu_seqlens must be a 1-D tensor with at least one entry")
    if cu_seqlens.dtype != torch.int32:
        raise ValueError(f"cu_seqlens must be int32, got {cu_seqlens.dtype}")
    if isinstance(total, bool):  # True would pass as 1
        raise ValueError("total must be an int, got bool")
    if not isinstance(total, (int, torch.SymInt)):  # an int as it is: under torch.compile, a symbol
        try:
            total = operator.index(total)
        except TypeError:
            raise ValueError(f"total must be an int, got {type(total).__name__}") from None
    if not torch.compiler.is_compiling() and not checks.checked_before(cu_seqlens, ("positions", total)):
        values = cu_seqlens.tolist()  # a device sync, once per tensor
        if values[0] != 0 or any(b < a for a, b in zip(values, values[1:])):
            raise ValueError(f"cu_seqlens must start at 0 and be non-decreasing, got {values}")
        if values[-1] != total:
            raise ValueError(f"cu_seqlens[-1] is {values[-1]} but total is {total}")
        checks.remember_checked(cu_seqlens, ("positions", total))
    return _varlen_positions(cu_seqlens, total)
