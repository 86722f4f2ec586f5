"""Tables: one token per feature of a row, column embedding + value embedding.

Shapes: F features in the row (= L tokens), D d_model, Hd hidden width of the value MLP.

Input is one row as a pair (column_ids (F,), values (F,)): integer column ids in
[0, n_columns), each at most once, and real values where NaN means "missing". Token i is
    column_embedding[column_ids[i]] + value_embedding(values[i])        (value present)
    column_embedding[column_ids[i]] + missing                          (value NaN)
with `missing` a learned (D,) vector. A row is a set of features: they are taken in the order of
their column ids, whatever the order given, and the i-th of them has position (i, 0, 0) (a
row's tokens in another order would be another input to the blocks, whose self-attention
rotates by token order).

The value embedding is a 2-layer MLP of the features (clip(v), symlog(v)), clip(v) = v within
[-VALUE_CLIP, VALUE_CLIP] and symlog(v) = sign(v) log(1 + |v|): the clipped v lets it represent
the usual range of standardized values linearly, symlog tells very large values (counts,
prices) apart on a scale that grows slowly, and the hidden GELU layer lets it learn non-linear
codes (thresholds, bins) that a single Linear(1, D) cannot. Both features are bounded by the
value's logarithm beyond the clip: a raw v would grow the value token with v until it drowns
the column embedding (after the blocks' RMSNorm, 1e6 in column 5 and 1e6 in column 7 were one
token). Values should still be roughly standardized per column by the data pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .image import to_tensor


@dataclass
class TableConfig:
    """n_columns: the number of distinct columns (column ids are in [0, n_columns));
    value_hidden: hidden width Hd of the value MLP."""

    n_columns: int = 64
    value_hidden: int = 64

    def __post_init__(self):
        if self.n_columns < 1:
            raise ValueError(f"TableConfig.n_columns must be >= 1; got {self.n_columns}")
        if self.value_hidden < 1:
            raise ValueError(f"TableConfig.value_hidden must be >= 1; got {self.value_hidden}")


VALUE_CLIP = 5.0  # standard deviations, for standardized columns


def value_features(values_F: Tensor) -> Tensor:
    """(F,) finite values -> (F, 2) MLP inputs (clip(v), symlog v)."""
    return torch.stack([values_F.clamp(-VALUE_CLIP, VALUE_CLIP), torch.sign(values_F) * torch.log1p(values_F.abs())],
                       dim=-1)


def _as_1d(x: Any, name: str, dtype: torch.dtype | None = None) -> Tensor:
    if isinstance(x, (list, tuple)):
        if any(isinstance(v, bool) for v in x):  # torch.tensor([True, 2]) would read True as 1
            raise ValueError(f"{name} must be numbers, not bools; got {str(x)[:80]}")
        try:
            t = torch.tensor(x, dtype=dtype)  # (values as float64: not rounded or overflowed to float32 here)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"{name} must be a list of numbers; got {str(x)[:80]}") from None
    else:
        t = to_tensor(x, name)
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D (F,); got shape {tuple(t.shape)}")
    return t


class TableEmbed(nn.Module):
    """One row (column_ids, values) -> (tokens_LD, positions_L3); see the module docstring."""

    modality = "table"

    def __init__(self, cfg: TableConfig, d_model: int):
        super().__init__()
        if d_model < 1:
            raise ValueError(f"d_model must be >= 1; got {d_model}")
        self.cfg = cfg
        self.column = nn.Embedding(cfg.n_columns, d_model)
        self.value_in = nn.Linear(2, cfg.value_hidden)
        self.value_out = nn.Linear(cfg.value_hidden, d_model)
        self.missing = nn.Parameter(torch.zeros(d_model))
        nn.init.normal_(self.column.weight, std=0.02)
        nn.init.normal_(self.missing, std=0.02)

    @property
    def max_positions(self) -> tuple[int, int, int]:
        """Exclusive bounds of (feature index, -, -); a row holds each column at most once."""
        return (self.cfg.n_columns, 1, 1)

    def prepare(self, row: Any) -> tuple[tuple[Tensor, Tensor], Tensor]:
        """row: (column_ids (F,) int, values (F,) real, NaN = missing) -> ((column ids (F,)
        int64, values (F,) in the weights' dtype), both in column-id order, positions (F, 3) int64
        (i, 0, 0)), all where the row is: the checks, no parameters."""
        if not isinstance(row, (tuple, list)) or len(row) != 2:
            raise ValueError("table input must be a pair (column_ids, values)")
        ids_F = _as_1d(row[0], "column_ids")
        values_F = _as_1d(row[1], "values", torch.float64)
        n = ids_F.shape[0]
        if n != values_F.shape[0]:
            raise ValueError(f"column_ids has {n} entries but values has {values_F.shape[0]}")
        if n == 0:
            raise ValueError("table row is empty (no features)")
        if ids_F.dtype == torch.bool or ids_F.is_floating_point() or ids_F.is_complex():
            raise ValueError(f"column_ids must have an integer dtype; got {ids_F.dtype}")
        if values_F.dtype == torch.bool or values_F.is_complex():
            raise ValueError(f"values must be real numbers; got {values_F.dtype}")
        if not ids_F.is_signed() and ids_F.dtype != torch.uint8:  # torch reduces few unsigned types
            ids_F = ids_F.to(torch.int64)  # uint64 past 2^63 turns negative: refused below
        lo, hi = int(ids_F.min()), int(ids_F.max())
        if lo < 0 or hi >= self.cfg.n_columns:
            raise ValueError(f"column ids must be in [0, {self.cfg.n_columns}); got min {lo}, max {hi}")
        uniq, counts = torch.unique(ids_F, return_counts=True)
        if bool((counts > 1).any()):
            raise ValueError(f"column id {int(uniq[counts > 1][0])} appears more than once in the row")
        if bool(torch.isinf(values_F).any()):
            raise ValueError("values contain inf (use NaN for a missing value)")
        dtype = self.column.weight.dtype
        cast = values_F.to(dtype=dtype)
        if bool(torch.isinf(cast).any()):  # a finite float64 past the model's dtype
            big = values_F[torch.isinf(cast)][0].item()
            raise ValueError(f"value {big:g} overflows the model's {str(dtype).removeprefix('torch.')} "
                             f"(largest {torch.finfo(dtype).max:g}); scale the column down")
        values_F = cast
        order_F = torch.argsort(ids_F)  # (ids are distinct: one order)
        ids_F, values_F = ids_F[order_F], values_F[order_F]
        positions_F3 = torch.zeros(n, 3, dtype=torch.int64, device=ids_F.device)
        positions_F3[:, 0] = torch.arange(n, device=ids_F.device)
        return (ids_F.to(torch.int64), values_F), positions_F3

    def project(self, features: tuple[Tensor, Tensor]) -> Tensor:
        """(column ids (N,), values (N,)) of one row or of many, concatenated -> tokens (N, D)."""
        weight = self.column.weight
        ids_N, values_N = (t.to(device=weight.device) for t in features)
        missing_N = torch.isnan(values_N)
        # Zero the NaNs before the MLP: NaN * 0 in its backward would poison the weight grads.
        feats_N2 = value_features(torch.where(missing_N, 0.0, values_N.to(weight.dtype)))
        value_ND = self.value_out(F.gelu(self.value_in(feats_N2)))
        value_ND = torch.where(missing_N[:, None], self.missing, value_ND)
        return self.column(ids_N) + value_ND

    def forward(self, row: Any) -> tuple[Tensor, Tensor]:
        """row: (column_ids (F,) int, values (F,) real, NaN = missing) -> tokens (F, D),
        positions (F, 3) int64 (i, 0, 0)."""
        features, positions_F3 = self.prepare(row)
        return self.project(features), positions_F3.to(self.column.weight.device)
