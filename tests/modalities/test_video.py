"""VideoEmbed: layouts, tubelet order, positions, hand-computed tokens, errors, gradients."""

import numpy as np
import pytest
import torch

from generalist.modalities import VideoConfig, VideoEmbed, build_embedders

D = 8


def _embed(gen, **cfg):
    torch.manual_seed(gen.initial_seed())
    return VideoEmbed(VideoConfig(**cfg), D)


def test_positions_and_tokens_by_hand(gen):
    embed = _embed(gen, tubelet_time=2, patch=4)
    clip_THWC = torch.rand(4, 8, 12, 3, generator=gen)
    tokens_LD, positions_L3 = embed(clip_THWC)
    assert tokens_LD.shape == (2 * 2 * 3, D) and tokens_LD.dtype == torch.float32
    assert positions_L3.dtype == torch.int64
    assert positions_L3.tolist() == [[a, r, c] for a in range(2) for r in range(2) for c in range(3)]
    W, b = embed.proj.weight, embed.proj.bias
    for k, (a, r, c) in enumerate(positions_L3.tolist()):
        tubelet = clip_THWC[2 * a:2 * a + 2, 4 * r:4 * r + 4, 4 * c:4 * c + 4]  # (t, P, P, C)
        flat = tubelet.permute(3, 0, 1, 2).reshape(-1)  # (C, t, P, P) order
        torch.testing.assert_close(tokens_LD[k], W @ flat + b)


def test_layouts_agree(gen):
    embed = _embed(gen, tubelet_time=2, patch=2)
    clip_u8 = torch.randint(0, 256, (2, 4, 6, 3), dtype=torch.uint8, generator=gen)
    ref_LD, ref_pos = embed(clip_u8.float() / 255)
    for other in (clip_u8, clip_u8.numpy()):
        out_LD, pos = embed(other)
        torch.testing.assert_close(out_LD, ref_LD)
        assert torch.equal(pos, ref_pos)
    gray_THW = torch.rand(2, 4, 6, generator=gen)
    ref_LD, _ = embed(gray_THW[..., None].expand(2, 4, 6, 3))
    for other in (gray_THW, gray_THW[..., None], gray_THW.numpy().astype(np.float64)):
        torch.testing.assert_close(embed(other)[0], ref_LD)


@pytest.mark.parametrize("clip,match", [
    (torch.rand(3, 8, 8, 3), "video frame count 3 is not a positive multiple of tubelet_time 2"),
    (torch.rand(0, 8, 8, 3), "video frame count 0"),
    (torch.rand(2, 10, 8, 3), "video height 10 is not a positive multiple of patch 4"),
    (torch.rand(2, 8, 6, 3), "video width 6 is not a positive multiple of patch 4"),
    (torch.rand(18, 8, 8, 3), "video frame count 18 exceeds max_frames 16"),
    (torch.rand(2, 68, 8), "video height 68 exceeds max_size 64"),
    (torch.rand(2, 8, 68, 1), "video width 68 exceeds max_size 64"),
    (torch.rand(3, 68, 6), "^video frame count 3 is not a positive multiple of tubelet_time 2; video height 68 exceeds "
                           "max_size 64; video width 6 is not a positive multiple of patch 4$"),  # all at once
    (torch.rand(2, 8, 8, 2),
     r"channel-last \(T, H, W, C\) with C in \{1, 3\}; got shape \(2, 8, 8, 2\) with 2 channels"),
    (torch.zeros(2, 8, 8, 4, dtype=torch.uint8), "with 4 channels"),
    (torch.full((2, 8, 8, 3), float("nan")), "video contains NaN or inf"),
    (torch.full((2, 8, 8), float("-inf")), "video contains NaN or inf"),
    (torch.zeros(2, 8, 8, 3, dtype=torch.int32), "floating point or uint8; got torch.int32"),
    (torch.rand(1, 2, 8, 8, 3), r"\(T, H, W, C\) or \(T, H, W\); got shape \(1, 2, 8, 8, 3\)"),
    (torch.rand(8, 8), r"got shape \(8, 8\)"),
    ("clip.mp4", "video must be a torch.Tensor or numpy array; got str"),
    (torch.rand(2, 8, 8, 3) * 255, r"floating video values must be in \[0, 1\].*divide by 255"),
])
def test_bad_inputs_raise(gen, clip, match):
    with pytest.raises(ValueError, match=match):
        _embed(gen)(clip)


@pytest.mark.parametrize("cfg,match", [
    (dict(tubelet_time=0), "tubelet_time must be >= 1"),
    (dict(max_frames=15), r"max_frames \(15\) must be a positive multiple of tubelet_time \(2\)"),
    (dict(max_size=62), r"max_size \(62\) must be a positive multiple of patch \(4\)"),
    (dict(channels=4), "channels must be 1 or 3"),
])
def test_bad_config_raises(cfg, match):
    with pytest.raises(ValueError, match=match):
        VideoConfig(**cfg)


def test_single_channel_config(gen):
    embed = _embed(gen, channels=1)
    assert embed(torch.rand(2, 4, 4, generator=gen))[0].shape == (1, D)
    with pytest.raises(ValueError, match="video has 3 channels but the embedder reads 1"):
        embed(torch.rand(2, 4, 4, 3))


def test_gradients_reach_parameters(gen):
    embed = _embed(gen)
    tokens_LD, _ = embed(torch.rand(2, 8, 8, 3, generator=gen))
    tokens_LD.square().sum().backward()
    for name, p in embed.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_max_positions_and_registry():
    embed = build_embedders(8, 300, {"video": VideoConfig(tubelet_time=2, patch=8, max_frames=8,
                                                          max_size=32)})["video"]
    assert isinstance(embed, VideoEmbed) and embed.max_positions == (4, 4, 4)
    _, positions_L3 = embed(torch.rand(8, 32, 32, 3))
    assert tuple(int(m) + 1 for m in positions_L3.max(0).values) == embed.max_positions
