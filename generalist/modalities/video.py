"""Video: tubelets (t frames x P x P pixels), each linearly projected to one token.

Shapes: T frames, H height, W width, C channels, t tubelet length, P patch side,
A = T // t, R = H // P, Q = W // P tubelet grid, L = A * R * Q tokens, K = C * t * P * P values
per tubelet, D d_model.

Accepted layouts (channel-last, a clip is frames x H x W x C, whatever the dtype):
    (T, H, W, C) with C in {1, 3}, or (T, H, W) grayscale;
    floating values are used as given (in [0, 1]; like images, 0..255 is refused); uint8 values are divided by 255.
Note that this differs from `ImageEmbed`, whose floating inputs are channel-first. Grayscale is
repeated to `VideoConfig.channels` (3 by default).

Token order is row-major over the (A, R, Q) tubelet grid (time slowest); token k covers frames
[a*t, (a+1)*t), rows [r*P, (r+1)*P), columns [q*P, (q+1)*P) and has position (a, r, q). The
tubelet is flattened in (C, t, P, P) order, the layout of a Conv3d weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .image import PatchEmbed, check_finite, check_unit_range, grid_positions, to_tensor


@dataclass
class VideoConfig:
    """tubelet_time: frames per tubelet; patch: pixel side of a tubelet; max_frames / max_size:
    the longest clip and the largest height or width accepted; channels: 1 or 3."""

    tubelet_time: int = 2
    patch: int = 4
    max_frames: int = 16
    max_size: int = 64
    channels: int = 3

    def __post_init__(self):
        for name in ("tubelet_time", "patch"):
            if getattr(self, name) < 1:
                raise ValueError(f"VideoConfig.{name} must be >= 1; got {getattr(self, name)}")
        for name, unit in (("max_frames", "tubelet_time"), ("max_size", "patch")):
            n, u = getattr(self, name), getattr(self, unit)
            if n < u or n % u:
                raise ValueError(f"VideoConfig.{name} ({n}) must be a positive multiple of {unit} ({u})")
        if self.channels not in (1, 3):
            raise ValueError(f"VideoConfig.channels must be 1 or 3; got {self.channels}")


def video_to_cthw(clip: Any, channels: int) -> Tensor:
    """An accepted layout (see the module docstring) -> float (channels, T, H, W), finite."""
    x = to_tensor(clip, "video")
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    elif not x.is_floating_point():
        raise ValueError(f"video must be floating point or uint8; got {x.dtype}")
    if x.dim() == 3:
        x = x.unsqueeze(-1)
    if x.dim() != 4:
        raise ValueError(f"video must be (T, H, W, C) or (T, H, W); got shape {tuple(x.shape)}")
    C = x.shape[-1]
    if C not in (1, 3):
        raise ValueError(f"video is channel-last (T, H, W, C) with C in {{1, 3}}; got shape "
                         f"{tuple(x.shape)} with {C} channels")
    check_finite(x, "video")
    check_unit_range(x, "video")
    if C != channels:
        if C != 1:
            raise ValueError(f"video has {C} channels but the embedder reads {channels}")
        x = x.expand(-1, -1, -1, channels)
    return x.permute(3, 0, 1, 2)


class VideoEmbed(PatchEmbed):
    """One clip -> (tokens_LD, positions_L3); see the module docstring for layouts and order."""

    modality = "video"

    def __init__(self, cfg: VideoConfig, d_model: int):
        super().__init__(cfg.channels * cfg.tubelet_time * cfg.patch * cfg.patch, d_model)
        self.cfg = cfg

    @property
    def max_positions(self) -> tuple[int, int, int]:
        """Exclusive bounds of (tubelet time, tubelet row, tubelet column)."""
        c = self.cfg
        return (c.max_frames // c.tubelet_time, c.max_size // c.patch, c.max_size // c.patch)

    def prepare(self, clip: Any) -> tuple[Tensor, Tensor]:
        """clip: (T, H, W, C) or (T, H, W) -> tubelets (L, K) float, positions (L, 3) int64, both
        where the clip is: the checks and the cutting, no parameters."""
        c = self.cfg
        x_CTHW = video_to_cthw(clip, c.channels)
        C, T, H, W = x_CTHW.shape
        problems = []  # (all of them at once: fixing one should not reveal the next)
        for axis, n, unit, unit_name, limit, limit_name in (
                ("frame count", T, c.tubelet_time, "tubelet_time", c.max_frames, "max_frames"),
                ("height", H, c.patch, "patch", c.max_size, "max_size"),
                ("width", W, c.patch, "patch", c.max_size, "max_size")):
            if n == 0 or n % unit:
                problems.append(f"video {axis} {n} is not a positive multiple of {unit_name} {unit}")
            elif n > limit:
                problems.append(f"video {axis} {n} exceeds {limit_name} {limit}")
        if problems:
            raise ValueError("; ".join(problems))
        t, p = c.tubelet_time, c.patch
        A, R, Q = T // t, H // p, W // p
        tubelets_LK = (x_CTHW.reshape(C, A, t, R, p, Q, p).permute(1, 3, 5, 0, 2, 4, 6)
                       .reshape(A * R * Q, C * t * p * p))
        return tubelets_LK, grid_positions(A, R, Q, device=x_CTHW.device)
