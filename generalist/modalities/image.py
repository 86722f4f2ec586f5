"""Images: ViT-style non-overlapping patches, each linearly projected to one token.

Shapes: C channels, H height, W width, P patch side, R = ceil(H / P) patch rows, Q = ceil(W / P)
patch columns (a picture is zero-padded to whole patches), L = R * Q tokens, K = C * P * P values
per patch, D d_model.

Accepted layouts (the dtype decides the layout, so there is never a guess):
    floating tensor or numpy array   (H, W) grayscale, or (C, H, W) channel-first with C in {1, 3};
                                     values in [0, 1], used as given (values further than 0.5
                                     outside, e.g. 0..255, are refused).
    uint8 tensor or numpy array      (H, W) grayscale, or (H, W, C) channel-last with C in {1, 3},
                                     the layout of decoded image files; divided by 255.
Any other dtype is refused. Grayscale is repeated to `ImageConfig.channels` (3 by default) so one
patch projection serves grayscale and colour images alike.

Images whose sides are not multiples of P are zero-padded at the bottom and right to whole
patches (a 28x28 image with P = 7 gives 16 tokens; with P = 8 also 16, the last row and column
of patches half padding). Token order is row-major over the patch grid; token k covers rows
[r*P, (r+1)*P) and columns [q*P, (q+1)*P) with r, q = divmod(k, Q), and its position is (0, r, q). The patch is flattened
in (C, P, P) order, the layout of a Conv2d weight, before the projection.

This module also holds `to_tensor`, `grid_positions` and `PatchEmbed` (the learned projection of
image, audio and video patches), shared by the other modalities.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn


def to_tensor(x: Any, name: str) -> Tensor:
    """A torch.Tensor (as is) or numpy array (copied); anything else is a ValueError."""
    if isinstance(x, Tensor):
        if x.layout != torch.strided:
            raise ValueError(f"{name} must be a dense tensor; got layout {x.layout}")
        if x.is_meta:
            raise ValueError(f"{name} is on the meta device: it holds no values")
        return x
    if isinstance(x, np.ndarray):
        try:  # copied (a reversed view or a big-endian array too) to a layout torch reads
            return torch.from_numpy(np.array(x, dtype=x.dtype.newbyteorder("="), order="C", copy=True))
        except TypeError as e:
            raise ValueError(f"{name} has numpy dtype {x.dtype}, which torch cannot hold") from e
    raise ValueError(f"{name} must be a torch.Tensor or numpy array; got {type(x).__name__}")


def check_finite(x: Tensor, name: str) -> None:
    """ValueError if `x` holds NaN or inf."""
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf values")


# How far floating pixels may stray from [0, 1] (resampling overshoots a little); further out
# they are on some other scale, e.g. 0..255, and would be read as a different picture.
PIXEL_SLACK = 0.5


def check_unit_range(x: Tensor, name: str) -> None:
    """ValueError if floating pixels `x` are plainly not on the [0, 1] scale."""
    if x.numel() == 0:
        return
    lo, hi = float(x.min()), float(x.max())
    if lo < -PIXEL_SLACK or hi > 1 + PIXEL_SLACK:
        hint = " (0..255 pixels: divide by 255, or pass uint8)" if hi > 1 + PIXEL_SLACK and lo >= 0 else ""
        raise ValueError(f"floating {name} values must be in [0, 1]; got values from {lo:g} to {hi:g}{hint}")


def grid_positions(a: int, b: int, c: int, device: torch.device | None = None) -> Tensor:
    """(a * b * c, 3) int64: the coordinates of an (a, b, c) grid in row-major order."""
    axes = [torch.arange(n, device=device) for n in (a, b, c)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)


@dataclass
class ImageConfig:
    """patch: side P of the square patches; max_size: the largest height or width accepted;
    channels: 1 or 3, what the projection reads (grayscale is repeated)."""

    patch: int = 4
    max_size: int = 64
    channels: int = 3

    def __post_init__(self):
        if self.patch < 1:
            raise ValueError(f"ImageConfig.patch must be >= 1; got {self.patch}")
        if self.max_size < 1:
            raise ValueError(f"ImageConfig.max_size must be >= 1; got {self.max_size}")
        if self.channels not in (1, 3):
            raise ValueError(f"ImageConfig.channels must be 1 or 3; got {self.channels}")


def image_to_chw(image: Any, channels: int, name: str = "image") -> Tensor:
    """Any accepted layout (see the module docstring) -> float (channels, H, W), finite."""
    x = to_tensor(image, name)
    if x.dtype == torch.uint8:
        if x.dim() == 3:
            if x.shape[-1] not in (1, 3):
                raise ValueError(f"uint8 {name}s are channel-last (H, W, C) with C in {{1, 3}}; "
                                 f"got shape {tuple(x.shape)} with {x.shape[-1]} channels")
            x = x.permute(2, 0, 1)
        x = x.float() / 255.0
    elif x.is_floating_point():
        if x.dim() == 3 and x.shape[0] not in (1, 3):
            raise ValueError(f"floating {name}s are channel-first (C, H, W) with C in {{1, 3}}; "
                             f"got shape {tuple(x.shape)} with {x.shape[0]} channels (for "
                             f"channel-last data pass uint8 (H, W, C) or permute to (C, H, W))")
    else:
        raise ValueError(f"{name} must be floating point or uint8; got {x.dtype}")
    if x.dim() == 2:
        x = x.unsqueeze(0)
    if x.dim() != 3:
        raise ValueError(f"{name} must be (H, W), (C, H, W) or, for uint8, (H, W, C); "
                         f"got shape {tuple(x.shape)}")
    check_finite(x, name)
    check_unit_range(x, name)
    if x.shape[0] != channels:
        if x.shape[0] != 1:
            raise ValueError(f"{name} has {x.shape[0]} channels but the embedder reads {channels}")
        x = x.expand(channels, -1, -1)
    return x


class PatchEmbed(nn.Module):
    """The learned part shared by image, audio and video: one Linear(K, D) per patch. A subclass
    sets `cfg` and writes `prepare(data) -> (patches (L, K) float, positions (L, 3) int64)`."""

    def __init__(self, patch_values: int, d_model: int):
        super().__init__()
        if d_model < 1:
            raise ValueError(f"d_model must be >= 1; got {d_model}")
        self.proj = nn.Linear(patch_values, d_model)

    def prepare(self, data: Any) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def project(self, patches_NK: Tensor) -> Tensor:
        """The patches of one segment or of many, concatenated (N, K) -> tokens (N, D)."""
        weight = self.proj.weight
        return self.proj(patches_NK.to(device=weight.device, dtype=weight.dtype))

    def forward(self, data: Any) -> tuple[Tensor, Tensor]:
        """One segment's raw data (see `prepare`) -> tokens (L, D) float, positions (L, 3) int64,
        both on the weights' device."""
        patches_LK, positions_L3 = self.prepare(data)
        return self.project(patches_LK), positions_L3.to(self.proj.weight.device)


class ImageEmbed(PatchEmbed):
    """One image -> (tokens_LD, positions_L3); see the module docstring for layouts and order."""

    modality = "image"

    def __init__(self, cfg: ImageConfig, d_model: int):
        super().__init__(cfg.channels * cfg.patch * cfg.patch, d_model)
        self.cfg = cfg

    @property
    def max_positions(self) -> tuple[int, int, int]:
        """Exclusive bounds of (time, patch row, patch column)."""
        side = -(-self.cfg.max_size // self.cfg.patch)
        return (1, side, side)

    def prepare(self, image: Any) -> tuple[Tensor, Tensor]:
        """image: an accepted layout -> patches (L, K) float, positions (L, 3) int64 (0, r, q),
        both where the image is: the checks and the cutting, no parameters."""
        p = self.cfg.patch
        x_CHW = image_to_chw(image, self.cfg.channels)
        C, H, W = x_CHW.shape
        for axis, n in (("height", H), ("width", W)):
            if n == 0:
                raise ValueError(f"image {axis} 0 is empty")
            if n > self.cfg.max_size:
                raise ValueError(f"image {axis} {n} exceeds max_size {self.cfg.max_size}: resize the image to at most "
                                 f"{self.cfg.max_size} pixels a side (the size the model was trained on is best)")
        R, Q = -(-H // p), -(-W // p)
        if (R * p, Q * p) != (H, W):  # zero-pad the bottom and right edges to whole patches
            x_CHW = nn.functional.pad(x_CHW, (0, Q * p - W, 0, R * p - H))
        patches_LK = (x_CHW.reshape(C, R, p, Q, p).permute(1, 3, 0, 2, 4).reshape(R * Q, C * p * p))
        return patches_LK, grid_positions(1, R, Q, device=x_CHW.device)
