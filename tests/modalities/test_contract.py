"""The contract every embedder shares: `forward(data)` is `project(prepare(data)[0])`; `prepare`
is the parameter-free part (no gradient, where the data is); `project` over many segments'
features joined by `cat_features` equals each segment projected on its own."""

import math

import pytest
import torch

from generalist.modalities import build_embedders, cat_features


def _inputs(gen):
    t = torch.linspace(0, 0.3, 4800)
    return {
        "text": [torch.tensor([5, 9, 2]), [7], torch.arange(11)],
        "image": [torch.rand(3, 8, 12, generator=gen), torch.rand(5, 9, generator=gen),
                  (torch.rand(6, 6, 3, generator=gen) * 255).to(torch.uint8)],
        "audio": [(torch.sin(2 * math.pi * 440 * t), 16000), (torch.cos(2 * math.pi * 300 * t[:3000]), 8000)],
        "video": [torch.rand(4, 8, 8, 3, generator=gen), torch.rand(2, 4, 12, generator=gen)],
        "table": [(torch.tensor([0, 3, 5]), torch.tensor([1.5, float("nan"), -2.0])), ([7], [0.25])],
    }


@pytest.mark.parametrize("modality", ["text", "image", "audio", "video", "table"])
def test_prepare_then_project_is_forward_for_one_segment_or_many(modality, gen):
    torch.manual_seed(0)
    embedder = build_embedders(16, 32)[modality].double()
    items = _inputs(gen)[modality]
    prepared = [embedder.prepare(data) for data in items]
    for (features, pos), data in zip(prepared, items):
        for f in features if isinstance(features, tuple) else (features,):
            assert not f.requires_grad and f.device.type == "cpu"
        tok, want_pos = embedder(data)
        assert torch.equal(embedder.project(features), tok) and torch.equal(pos, want_pos)
        assert pos.shape == (tok.shape[0], 3) and pos.dtype == torch.int64
    alone = [embedder.project(features) for features, _ in prepared]
    together = embedder.project(cat_features([features for features, _ in prepared], torch.device("cpu")))
    torch.testing.assert_close(together, torch.cat(alone), rtol=1e-12, atol=1e-12)
    g = torch.randn(together.shape, generator=gen, dtype=together.dtype)
    params = list(embedder.parameters())
    got = torch.autograd.grad((together * g).sum(), params, allow_unused=True)
    want = torch.autograd.grad((torch.cat(alone) * g).sum(), params, allow_unused=True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
