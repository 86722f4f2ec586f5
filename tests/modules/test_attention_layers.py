import torch

from generalist.modules.attention import SelfAttention, reorder_cache, rotary


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


def test_step_cache_grows_in_place_and_matches_full_pass(gen):
    """A cache sized for 2 positions doubles (2 -> 4 -> 8) over 6 steps; every step still equals
    the full causal pass, and writes land in the buffer without replacing it between doublings."""
    attn = SelfAttention(32, n_heads=4, n_kv_heads=2, causal=True)
    b, s = 3, 6
    x = torch.randn(b, s, 32, generator=gen)
    cu = torch.arange(b + 1, dtype=torch.int32) * s
    with torch.no_grad():
        full = attn(x.flatten(0, 1), torch.arange(s).repeat(b), cu, s).view(b, s, 32)
        cache, steps, buffers = {"capacity": 2}, [], []
        for i in range(s):
            steps.append(attn.step(x[:, i], torch.full((b,), i), cache))
            buffers.append(cache["k"].data_ptr())
    torch.testing.assert_close(torch.stack(steps, 1), full, atol=1e-5, rtol=1e-5)
    assert cache["len"] == s and cache["k"].shape[:2] == (b, 8) and cache["v"].shape[:2] == (b, 8)
    assert len(set(buffers)) == 3 and buffers[2] == buffers[3] and buffers[4] == buffers[5]


def test_step_with_grad_reaches_every_cached_token(gen):
    attn = SelfAttention(32, n_heads=4, n_kv_heads=2, causal=True)
    x = torch.randn(2, 4, 32, generator=gen, requires_grad=True)
    cache = {}
    outs = [attn.step(x[:, i], torch.full((2,), i), cache) for i in range(4)]
    outs[-1].sum().backward()
    assert cache["k"].shape[:2] == (2, 4)
    assert all(x.grad[:, i].abs().sum() > 0 for i in range(4))  # the last step saw every token's k/v


def test_reorder_cache_copies_rows_over_the_filled_part(gen):
    attn = SelfAttention(16, n_heads=2, n_kv_heads=1, causal=True)
    with torch.no_grad():
        cache = {"capacity": 5}
        for i in range(3):
            attn.step(torch.randn(3, 16, generator=gen), torch.full((3,), i), cache)
        before = cache["k"][:, :3].clone(), cache["v"][:, :3].clone()
        reorder_cache(cache, torch.tensor([2, 2, 0]))
    assert torch.equal(cache["k"][:, :3], before[0][[2, 2, 0]])
    assert torch.equal(cache["v"][:, :3], before[1][[2, 2, 0]])


def test_a_streams_rotary_angles_are_made_once_and_match_each_layers_own(gen):
    """Blocks take the rotary angles from their StreamInfo, made by the first layer that asks and
    shared by the rest: a layer given them computes what it computes making its own."""
    from generalist.modules.attention import rotary_angles
    from generalist.modules.blocks import StreamInfo

    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    pos = torch.cat([torch.arange(5), torch.arange(7)])
    s = StreamInfo(cu, 7, pos, torch.zeros(12, dtype=torch.long), torch.zeros(12, dtype=torch.long))
    angles = s.rotary(8)
    assert s.rotary(8) is angles
    assert all(torch.equal(a, b) for a, b in zip(angles, rotary_angles(pos, 8)))
    assert s.rotary(6)[0].shape == (12, 1, 3)
    layer = SelfAttention(32, 4, 2, causal=True, backend="reference")
    x = torch.randn(12, 32, generator=gen)
    assert torch.equal(layer(x, pos, cu, 7, s.rotary(layer.d)), layer(x, pos, cu, 7))
