"""Worker side of tests/parallel/test_expert.py: one function per scenario, run on every rank of a
gloo group by `spawn_workers`; each rank saves what it saw to out_dir/rank{r}.pt and the test
process compares that with the single-process layer. Cases are built from a seed, so both sides
build the same weights and data.

Shapes: T tokens, D model dim, E routed experts.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from generalist.data.packing import EncodedExample
from generalist.models.config import preset
from generalist.models.generalist import GeneralistModel
from generalist.modules.moe import MoE, MoEConfig
from generalist.parallel.expert import (
    apply_expert_parallel,
    apply_global_router_losses,
    expert_parameter_names,
    gather_expert_optimizer_state,
    gather_expert_state,
    scatter_expert_state,
    shard_expert_optimizer_state,
    sync_expert_parallel_grads,
)

WORLD = 2
D = 12
# tokens per rank for each layer case; "skewed" routes so that one rank sends nothing to itself
# and one expert gets no token at all; "empty_rank" gives rank 1 no tokens.
LENS = {"random": (13, 9), "skewed": (10, 7), "empty_rank": (11, 0)}


def moe_case(seed: int, kind: str):
    """(MoE fp64, x_TD, task_ids_T, modality_ids_T, dy_TD, lens): the full batch, rank r's part
    being rows [sum(lens[:r]), sum(lens[:r + 1]))."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    moe = MoE(MoEConfig(d_model=D, d_ff=20, n_shared=1, n_routed=4, top_k=2, n_tasks=3,
                        aux_loss_weight=0.3, z_loss_weight=0.07)).double()
    with torch.no_grad():  # O(1) weights so routing decisions are far from ties
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * (0.5 if p.dim() == 2 else 0.3))
    lens = LENS[kind]
    t = sum(lens)
    x = torch.randn(t, D, generator=g, dtype=torch.float64)
    tasks, mods = torch.randint(0, 3, (t,), generator=g), torch.randint(0, 5, (t,), generator=g)
    if kind == "skewed":
        # logits_e ~ 8 * (task_emb[task] . u_e) + O(1): task 0 -> experts {0, 1} (rank 0's),
        # task 1 -> {0, 2}; rank 1 has only task-0 tokens, nobody routes to expert 3.
        with torch.no_grad():
            moe.router.weight.zero_()
            moe.router.weight[:, :4] = torch.eye(4, dtype=torch.float64)
            moe.router.weight.add_(0.05 * torch.randn(4, D, generator=g, dtype=torch.float64))
            moe.task_emb.weight.zero_()
            moe.task_emb.weight[0, [0, 1]] = 8.0
            moe.task_emb.weight[1, [0, 2]] = 8.0
            moe.modality_emb.weight.mul_(0.1)
        x = x * 0.3
        tasks = torch.cat([torch.arange(lens[0]) % 2, torch.zeros(lens[1], dtype=torch.int64)])
    dy = torch.randn(t, D, generator=g, dtype=torch.float64)
    return moe, x, tasks, mods, dy, lens


def layer_scenario(rank: int, seed: int, kind: str) -> dict:
    moe, x, tasks, mods, dy, lens = moe_case(seed, kind)
    out = {}
    if kind == "random":  # a layer count the group does not divide: a clear error, nothing converted
        bad = nn.ModuleList([MoE(MoEConfig(d_model=D, d_ff=8, n_routed=4)),
                             MoE(MoEConfig(d_model=D, d_ff=8, n_routed=3))])
        try:
            apply_expert_parallel(bad)
        except ValueError as e:
            out["divisibility_error"] = str(e)
        out["untouched"] = type(bad[0]) is MoE and bad[0].w1_EDF.shape[0] == 4
    lo = sum(lens[:rank])
    rows = slice(lo, lo + lens[rank])
    # Plain data parallelism with global router losses: every expert on every rank.
    dense = apply_global_router_losses(moe_case(seed, kind)[0])
    y_dp, stats_dp = dense(x[rows], tasks[rows], mods[rows])
    ((y_dp * dy[rows]).sum() + stats_dp.aux_loss / WORLD).backward()
    sync_expert_parallel_grads(dense, average=False)  # no expert shards: an all-reduce sum of all
    out.update(dp_aux=stats_dp.aux_loss.detach(), dp_grads={n: p.grad.clone() for n, p in dense.named_parameters()})
    apply_expert_parallel(moe)
    x_r = x[rows].clone().requires_grad_(True)
    y, stats = moe(x_r, tasks[rows], mods[rows])
    ((y * dy[rows]).sum() + stats.aux_loss / WORLD).backward()
    params = dict(moe.named_parameters())
    raw = {n: p.grad.clone() for n, p in params.items()}
    sync_expert_parallel_grads(moe, average=False)
    summed = {n: p.grad.clone() for n, p in params.items()}
    for n, p in params.items():
        p.grad.copy_(raw[n])
    sync_expert_parallel_grads(moe, average=True)
    averaged = {n: p.grad.clone() for n, p in params.items()}
    out.update(y=y.detach(), x_grad=x_r.grad, aux=stats.aux_loss.detach(), balance=stats.balance_loss,
               z=stats.z_loss, counts_by_task=stats.counts_by_task, counts_by_modality=stats.counts_by_modality,
               dropped=stats.dropped, raw=raw, summed=summed, averaged=averaged,
               expert_names=sorted(expert_parameter_names(moe)), local_w1=moe.w1_EDF.detach().clone())
    return out


def tiny_model(seed: int) -> GeneralistModel:
    torch.manual_seed(seed)
    return GeneralistModel(preset("tiny", vocab_size=40, n_tasks=2, bos_id=1, eos_id=2)).eval()


def tiny_batch(seed: int, rank: int) -> list[EncodedExample]:
    """Rank r's examples: text and table inputs, text targets, both tasks."""
    g = torch.Generator().manual_seed(seed * 10 + rank)
    batch = []
    for i in range(2 + rank):
        text = ("text", torch.randint(3, 40, (3 + 2 * i + rank,), generator=g))
        table = ("table", (torch.tensor([0, 2]), torch.randn(2, generator=g)))
        batch.append(EncodedExample([text, table] if i % 2 else [text], i % 2,
                                    torch.randint(3, 40, (2 + i,), generator=g)))
    return batch


def checkpoint_scenario(rank: int, seed: int, out_dir: Path) -> dict:
    model = apply_expert_parallel(tiny_model(seed))
    g = torch.Generator().manual_seed(seed + 1000 + rank)  # each shard's experts diverge from the seed
    with torch.no_grad():
        for name in sorted(expert_parameter_names(model)):
            p = model.get_parameter(name)
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    batch = tiny_batch(seed, rank)
    with torch.no_grad():
        logits = model(batch).logits
    full = gather_expert_state(model)
    full = full and {k: v.clone() for k, v in full.items()}  # entries alias the live weights, like state_dict()
    out = dict(logits=logits, gathered=full, is_none=full is None)
    # A full state dict held by rank 0 only, sharded into the model.
    source = torch.load(out_dir / "source.pt") if rank == 0 else None
    scatter_expert_state(model, source)
    with torch.no_grad():
        out["logits_scattered"] = model(batch).logits
    out["local_w1"] = model.encoder[0].moe.w1_EDF.detach().clone()
    # The optimizer's state: gathered into the single-process layout, sliced back per rank.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    shared, own = torch.Generator().manual_seed(seed + 2000), torch.Generator().manual_seed(seed + 3000 + rank)
    experts = expert_parameter_names(model)
    for name, p in model.named_parameters():  # replicated weights get the same gradient on every rank
        p.grad = torch.randn(p.shape, generator=own if name in experts else shared)
    opt.step()
    live = {i: {k: v.clone() for k, v in st.items()} for i, st in opt.state_dict()["state"].items()}
    full_opt = gather_expert_optimizer_state(model, opt)
    out["opt_is_none"] = full_opt is None
    out["opt_unchanged"] = all(torch.equal(v, live[i][k]) for i, st in opt.state_dict()["state"].items()
                               for k, v in st.items())
    if rank == 0:
        torch.save(full_opt, out_dir / "full_opt.pt")
    dist.barrier()
    full_opt = torch.load(out_dir / "full_opt.pt")  # what every rank reads back from a checkpoint
    out["full_opt_shapes"] = {i: tuple(st["exp_avg"].shape) for i, st in full_opt["state"].items()}
    mine = shard_expert_optimizer_state(model, opt, full_opt)
    out["opt_roundtrip"] = all(torch.equal(v, live[i][k]) for i, st in mine["state"].items() for k, v in st.items())
    w1 = next(i for i, p in enumerate(opt.param_groups[0]["params"]) if p is model.encoder[0].moe.w1_EDF)
    full_opt["state"][w1]["exp_avg"] = full_opt["state"][w1]["exp_avg"][:3]
    try:
        shard_expert_optimizer_state(model, opt, full_opt)
    except ValueError as e:
        out["opt_error"] = str(e)
    bad = None
    if rank == 0:
        bad = dict(source)
        bad["encoder.0.moe.w1_EDF"] = bad["encoder.0.moe.w1_EDF"][:3]
    try:
        scatter_expert_state(model, bad)
    except ValueError as e:
        out["scatter_error"] = str(e)
    return out


def _worker(rank: int, init_file: str, scenario: str, seed: int, out_dir: str) -> None:
    torch.set_num_threads(1)  # two ranks share a small machine
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        if scenario == "checkpoint":
            result = checkpoint_scenario(rank, seed, Path(out_dir))
        else:
            result = layer_scenario(rank, seed, scenario)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn_workers(scenario: str, seed: int, out_dir: Path, timeout_s: float = 120.0) -> list[dict]:
    """Run `scenario` on WORLD gloo ranks (spawned processes, a file rendezvous: no ports) and
    return each rank's saved results; a worker's exception is raised here with its traceback,
    and a hang (a collective that some rank never joins) fails after timeout_s."""
    ctx = mp.start_processes(_worker, args=(str(out_dir / "rendezvous"), scenario, seed, str(out_dir)),
                             nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    os.kill(p.pid, 9)
            raise TimeoutError(f"scenario {scenario!r} did not finish in {timeout_s} s")
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD)]
