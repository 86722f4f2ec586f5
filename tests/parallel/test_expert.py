"""Expert parallelism on 2 gloo ranks (CPU) against the single-process layer.

Convention: the full batch is split by rows, rank r gets its own part (see ep_workers.LENS) and
uses loss_r = sum(y_r * dy_r) + aux / 2, so sum_r loss_r is the single-process loss
sum(y * dy) + aux on the whole batch. Outputs, aux losses, counts and every gradient (x, router,
embeddings, shared experts, each routed expert gathered over ranks) must match it.

Shapes: T tokens, D model dim, E routed experts.
"""

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import ep_workers  # noqa: E402

from generalist.modules.moe import MoE, MoEConfig  # noqa: E402
from generalist.parallel.expert import EXPERT_PARAMS, apply_expert_parallel  # noqa: E402

TIGHT = dict(atol=1e-10, rtol=1e-10)  # fp64 throughout; only summation order differs


@pytest.mark.parametrize("kind", ["random", "skewed", "empty_rank"])
def test_layer_matches_single_process(tmp_path, gen, kind):
    seed = gen.initial_seed()
    ranks = ep_workers.spawn_workers(kind, seed, tmp_path)
    moe, x, tasks, mods, dy, lens = ep_workers.moe_case(seed, kind)
    x = x.requires_grad_(True)
    y, stats = moe(x, tasks, mods)
    ((y * dy).sum() + stats.aux_loss).backward()
    ref = {n: p.grad for n, p in moe.named_parameters()}

    bounds = [0, lens[0], lens[0] + lens[1]]
    for r, got in enumerate(ranks):
        rows = slice(bounds[r], bounds[r + 1])
        torch.testing.assert_close(got["y"], y[rows].detach(), **TIGHT)
        torch.testing.assert_close(got["x_grad"], x.grad[rows], **TIGHT)
        for name in ("aux", "balance", "z"):  # global batch, the same on every rank
            want = {"aux": stats.aux_loss, "balance": stats.balance_loss, "z": stats.z_loss}[name]
            torch.testing.assert_close(got[name], want.detach(), **TIGHT)
        assert got["expert_names"] == sorted(EXPERT_PARAMS)
        assert got["raw"]["w1_EDF"].shape == (2, 12, 20)
    for name in ("counts_by_task", "counts_by_modality", "dropped"):  # per rank; they add up
        assert torch.equal(ranks[0][name] + ranks[1][name], getattr(stats, name)), name

    for name, want in ref.items():
        if name in EXPERT_PARAMS:  # each shard's gradient already sums every rank's tokens
            torch.testing.assert_close(torch.cat([g["raw"][name] for g in ranks]), want, **TIGHT)
            torch.testing.assert_close(torch.cat([g["summed"][name] for g in ranks]), want, **TIGHT)
            torch.testing.assert_close(torch.cat([g["averaged"][name] for g in ranks]), want / 2, **TIGHT)
        else:  # replicated: each rank holds its own part until the all-reduce
            torch.testing.assert_close(ranks[0]["raw"][name] + ranks[1]["raw"][name], want, **TIGHT)
            for g in ranks:
                torch.testing.assert_close(g["summed"][name], want, **TIGHT)
                torch.testing.assert_close(g["averaged"][name], want / 2, **TIGHT)
                if kind != "empty_rank":  # (with no tokens on rank 1, rank 0 holds it all)
                    assert not torch.equal(g["raw"][name], want), name  # the all-reduce was needed
    for r, g in enumerate(ranks):
        assert torch.equal(g["local_w1"], moe.w1_EDF[2 * r:2 * r + 2].detach())
        # replicated experts, global router losses: the same aux loss and, summed, every gradient
        torch.testing.assert_close(g["dp_aux"], stats.aux_loss.detach(), **TIGHT)
        for name, want in ref.items():
            torch.testing.assert_close(g["dp_grads"][name], want, **TIGHT)

    if kind == "random":
        assert "n_routed divisible by 2" in ranks[0]["divisibility_error"]
        assert "'1' has n_routed=3" in ranks[0]["divisibility_error"]
        assert all(g["untouched"] for g in ranks)
    if kind == "skewed":  # the case is what it claims to be
        assert stats.counts_by_task[:, 3].sum() == 0  # an expert with no token anywhere
        assert ranks[1]["counts_by_task"][:, 2:].sum() == 0  # rank 1 sends nothing to itself
        assert ranks[0]["counts_by_task"][:, 2].sum() > 0 and ranks[1]["counts_by_task"][:, :2].sum() > 0
        assert torch.equal(ref["w1_EDF"][3], torch.zeros_like(ref["w1_EDF"][3]))
    if kind == "empty_rank":
        assert ranks[1]["y"].shape == (0, 12) and ranks[1]["counts_by_task"].sum() == 0


def test_checkpoint_gather_and_scatter(tmp_path, gen):
    seed = gen.initial_seed() % 1000
    source = ep_workers.tiny_model(seed + 7)  # what scatter_expert_state loads from rank 0
    torch.save(source.state_dict(), tmp_path / "source.pt")
    ranks = ep_workers.spawn_workers("checkpoint", seed, tmp_path)

    assert ranks[1]["is_none"] and not ranks[0]["is_none"]
    gathered = ranks[0]["gathered"]
    single = ep_workers.tiny_model(seed + 1)
    want_shapes = {k: tuple(v.shape) for k, v in single.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in gathered.items()} == want_shapes
    single.load_state_dict(gathered, strict=True)
    for r, got in enumerate(ranks):
        batch = ep_workers.tiny_batch(seed, r)
        with torch.no_grad():
            torch.testing.assert_close(got["logits"], single(batch).logits, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(got["logits_scattered"], source(batch).logits, atol=1e-6, rtol=1e-5)
        assert torch.equal(got["local_w1"], source.encoder[0].moe.w1_EDF[2 * r:2 * r + 2].detach())
        assert "encoder.0.moe.w1_EDF has shape (3, 32, 32)" in got["scatter_error"]
        assert "(4, 32, 32)" in got["scatter_error"]
    # optimizer state: rank 0 gets the single-process layout, the live state is left alone, and
    # slicing the saved state gives every rank back its own
    assert ranks[1]["opt_is_none"] and not ranks[0]["opt_is_none"]
    by_shape = {tuple(p.shape) for p in single.parameters()}
    assert set(ranks[0]["full_opt_shapes"].values()) == by_shape
    assert (4, 32, 32) in by_shape and (2, 32, 32) not in by_shape
    for got in ranks:
        assert got["opt_unchanged"] and got["opt_roundtrip"]
        assert "has shape (3, 32, 32)" in got["opt_error"] and "(4, 32, 32)" in got["opt_error"]
    # the shards really differ from the seed model, so the gather had work to do
    assert not torch.equal(gathered["decoder.0.moe.w2_EFD"], ep_workers.tiny_model(seed).decoder[0].moe.w2_EFD)


def test_needs_an_initialised_process_group():
    with pytest.raises(RuntimeError, match="init_process_group"):
        apply_expert_parallel(nn.ModuleList([MoE(MoEConfig(d_model=8, d_ff=8))]))
