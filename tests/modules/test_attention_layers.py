import torch

from generalist.modules.attention import SelfAttention, rotary


def test_rotary_keeps_norms_and_depends_only_on_offsets(gen):
    q, k = torch.randn(2, 1, 3, 16, generator=gen)
    pos = lambda *p: torch.tensor(p)
    assert torch.allclose(rotary(q, pos(5)).norm(dim=-1), q.norm(dim=-1), atol=1e-5)
    dot = lambda i, j: (rotary(q, pos(i)) * rotary(k, pos(j))).sum(-1)
    torch.testing.assert_close(dot(7, 3), dot(104, 100), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(dot(7, 3), dot(7, 4), atol=1e-3)
    odd = torch.randn(4, 2, 5, generator=gen)  # odd head dim: the last channel passes through
    assert torch.equal(rotary(odd, torch.arange(4))[..., -1], odd[..., -1])


def test_causal_step_with_cache_equals_full_pass(gen):
    torch.manual_seed(0)
    attn = SelfAttention(32, n_heads=4, n_kv_heads=2, causal=True)
    b, s = 3, 6
    x = torch.randn(b, s, 32, generator=gen)
    cu = torch.arange(b + 1, dtype=torch.int32) * s
    full = attn(x.flatten(0, 1), torch.arange(s).repeat(b), cu, s).view(b, s, 32)
    cache = {}
    steps = [attn.step(x[:, i], torch.full((b,), i), cache) for i in range(s)]
    torch.testing.assert_close(torch.stack(steps, 1), full, atol=1e-5, rtol=1e-5)
