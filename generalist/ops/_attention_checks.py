"""Input validation for the attention op: every error a caller can cause is a ValueError that
names the argument.

Shape, dtype and device checks are static and also run under torch.compile. Checks on the
*values* of cu_seqlens / prefix_lens need them on the host (a device sync), so they run in
eager mode only, once per tensor: a tensor that passed is remembered (with its version counter,
which every in-place write through torch bumps) and not read again, so the layers of a model that
share one cu_seqlens pay one sync, not one each. Writes that bypass the version counter (through
`.data`, `.numpy()` or the untyped storage) go unseen, as they do for autograd's own checks.
`set_value_checks(False)` switches them off altogether on a hot GPU path whose packer already
guarantees them (the MoE op's group-size checks too); the caller then answers for them: the GPU
kernels size their grids by max_seqlen_*, so one too small leaves rows uncomputed.
"""

from __future__ import annotations

import operator

import numpy as np
import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_HEAD_DIM = 256

_value_checks = True


def set_value_checks(enabled: bool) -> bool:
    """Turn the eager value checks on cu_seqlens and prefix_lens on or off; returns the old setting."""
    global _value_checks
    old, _value_checks = _value_checks, bool(enabled)
    return old


def value_checks_on(*tensors: torch.Tensor | None) -> bool:
    """Whether checks that read values back to the host run now: switched on (set_value_checks),
    not under torch.compile, and none of `tensors` (those the check reads) on the meta device,
    which has no values (shape propagation runs the op's fake implementation on it)."""
    return (_value_checks and not torch.compiler.is_compiling()
            and not any(t is not None and t.is_meta for t in tensors))


_CHECKED = "_generalist_checked_values"


def _stamp(x: torch.Tensor):
    """(version counter, data pointer), or None for tensors without a version counter (those made
    under inference_mode), which are checked on every call."""
    try:
        return x._version, x.data_ptr()
    except RuntimeError:
        return None


_TRUSTED = "trusted: every check"


def checked_before(x: torch.Tensor, key) -> bool:
    """Whether x's values passed the check named by `key` (or x is trusted) and x has not been
    written since."""
    seen = getattr(x, _CHECKED, None)
    return seen is not None and seen[0] == _stamp(x) and (key in seen[1] or _TRUSTED in seen[1])


def remember_checked(x: torch.Tensor, key) -> None:
    """Record that x's current values passed the check named by `key` (hashable)."""
    stamp = _stamp(x)
    if stamp is None:
        return
    seen = getattr(x, _CHECKED, None)
    if seen is None or seen[0] != stamp:
        seen = (stamp, set())
        try:
            setattr(x, _CHECKED, seen)
        except (AttributeError, RuntimeError):  # a tensor subclass without attributes: check every time
            return
    seen[1].add(key)


def trust_values(x: torch.Tensor) -> torch.Tensor:
    """Mark x as passing every value check until it is written: for tensors that library code
    built from values it checked on the host (the model's packed cu_seqlens and task and modality
    ids), whose checks would otherwise read them back from the device, a sync each. Returns x."""
    remember_checked(x, _TRUSTED)
    return x


def _check_tensor(name: str, x, ndim: int, layout: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have shape {layout} ({ndim} dims), got {tuple(x.shape)}")


def _check_common(q, k, v) -> None:
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"q has unsupported dtype {q.dtype}; supported: float16, bfloat16, float32 (float64 on the reference backend)")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise ValueError(f"{name} has dtype {x.dtype} but q has {q.dtype}; q, k and v must share a dtype")
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}; all inputs must be on one device")
    h, hkv, d = q.shape[-2], k.shape[-2], q.shape[-1]
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if k.shape[-1] != d:
        raise ValueError(f"k head dim {k.shape[-1]} differs from q head dim {d}")
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"head dim must be between 1 and {MAX_HEAD_DIM}, got {d}")
    if hkv == 0 or h % hkv != 0:
        raise ValueError(f"q's number of heads ({h}) must be a multiple of k/v's ({hkv}) for GQA/MQA")


def check_scale(softmax_scale, head_dim: int) -> float:
    if softmax_scale is None:
        return head_dim ** -0.5
    try:
        if isinstance(softmax_scale, (str, bytes, bool)):  # float() would take "0.5" and True
            raise TypeError
        scale = float(softmax_scale)
    except (TypeError, ValueError, RuntimeError):  # a list, a tensor of more than one element, ...
        raise ValueError(f"softmax_scale must be a real number or None, got {type(softmax_scale).__name__} "
                         f"{softmax_scale!r}") from None
    if scale != scale or scale in (float("inf"), float("-inf")):
        raise ValueError(f"softmax_scale must be finite, got {softmax_scale}")
    if abs(scale) > 2.0 ** 127:  # kernels scale scores by it (times log2(e)) in float32
        raise ValueError(f"softmax_scale must lie within float32's range (|scale| <= 2^127), got {softmax_scale}")
    return scale


def check_causal(causal) -> bool:
    """`causal` as a bool: a Python or numpy bool, not a string ("False" is truthy) or a number."""
    if not isinstance(causal, (bool, np.bool_)):
        raise ValueError(f"causal must be True or False, got {type(causal).__name__} {causal!r}")
    return bool(causal)


def check_dense(q, k, v) -> None:
    _check_tensor("q", q, 4, "(B, Sq, H, D)")
    _check_tensor("k", k, 4, "(B, Sk, Hkv, D)")
    _check_tensor("v", v, 4, "(B, Sk, Hkv, D)")
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"batch size differs: q has {q.shape[0]}, k/v have {k.shape[0]}")
    _check_common(q, k, v)


def check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, prefix_lens):
    """Validates varlen inputs; returns (max_seqlen_q, max_seqlen_k) as ints."""
    _check_tensor("q", q, 3, "(Tq, H, D)")
    _check_tensor("k", k, 3, "(Tk, Hkv, D)")
    _check_tensor("v", v, 3, "(Tk, Hkv, D)")
    _check_common(q, k, v)
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        _check_tensor(name, cu, 1, "(B+1,)")
        if cu.dtype != torch.int32:
            raise ValueError(f"{name} must be int32, got {cu.dtype}")
        if cu.device != q.device:
            raise ValueError(f"{name} is on {cu.device} but q is on {q.device}")
        if cu.shape[0] < 1:
            raise ValueError(f"{name} must have at least one entry (B+1 with B >= 0)")
    if cu_seqlens_q.shape[0] != cu_seqlens_k.shape[0]:
        raise ValueError(
            f"cu_seqlens_q has {cu_seqlens_q.shape[0] - 1} sequences but cu_seqlens_k has {cu_seqlens_k.shape[0] - 1}"
        )
    maxes = []
    for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        try:
            # an int as it is: under torch.compile it may stand for a symbol (the longest sequence
            # of a dynamic stream), which operator.index would fix to its value, and so compile
            # again for every new length
            if isinstance(m, bool):  # True would pass as 1: a flag in a length's place
                raise TypeError
            m = m if isinstance(m, (int, torch.SymInt)) else operator.index(m)
        except TypeError:
            raise ValueError(f"{name} must be an int, got {type(m).__name__}") from None
        if m < 0:
            raise ValueError(f"{name} must be >= 0, got {m}")
        maxes.append(m)
    if prefix_lens is not None:
        _check_tensor("prefix_lens", prefix_lens, 1, "(B,)")
        if prefix_lens.dtype != torch.int32:
            raise ValueError(f"prefix_lens must be int32, got {prefix_lens.dtype}")
        if prefix_lens.shape[0] != cu_seqlens_q.shape[0] - 1:
            raise ValueError(f"prefix_lens has {prefix_lens.shape[0]} entries but there are {cu_seqlens_q.shape[0] - 1} sequences")
        if prefix_lens.device != q.device:
            raise ValueError(f"prefix_lens is on {prefix_lens.device} but q is on {q.device}")
        if not causal:
            raise ValueError("prefix_lens needs causal=True (keys after the prefix are seen causally); without causal every key is visible already")
    if value_checks_on(cu_seqlens_q, cu_seqlens_k, prefix_lens):
        _check_cu_values("cu_seqlens_q", cu_seqlens_q, q.shape[0], "max_seqlen_q", maxes[0])
        _check_cu_values("cu_seqlens_k", cu_seqlens_k, k.shape[0], "max_seqlen_k", maxes[1])
        if prefix_lens is not None and prefix_lens.numel() and not checked_before(prefix_lens, "prefix"):
            if int(prefix_lens.min()) < 0:
                raise ValueError(f"prefix_lens must be >= 0, got {prefix_lens.tolist()}")
            remember_checked(prefix_lens, "prefix")
    return maxes[0], maxes[1]


def _check_cu_values(name: str, cu: torch.Tensor, total: int, max_name: str, max_seqlen: int) -> None:
    key = ("cu_seqlens", total, max_seqlen)
    if checked_before(cu, key):
        return
    values = cu.tolist()
    if values[0] != 0:
        raise ValueError(f"{name} must start at 0, got {values[0]}")
    for i in range(1, len(values)):
        if values[i] < values[i - 1]:
            raise ValueError(f"{name} must be non-decreasing, but entry {i} ({values[i]}) < entry {i - 1} ({values[i - 1]})")
    if values[-1] != total:
        raise ValueError(f"{name}[-1] is {values[-1]} but the packed tensor has {total} tokens")
    longest = max((b - a for a, b in zip(values, values[1:])), default=0)
    if longest > max_seqlen:
        raise ValueError(f"{max_name} is {max_seqlen} but a sequence in {name} has length {longest}")
    remember_checked(cu, key)
