"""The MoE layer against hand-written per-token loops (router, top-k, experts, drops, counts).

Shapes: T tokens, D model dim, F expert hidden dim, E routed experts, K experts per token.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from generalist.modules.moe import MoE, MoEConfig


def _moe(gen, **kw):
    cfg = MoEConfig(**{"d_model": 12, "d_ff": 20, **kw})
    moe = MoE(cfg).double()
    with torch.no_grad():  # O(1) weights so routing decisions are far from ties
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * (0.5 if p.dim() == 2 else 0.3))
    return moe


def _ids(gen, t, n):
    return torch.randint(0, n, (t,), generator=gen)


def swiglu(x_D, w1_DF, w3_DF, w2_FD):
    return (F.silu(x_D @ w1_DF) * (x_D @ w3_DF)) @ w2_FD


def hand_routing(moe, x_TD, task_ids, modality_ids):
    """Per token: router logits from x + embeddings, softmax, top-k by a Python sort, renormalised."""
    c, out = moe.config, []
    for t in range(x_TD.shape[0]):
        h = x_TD[t]
        if c.condition_router:
            h = h + moe.task_emb.weight[task_ids[t]] + moe.modality_emb.weight[modality_ids[t]]
        logits = moe.router.weight @ h
        probs = torch.softmax(logits, dim=0)
        top = sorted(range(c.n_routed), key=lambda e: -probs[e].item())[:c.top_k]
        total = sum(probs[e] for e in top)
        out.append((logits, probs, [(e, probs[e] / total) for e in top]))
    return out


def hand_forward(moe, x_TD, task_ids, modality_ids, capacity=None):
    """Shared experts one by one (slices of the wide SwiGLU) + the kept routed experts, token by
    token. With a capacity, each expert admits every token's first choice (token by token), then
    second choices, ... until it is full."""
    c = moe.config
    routing = hand_routing(moe, x_TD, task_ids, modality_ids) if c.n_routed else None
    used, admitted = [0] * c.n_routed, set()
    for j in range(c.top_k if routing else 0):
        for t in range(x_TD.shape[0]):
            e = routing[t][2][j][0]
            if capacity is None or used[e] < capacity:
                used[e] += 1
                admitted.add((t, e))
    ys, kept = [], []
    for t in range(x_TD.shape[0]):
        y = torch.zeros(c.d_model, dtype=x_TD.dtype)
        for s in range(c.n_shared):
            cols = slice(s * c.d_ff, (s + 1) * c.d_ff)
            y = y + swiglu(x_TD[t], moe.shared_w1_DH[:, cols], moe.shared_w3_DH[:, cols], moe.shared_w2_HD[cols])
        for e, weight in routing[t][2] if routing else []:
            if (t, e) not in admitted:
                continue  # dropped: contributes nothing
            kept.append((t, e))
            y = y + weight * swiglu(x_TD[t], moe.w1_EDF[e], moe.w3_EDF[e], moe.w2_EFD[e])
        ys.append(y)
    return torch.stack(ys), kept, routing


def test_one_expert_top1_equals_dense_swiglu(gen):
    moe = _moe(gen, n_shared=0, n_routed=1, top_k=1)
    x = torch.randn(37, 12, generator=gen, dtype=torch.float64, requires_grad=True)
    y, stats = moe(x, _ids(gen, 37, 1), _ids(gen, 37, 5))
    dy = torch.randn(37, 12, generator=gen, dtype=torch.float64)
    y.backward(dy)
    x2 = x.detach().clone().requires_grad_(True)
    w1, w3, w2 = (p[0].detach().clone().requires_grad_(True) for p in (moe.w1_EDF, moe.w3_EDF, moe.w2_EFD))
    dense = (F.silu(x2 @ w1) * (x2 @ w3)) @ w2
    dense.backward(dy)
    tight = dict(atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(y, dense, **tight)
    torch.testing.assert_close(x.grad, x2.grad, **tight)
    for p, ref in ((moe.w1_EDF, w1), (moe.w3_EDF, w3), (moe.w2_EFD, w2)):
        torch.testing.assert_close(p.grad[0], ref.grad, **tight)
    assert stats.counts_by_task.tolist() == [[37]] and stats.dropped.item() == 0
    assert stats.balance_loss.item() == pytest.approx(1.0)  # one expert takes everything: f = P = 1


def test_no_routed_experts_is_dense_shared_ffn(gen):
    moe = _moe(gen, n_shared=2, n_routed=0, n_tasks=3)
    x = torch.randn(9, 12, generator=gen, dtype=torch.float64)
    y, stats = moe(x, _ids(gen, 9, 3), _ids(gen, 9, 5))
    want, _, _ = hand_forward(moe, x, None, None)
    torch.testing.assert_close(y, want)
    assert stats.aux_loss.item() == 0.0 and stats.dropped.item() == 0
    assert stats.aux_loss.dtype == torch.float64  # the router's dtype for fp64 x, as with routed experts
    assert stats.counts_by_task.shape == (3, 0) and stats.counts_by_modality.shape == (5, 0)
    assert moe.router is None and moe.w1_EDF is None


@pytest.mark.parametrize("condition_router", [True, False])
def test_dropless_output_is_weighted_sum_of_topk_experts(gen, condition_router):
    moe = _moe(gen, n_shared=2, n_routed=6, top_k=3, n_tasks=3, condition_router=condition_router)
    t = 29
    x = torch.randn(t, 12, generator=gen, dtype=torch.float64)
    tasks, mods = _ids(gen, t, 3), _ids(gen, t, 5)
    y, stats = moe(x, tasks, mods)
    want, kept, _ = hand_forward(moe, x, tasks, mods)
    torch.testing.assert_close(y, want, atol=1e-12, rtol=1e-12)
    assert len(kept) == t * 3 and stats.dropped.item() == 0


@pytest.mark.parametrize("n_routed", [6, 0])
def test_without_stats_the_output_is_the_same_and_no_statistics_are_made(gen, monkeypatch, n_routed):
    """stats=False (decoding) gives the same y and no MoEStats, and never reaches router_stats
    (where data parallelism all-reduces)."""
    moe = _moe(gen, n_shared=1, n_routed=n_routed, top_k=2, n_tasks=3).eval()
    x = torch.randn(11, 12, generator=gen, dtype=torch.float64)
    tasks, mods = _ids(gen, 11, 3), _ids(gen, 11, 5)
    y, stats = moe(x, tasks, mods)
    assert stats is not None
    monkeypatch.setattr(MoE, "router_stats", lambda *a: pytest.fail("router_stats ran"))
    y_fast, none = moe(x, tasks, mods, stats=False)
    assert none is None
    torch.testing.assert_close(y_fast, y, rtol=0, atol=0)


def test_gradients_reach_router_and_embeddings(gen):
    moe = _moe(gen, n_routed=4, top_k=2, n_tasks=2)
    x = torch.randn(16, 12, generator=gen, dtype=torch.float64, requires_grad=True)
    y, stats = moe(x, _ids(gen, 16, 2), _ids(gen, 16, 5))
    (y.square().sum() + stats.aux_loss).backward()
    for name, p in moe.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def _hand_counts(kept, ids, n, e):
    counts = torch.zeros(n, e, dtype=torch.int64)
    for t, expert in kept:
        counts[ids[t], expert] += 1
    return counts


def test_capacity_drops_later_tokens_and_counts_match(gen):
    moe = _moe(gen, n_shared=1, n_routed=4, top_k=2, n_tasks=3, capacity_factor=0.25)
    t = 16
    capacity = math.ceil(0.25 * t * 2 / 4)  # 2 per expert, 8 of the 32 assignments at most
    x = torch.randn(t, 12, generator=gen, dtype=torch.float64)
    tasks, mods = _ids(gen, t, 3), _ids(gen, t, 5)
    moe.train()
    y, stats = moe(x, tasks, mods)
    want, kept, routing = hand_forward(moe, x, tasks, mods, capacity=capacity)
    chosen = [sum(e == c for r in routing for c, _ in r[2]) for e in range(4)]
    assert stats.dropped.item() == sum(max(0, n - capacity) for n in chosen) == t * 2 - len(kept) >= 24
    torch.testing.assert_close(y, want, atol=1e-12, rtol=1e-12)
    assert torch.equal(stats.counts_by_task, _hand_counts(kept, tasks, 3, 4))
    assert torch.equal(stats.counts_by_modality, _hand_counts(kept, mods, 5, 4))
    assert stats.counts_by_task.sum().item() == t * 2 - stats.dropped.item()
    moe.eval()  # inference is always dropless
    y_eval, stats_eval = moe(x, tasks, mods)
    assert stats_eval.dropped.item() == 0
    torch.testing.assert_close(y_eval, hand_forward(moe, x, tasks, mods)[0], atol=1e-12, rtol=1e-12)


def test_counts_and_losses_match_hand_computation(gen):
    e, k, t = 5, 2, 41
    moe = _moe(gen, n_routed=e, top_k=k, n_tasks=4, aux_loss_weight=0.3, z_loss_weight=0.07)
    x = torch.randn(t, 12, generator=gen, dtype=torch.float64)
    tasks, mods = _ids(gen, t, 4), _ids(gen, t, 5)
    _, stats = moe(x, tasks, mods)
    _, kept, routing = hand_forward(moe, x, tasks, mods)
    assert torch.equal(stats.counts_by_task, _hand_counts(kept, tasks, 4, e))
    assert torch.equal(stats.counts_by_modality, _hand_counts(kept, mods, 5, e))
    assert stats.counts_by_task.dtype == torch.int64 and stats.counts_by_task.sum().item() == t * k
    f = [sum(ex == c for r in routing for c, _ in r[2]) / (t * k) for ex in range(e)]
    p = [sum(r[1][ex].item() for r in routing) / t for ex in range(e)]
    balance = e * sum(fi * pi for fi, pi in zip(f, p))
    z = sum(torch.logsumexp(r[0], dim=0).item() ** 2 for r in routing) / t
    assert stats.balance_loss.item() == pytest.approx(balance, rel=1e-10)
    assert stats.z_loss.item() == pytest.approx(z, rel=1e-10)
    assert stats.aux_loss.item() == pytest.approx(0.3 * balance + 0.07 * z, rel=1e-10)
    assert math.isfinite(stats.aux_loss.item()) and stats.aux_loss.requires_grad


@pytest.mark.parametrize("condition_router", [True, False])
def test_task_and_modality_condition_the_router(gen, condition_router):
    moe = _moe(gen, n_routed=4, n_tasks=3, condition_router=condition_router)
    x = torch.randn(6, 12, generator=gen, dtype=torch.float64)
    tasks, mods = torch.zeros(6, dtype=torch.int64), torch.zeros(6, dtype=torch.int64)
    base = moe.router_logits(x, tasks, mods)
    for ids_changed in ("task", "modality"):
        t2, m2 = tasks.clone(), mods.clone()
        (t2 if ids_changed == "task" else m2)[2] = 1
        logits = moe.router_logits(x, t2, m2)
        assert torch.equal(logits[[0, 1, 3, 4, 5]], base[[0, 1, 3, 4, 5]])
        assert torch.equal(logits[2], base[2]) != condition_router, ids_changed


def test_router_conditioning_tables_get_the_summed_gradient(gen):
    """The task and modality tables add their rows to the router's input, and their gradient is
    each row's sum over the tokens that used it (thousands of tokens share a handful of rows)."""
    moe = _moe(gen, n_routed=4, n_tasks=3, condition_router=True)
    x = torch.randn(40, 12, generator=gen, dtype=torch.float64)
    tasks = torch.randint(0, 3, (40,), generator=gen)
    mods = torch.randint(0, moe.modality_emb.num_embeddings, (40,), generator=gen)
    g = torch.randn(40, 4, generator=gen, dtype=torch.float64)
    (moe.router_logits(x, tasks, mods) * g).sum().backward()
    h = x + moe.task_emb.weight.detach().double()[tasks] + moe.modality_emb.weight.detach().double()[mods]
    assert torch.allclose(moe.router_logits(x, tasks, mods), F.linear(h, moe.router.weight.double()))
    dh = g @ moe.router.weight.detach().double()  # d(loss)/d(router input), (T, D)
    for table, ids in ((moe.task_emb, tasks), (moe.modality_emb, mods)):
        want = torch.zeros_like(table.weight, dtype=torch.float64).index_add_(0, ids, dh)
        assert torch.allclose(table.weight.grad.double(), want), table


def test_init_scales(gen):
    torch.manual_seed(gen.initial_seed())
    moe = MoE(MoEConfig(d_model=64, d_ff=256, n_shared=1, n_routed=8), init_scale=0.25)
    assert moe.w1_EDF.std().item() == pytest.approx(0.02, rel=0.05)
    assert moe.w2_EFD.std().item() == pytest.approx(0.005, rel=0.05)
    assert moe.shared_w2_HD.std().item() == pytest.approx(0.005, rel=0.05)
    assert moe.router.weight.std().item() < 0.01


@pytest.mark.parametrize("kw,match", [
    (dict(top_k=5), r"top_k must be in \[1, n_routed=4\]"),
    (dict(top_k=0), "top_k"),
    (dict(n_shared=0, n_routed=0), "at least one expert"),
    (dict(n_routed=-1), "n_routed must be a non-negative int"),
    (dict(d_model=0), "d_model must be a positive int"),
    (dict(n_tasks=0), "n_tasks must be a positive int"),
    (dict(capacity_factor=0.0), "capacity_factor must be None or a positive number"),
    (dict(capacity_factor=float("inf")), "capacity_factor"),
    (dict(router_jitter=1.5), "router_jitter"),
    (dict(aux_loss_weight=-1.0), "aux_loss_weight must be >= 0"),
])
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        MoEConfig(**{"d_model": 8, "d_ff": 16, **kw})


@pytest.mark.parametrize("x,tasks,mods,match", [
    (torch.randn(12), torch.zeros(5, dtype=torch.int64), torch.zeros(5, dtype=torch.int64), r"x_TD must have shape \(T, d_model=12\)"),
    (torch.randn(5, 11), torch.zeros(5, dtype=torch.int64), torch.zeros(5, dtype=torch.int64), "got \\(5, 11\\)"),
    (torch.randn(5, 12), torch.zeros(4, dtype=torch.int64), torch.zeros(5, dtype=torch.int64), r"task_ids_T must have shape \(T=5,\)"),
    (torch.randn(5, 12), torch.zeros(5, dtype=torch.int64), torch.zeros(5), "modality_ids_T must be int32 or int64"),
    (torch.randn(5, 12), torch.tensor([0, 1, 2, 0, 0]), torch.zeros(5, dtype=torch.int64), r"task_ids_T must lie in \[0, 2\)"),
    (torch.randn(5, 12), torch.zeros(5, dtype=torch.int64), torch.tensor([0, -1, 0, 0, 0]), r"modality_ids_T must lie in \[0, 5\)"),
])
def test_bad_input(x, tasks, mods, match):
    moe = MoE(MoEConfig(d_model=12, d_ff=8, n_tasks=2))
    with pytest.raises(ValueError, match=match):
        moe(x, tasks, mods)


def test_id_values_are_read_once_per_tensor_and_again_after_a_write(gen, monkeypatch):
    """Reading task/modality ids is a device sync on a GPU: the layers of a model share the ids
    of a batch, so they are checked once; an in-place write makes them checked again."""
    import sys

    checks = sys.modules["generalist.ops._attention_checks"]
    reads = []
    remember = checks.remember_checked
    monkeypatch.setattr(checks, "remember_checked", lambda x, key: reads.append(key) or remember(x, key))
    moe = MoE(MoEConfig(d_model=12, d_ff=8, n_tasks=2))
    x, tasks, mods = torch.randn(5, 12, generator=gen), _ids(gen, 5, 2), _ids(gen, 5, 5)
    moe(x, tasks, mods)
    moe(x, tasks, mods)
    assert len(reads) == 2  # tasks and modalities, on the first call only
    tasks[3] = 2  # out of range, written in place
    with pytest.raises(ValueError, match=r"task_ids_T must lie in \[0, 2\)"):
        moe(x, tasks, mods)


def test_low_precision_and_empty_batch(gen):
    moe = MoE(MoEConfig(d_model=12, d_ff=8, n_routed=4, top_k=2)).to(torch.bfloat16)
    x = torch.randn(7, 12, generator=gen).to(torch.bfloat16)
    y, stats = moe(x, torch.zeros(7, dtype=torch.int64), _ids(gen, 7, 5))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all() and stats.aux_loss.dtype == torch.float32
    y0, stats0 = moe(x[:0], torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64))
    assert y0.shape == (0, 12) and stats0.aux_loss.item() == 0.0 and stats0.counts_by_task.sum().item() == 0


def test_compile_fullgraph_matches_eager(gen):
    moe = MoE(MoEConfig(d_model=12, d_ff=8, n_routed=4, top_k=2, n_tasks=2))
    x = torch.randn(10, 12, generator=gen)
    tasks, mods = _ids(gen, 10, 2), _ids(gen, 10, 5)

    def loss(x):
        y, stats = moe(x, tasks, mods)
        return y.square().sum() + stats.aux_loss, stats.counts_by_task

    results = []
    for fn in (loss, torch.compile(loss, fullgraph=True, backend="aot_eager")):
        moe.zero_grad()
        xr = x.clone().requires_grad_(True)
        value, counts = fn(xr)
        value.backward()
        results.append((value.detach(), counts, xr.grad, moe.router.weight.grad.clone()))
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want)


def test_under_autocast_the_experts_run_in_its_dtype_and_the_router_in_fp32(monkeypatch):
    """Training on a GPU runs under bf16 autocast, which does not cast the custom grouped_mm op:
    the layer casts the rows and weights itself (fp32 experts ran on fp32 kernels before), w1 and
    w3 into one operand. The router keeps fp32, so the same tokens go to the same experts as
    without autocast; the result is the fp32 one to bf16 accuracy, and the fp32 parameters get
    fp32 gradients."""
    import generalist.modules.moe as moe_module

    gen = torch.Generator().manual_seed(0)  # (bf16 bounds below: a fixed draw)
    moe = MoE(MoEConfig(d_model=32, d_ff=24, n_shared=1, n_routed=6, top_k=2, n_tasks=3))
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    x = torch.randn(40, 32, generator=gen)
    tasks, mods = _ids(gen, 40, 3), _ids(gen, 40, 5)
    seen = []

    def spy_mm(a, w, sizes, **kw):
        seen.append((a.dtype, w.dtype, tuple(w.shape)))
        return grouped_mm(a, w, sizes, **kw)

    def spy_permute(x_TD, expert_idx_TK, *args, **kw):
        seen.append(expert_idx_TK.clone())
        return permute(x_TD, expert_idx_TK, *args, **kw)

    grouped_mm, permute = moe_module.grouped_mm, moe_module.permute
    monkeypatch.setattr(moe_module, "grouped_mm", spy_mm)
    monkeypatch.setattr(moe_module, "permute", spy_permute)
    runs = []
    for autocast in (False, True):
        seen.clear()
        moe.zero_grad()
        xr = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y, stats = moe(xr, tasks, mods)
            assert moe.router_logits(x, tasks, mods).dtype == torch.float32
        (y.float().square().sum() + stats.aux_loss).backward()
        runs.append((y, stats, seen[0], seen[1:], xr.grad, {n: p.grad for n, p in moe.named_parameters()}))
    (y32, stats32, route32, mms32, dx32, grads32), (y16, stats16, route16, mms16, dx16, grads16) = runs
    f32, bf16 = torch.float32, torch.bfloat16
    assert mms32 == [(f32, f32, (6, 32, 24)), (f32, f32, (6, 32, 24)), (f32, f32, (6, 24, 32))]
    # cast anyway, w1 and w3 become one (E, D, 2F) operand: one grouped matmul for both
    assert mms16 == [(bf16, bf16, (6, 32, 48)), (bf16, bf16, (6, 24, 32))]
    assert torch.equal(route16, route32)  # same routing
    torch.testing.assert_close(stats16.aux_loss, stats32.aux_loss, rtol=0, atol=0)  # fp32 router losses
    assert stats16.aux_loss.dtype == torch.float32
    assert y16.dtype == torch.float32  # the layer's output in x's dtype
    assert _relative_error(y16, y32) < 0.02
    assert _relative_error(dx16, dx32) < 0.02
    for name, g in grads16.items():
        assert g.dtype == torch.float32, name
        # the router's side sees the bf16 expert outputs through the top-k weights: looser
        bound = 0.05 if name.startswith(("router", "task_emb", "modality_emb")) else 0.02
        assert _relative_error(g, grads32[name]) < bound, name


def _relative_error(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def test_fp64_stays_fp64_under_autocast(gen):
    """Autocast leaves fp64 alone, and so does the layer: the same output bit for bit."""
    moe = _moe(gen, n_shared=1, n_routed=4, top_k=2)
    x = torch.randn(9, 12, generator=gen, dtype=torch.float64)
    tasks, mods = torch.zeros(9, dtype=torch.int64), _ids(gen, 9, 5)
    y, _ = moe(x, tasks, mods)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_auto, _ = moe(x, tasks, mods)
    assert y_auto.dtype == torch.float64
    torch.testing.assert_close(y_auto, y, rtol=0, atol=0)


def test_inference_keeps_the_cast_expert_weights_until_they_change(gen, monkeypatch):
    """Without grad under autocast (decoding), the experts' weights are cast once and reused for
    every call until a weight is updated in place; with grad nothing is kept."""
    import generalist.modules.moe as moe_module

    moe = MoE(MoEConfig(d_model=16, d_ff=8, n_routed=4, top_k=2))
    x = torch.randn(6, 16, generator=gen)
    ids, mods = torch.zeros(6, dtype=torch.int64), _ids(gen, 6, 5)
    operands = []

    def spy(a, w, sizes, **kw):
        operands.append(w)
        return grouped_mm(a, w, sizes, **kw)

    grouped_mm = moe_module.grouped_mm
    monkeypatch.setattr(moe_module, "grouped_mm", spy)

    def call(grad=False):
        with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
            return moe(x, ids, mods, stats=False)[0]

    first, second = call(), call()
    assert operands[0] is operands[2] and operands[1] is operands[3]  # w13 and w2, cast once
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    with torch.no_grad():
        moe.w3_EDF.add_(0.5)  # an in-place update (optimizer step, load_state_dict): cast again
    updated = call()
    assert operands[4] is not operands[0] and not torch.equal(updated, first)
    torch.testing.assert_close(updated, call(grad=True).detach(), rtol=0, atol=0)  # as a fresh cast gives
    assert moe._kept_casts is None  # the call with grad dropped what was kept


def test_meta_tensors_pass(gen):
    """Shapes only (e.g. to size a model before allocating it): autocast knows no meta device."""
    from generalist.ops import set_value_checks

    with torch.device("meta"):
        moe = MoE(MoEConfig(d_model=16, d_ff=8, n_routed=4, top_k=2))
        x, ids = torch.empty(5, 16), torch.zeros(5, dtype=torch.int64)
    set_value_checks(False)
    try:
        y, _ = moe(x, ids, ids, stats=False)
    finally:
        set_value_checks(True)
    assert y.shape == (5, 16) and y.device.type == "meta"


def test_inference_casts_follow_a_fused_optimizer_step(gen):
    """AdamW(fused=True) (the trainer's choice) writes the weights without bumping their version
    counters: inference after a step must not reuse the casts made before it."""
    moe = MoE(MoEConfig(d_model=16, d_ff=8, n_routed=4, top_k=2)).eval()
    x, ids = torch.randn(6, 16, generator=gen), torch.zeros(6, dtype=torch.int64)

    def call():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return moe(x, ids, ids, stats=False)[0]

    call()
    opt = torch.optim.AdamW(moe.parameters(), lr=0.5, fused=True)
    for p in moe.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    after = call()
    moe._kept_casts = None
    torch.testing.assert_close(after, call(), rtol=0, atol=0)


def test_capacity_is_the_documented_ceiling_without_float_noise(gen, monkeypatch):
    """ceil(1.1 * 200 * 1 / 4) = 55, though 1.1 * 200 / 4 is 55.000000000000007 in floats."""
    import generalist.modules.moe as moe_module

    seen = []

    def spy(x, idx, e, capacity, **kw):
        seen.append(capacity)
        return permute(x, idx, e, capacity, **kw)

    permute = moe_module.permute
    monkeypatch.setattr(moe_module, "permute", spy)
    moe = MoE(MoEConfig(d_model=8, d_ff=4, n_routed=4, top_k=1, capacity_factor=1.1)).train()
    moe(torch.randn(200, 8, generator=gen), torch.zeros(200, dtype=torch.int64), torch.zeros(200, dtype=torch.int64))
    assert seen == [55]
