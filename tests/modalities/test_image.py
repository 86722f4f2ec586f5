"""ImageEmbed: layouts, patch order, positions, hand-computed tokens, errors, gradients."""

import numpy as np
import pytest
import torch

from generalist.modalities import MODALITIES, ImageConfig, ImageEmbed, build_embedders

D = 16


def _embed(gen, **cfg):
    torch.manual_seed(gen.initial_seed())
    return ImageEmbed(ImageConfig(**cfg), D)


def test_positions_and_tokens_by_hand(gen):
    embed = _embed(gen, patch=4, max_size=64)
    x_CHW = torch.rand(3, 8, 12, generator=gen)
    tokens_LD, positions_L3 = embed(x_CHW)
    assert tokens_LD.shape == (6, D) and tokens_LD.dtype == torch.float32
    assert positions_L3.dtype == torch.int64
    assert positions_L3.tolist() == [[0, r, c] for r in range(2) for c in range(3)]
    W, b = embed.proj.weight, embed.proj.bias
    for k, (_, r, c) in enumerate(positions_L3.tolist()):
        patch = x_CHW[:, 4 * r:4 * r + 4, 4 * c:4 * c + 4].reshape(-1)  # (C, P, P) order
        torch.testing.assert_close(tokens_LD[k], W @ patch + b)


def test_layouts_agree(gen):
    embed = _embed(gen, patch=2, max_size=8)
    img_HWC = torch.randint(0, 256, (6, 4, 3), dtype=torch.uint8, generator=gen)
    ref_LD, ref_pos = embed(img_HWC.permute(2, 0, 1).float() / 255)
    for other in (img_HWC, img_HWC.numpy()):
        out_LD, pos = embed(other)
        torch.testing.assert_close(out_LD, ref_LD)
        assert torch.equal(pos, ref_pos)
    gray_HW = torch.rand(6, 4, generator=gen)
    ref_LD, _ = embed(gray_HW.expand(3, 6, 4))
    for other in (gray_HW, gray_HW[None], gray_HW.numpy()):
        torch.testing.assert_close(embed(other)[0], ref_LD)
    gray_u8 = img_HWC[..., 0]
    ref_LD, _ = embed(gray_u8.float().div(255).expand(3, 6, 4))
    for other in (gray_u8, gray_u8[..., None], gray_u8.numpy()):
        torch.testing.assert_close(embed(other)[0], ref_LD)


def test_sides_not_multiple_of_patch_are_zero_padded(gen):
    embed = _embed(gen, patch=4, max_size=30)
    assert embed.max_positions == (1, 8, 8)
    image = torch.rand(3, 10, 7, generator=gen)
    padded = torch.zeros(3, 12, 8)
    padded[:, :10, :7] = image
    tokens_LD, pos_L3 = embed(image)
    want_LD, want_L3 = embed(padded)
    assert tokens_LD.shape == (3 * 2, D)
    torch.testing.assert_close(tokens_LD, want_LD, rtol=0, atol=0)
    assert torch.equal(pos_L3, want_L3)


def test_numpy_views_and_byte_orders_are_read(gen):
    """A reversed view (negative strides) and a big-endian array are the pictures they hold."""
    embed = _embed(gen, patch=2, max_size=8)
    img = torch.rand(3, 6, 4, generator=gen).numpy()
    ref_LD, _ = embed(np.ascontiguousarray(img[:, ::-1]))
    torch.testing.assert_close(embed(img[:, ::-1])[0], ref_LD)
    torch.testing.assert_close(embed(img[:, ::-1].astype(">f4"))[0], ref_LD)
    torch.testing.assert_close(embed(img.astype(">f8"))[0], embed(img.astype(np.float64))[0])


def test_pixels_slightly_outside_unit_range_are_accepted(gen):
    """Resampling overshoots [0, 1] a little; that is no reason to refuse a picture."""
    embed = _embed(gen, patch=2, max_size=8)
    embed(torch.rand(3, 6, 4, generator=gen) * 1.4 - 0.2)


def test_single_channel_config_and_dtype_follow_module(gen):
    embed = _embed(gen, patch=4, max_size=16, channels=1).double()
    tokens_LD, _ = embed(torch.rand(1, 16, 16, generator=gen))
    assert tokens_LD.shape == (16, D) and tokens_LD.dtype == torch.float64
    with pytest.raises(ValueError, match="image has 3 channels but the embedder reads 1"):
        embed(torch.rand(3, 16, 16))


@pytest.mark.parametrize("image,match", [
    (torch.rand(3, 0, 8), "image height 0"),
    (torch.rand(3, 8, 68), "image width 68 exceeds max_size 64"),
    (torch.rand(2, 8, 8),
     r"channel-first \(C, H, W\) with C in \{1, 3\}; got shape \(2, 8, 8\) with 2 channels"),
    (torch.rand(4, 8, 8), "with 4 channels"),
    (np.zeros((8, 8, 4), np.uint8), r"channel-last \(H, W, C\).*with 4 channels"),
    (np.zeros((8, 8, 2), np.uint8), "with 2 channels"),
    (torch.full((3, 8, 8), float("nan")), "image contains NaN or inf"),
    (torch.tensor([[float("inf")] * 4] * 4), "image contains NaN or inf"),
    (torch.zeros(3, 8, 8, dtype=torch.int64), "must be floating point or uint8; got torch.int64"),
    (torch.rand(1, 3, 8, 8), r"got shape \(1, 3, 8, 8\)"),
    (torch.rand(8), r"got shape \(8,\)"),
    ([[0.0] * 8] * 8, "image must be a torch.Tensor or numpy array; got list"),
    (torch.rand(3, 8, 8) * 255, r"floating image values must be in \[0, 1\]; got values from .* \(0..255 pixels: "
                                "divide by 255"),
    (torch.rand(3, 8, 8) * 4 - 2, r"must be in \[0, 1\]; got values from -1\.\d+ to 1\.\d+$"),
])
def test_bad_inputs_raise(gen, image, match):
    with pytest.raises(ValueError, match=match):
        _embed(gen)(image)


@pytest.mark.parametrize("cfg,match", [
    (dict(patch=0), "patch must be >= 1"),
    (dict(patch=4, max_size=0), r"max_size must be >= 1; got 0"),
    (dict(channels=2), "channels must be 1 or 3"),
])
def test_bad_config_raises(cfg, match):
    with pytest.raises(ValueError, match=match):
        ImageConfig(**cfg)


def test_gradients_reach_parameters(gen):
    embed = _embed(gen)
    tokens_LD, _ = embed(torch.rand(3, 8, 8, generator=gen))
    tokens_LD.square().sum().backward()
    for name, p in embed.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_max_positions_and_registry():
    embedders = build_embedders(8, 300, {"image": ImageConfig(patch=8, max_size=32)})
    image = embedders["image"]
    assert isinstance(image, ImageEmbed) and image.modality == "image" and MODALITIES["image"] == 1
    assert image.max_positions == (1, 4, 4)
    _, positions_L3 = image(torch.rand(3, 32, 32))
    assert tuple(int(m) + 1 for m in positions_L3.max(0).values) == image.max_positions
