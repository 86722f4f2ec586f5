"""Expert parallelism for the routed experts of `MoE` layers, applied from outside the model.

Scope: `apply_expert_parallel(model, group)` converts every `MoE` layer of a model in place so
that each of the W ranks of `group` holds E / W of the layer's E routed experts (rank r holds
experts [r * E/W, (r + 1) * E/W)); the shared experts, the router and its task / modality
embeddings stay replicated, like every other parameter (data parallel). Every rank runs the
model on its own tokens. Per layer and rank:

    router (replicated) -> permute by global expert, so rows bound for one rank are contiguous
    -> all_to_all of the per-expert row counts -> all_to_all of the rows (uneven splits: dropless)
    -> regroup the received rows by local expert -> grouped_mm on the local experts
    -> back to (source rank, expert) order -> all_to_all back -> unpermute with the routing weights

Both row exchanges are autograd functions whose backward is the reverse exchange, so a routed
expert's gradient sums the contributions of every rank's tokens.

Semantics (what the tests check): on rank r the layer's output equals the single-device layer's
output on rank r's tokens. `aux_loss`, `balance_loss` and `z_loss` are computed over the global
batch (the per-expert token fractions, probability sums and token counts are all-reduced), so
they equal the single-device values on the concatenation of every rank's tokens, on every rank.
`counts_by_task`, `counts_by_modality` and `dropped` count the rank's own tokens (sum them over
ranks for the global figures). The capacity limit, when set, applies per source rank to its own
tokens (as in plain data parallelism). The all-reduce in the aux loss is differentiable (its
backward all-reduces the gradient), so gradients are those of the SUM over ranks of each
rank's loss: with loss_r = task_r + aux / W on every rank, routed experts get the gradient of
sum_r task_r + aux directly and replicated parameters get it after `sync_expert_parallel_grads(...,
average=False)` (an all-reduce sum). With the usual loss_r = mean task loss_r + aux and averaged
replicated gradients, the expert gradients are W times too large; `sync_expert_parallel_grads(...,
average=True)` divides them by W. A data-parallel wrapper over the same ranks must skip the
expert parameters (`expert_parameter_names`), which differ between ranks.

`apply_global_router_losses(model, group)` is the same minus the sharding, for plain data
parallelism: every expert stays on every rank and only the router losses become global.

Contract: every rank calls every converted layer the same number of times (an empty local batch
is fine) and backpropagates through the same graph; otherwise the collectives hang. Give the
layers a process group of their own when a data-parallel wrapper (DDP) reduces gradients on
another during backward. The collectives run eagerly: under torch.compile (`compile_block`) the
graph breaks at `routed_experts` and `router_stats`, and what lies around them is compiled
(the split sizes come to the host). Convert before
building the optimizer: the expert parameters are replaced. Checkpoints go through
`gather_expert_state` (full single-device state dict on one rank) and `scatter_expert_state`
(full state dict from one rank into the shards); optimizer state through
`gather_expert_optimizer_state` and `shard_expert_optimizer_state`.
Expert parallelism over a sub-group of a larger data-parallel world (2-D meshes) would also need
the expert gradients all-reduced across the copies of each shard; that is not handled here.

Shapes: T local tokens, D model dim, E routed experts of the layer, L = E / W local experts,
W ranks, S local kept assignments, R rows received from all ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from generalist.modules.moe import MoE

EXPERT_PARAMS = ("w1_EDF", "w3_EDF", "w2_EFD")  # stacked over experts on dim 0; sharded


class _AllToAll(torch.autograd.Function):
    """all_to_all_single along dim 0 with uneven splits; backward sends the gradients back."""

    @staticmethod
    def forward(ctx, x_SD: Tensor, out_splits: list[int], in_splits: list[int], group) -> Tensor:
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        out_RD = x_SD.new_empty((sum(out_splits), *x_SD.shape[1:]))
        dist.all_to_all_single(out_RD, x_SD.contiguous(), out_splits, in_splits, group=group)
        return out_RD

    @staticmethod
    def backward(ctx, dy_RD: Tensor):
        dx_SD = dy_RD.new_empty((sum(ctx.in_splits), *dy_RD.shape[1:]))
        dist.all_to_all_single(dx_SD, dy_RD.contiguous(), ctx.in_splits, ctx.out_splits, group=ctx.group)
        return dx_SD, None, None, None


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; every rank uses the result, so the gradient is the sum of the gradients."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        out = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, dy: Tensor):
        dx = dy.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(dx, group=ctx.group)
        return dx, None


class GlobalRouterLossMoE(MoE):
    """An `MoE` whose router losses (load balance, z-loss) cover the tokens of every rank of
    `stats_group`: the per-expert token fractions, probability sums and token counts are
    all-reduced, so they equal the single-device losses on the concatenation of every rank's
    tokens. Made by `apply_global_router_losses` (plain data parallelism) or
    `apply_expert_parallel`; the experts and the output are those of `MoE`."""

    stats_group: dist.ProcessGroup

    @torch.compiler.disable  # collectives run eagerly: a compiled block (compile_block) breaks its graph here
    def router_stats(self, routed_E: Tensor, sums: Tensor, t: int) -> tuple[Tensor, Tensor, int]:
        # One all-reduce of [router choices per expert, tokens, probability sums, sum of lse^2] in
        # float64 (counts stay exact); the gradient flows back through the sums only.
        e = routed_E.shape[0]
        counts = torch.cat([routed_E, routed_E.new_full((1,), t)]).to(torch.float64)
        both = _AllReduceSum.apply(torch.cat([counts, sums.to(torch.float64)]), self.stats_group)
        return both[:e].detach(), both[e + 1:].to(sums.dtype), int(both[e])


class ExpertParallelMoE(GlobalRouterLossMoE):
    """An `MoE` whose routed experts are sharded over `ep_group`; made by `apply_expert_parallel`
    (which swaps the class of an existing layer, as FSDP2's `fully_shard` does). w1_EDF, w3_EDF
    and w2_EFD hold only the L local experts; everything else is unchanged."""

    ep_group: dist.ProcessGroup
    ep_rank: int
    ep_size: int

    @property
    def n_local(self) -> int:
        return self.config.n_routed // self.ep_size

    def extra_repr(self) -> str:
        lo = self.ep_rank * self.n_local
        return (f"routed experts [{lo}, {lo + self.n_local}) of {self.config.n_routed} "
                f"on rank {self.ep_rank} of {self.ep_size}")

    @torch.compiler.disable  # the exchange's split sizes come to the host: runs eagerly, between graphs
    def routed_experts(self, x_SD: Tensor, sizes_E: Tensor) -> Tensor:
        w, l = self.ep_size, self.n_local
        send_WL = sizes_E.to(torch.int64).reshape(w, l)  # rows for rank j's experts, per expert
        recv_WL = torch.empty_like(send_WL)  # rows from rank j for each local expert
        dist.all_to_all_single(recv_WL, send_WL, group=self.ep_group)
        send_W, recv_W = send_WL.sum(1).tolist(), recv_WL.sum(1).tolist()
        x_RD = _AllToAll.apply(x_SD, recv_W, send_W, self.ep_group)
        # Received rows come ordered (source rank, local expert); grouped_mm wants them by expert.
        # The stable sort keeps source-rank order inside an expert's group.
        expert_R = torch.arange(l, device=x_SD.device).repeat(w).repeat_interleave(recv_WL.reshape(-1))
        order_R = torch.sort(expert_R, stable=True).indices
        inverse_R = torch.empty_like(order_R)
        inverse_R[order_R] = torch.arange(order_R.shape[0], device=order_R.device)
        y_RD = super().routed_experts(x_RD.index_select(0, order_R), recv_WL.sum(0).to(torch.int32))
        return _AllToAll.apply(y_RD.index_select(0, inverse_R), send_W, recv_W, self.ep_group)


def _resolve_group(group):
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("expert parallelism needs torch.distributed initialised first "
                           "(torchrun + torch.distributed.init_process_group)")
    return dist.group.WORLD if group is None else group


def apply_global_router_losses(module: nn.Module, group=None) -> nn.Module:
    """Make the router losses of every `MoE` with routed experts in `module` (itself included)
    global over `group` (default: the world), in place; returns `module`. For plain data
    parallelism: every rank must then call every layer as often as the others (an empty batch
    is fine), since each call all-reduces."""
    group = _resolve_group(group)
    layers = [m for m in module.modules() if isinstance(m, MoE)]
    if not layers:
        raise ValueError(f"apply_global_router_losses found no MoE layer in {type(module).__name__}")
    for m in layers:
        if m.config.n_routed and not isinstance(m, GlobalRouterLossMoE):
            m.__class__ = GlobalRouterLossMoE
            m.stats_group = group
    return module


def apply_expert_parallel(module: nn.Module, group=None) -> nn.Module:
    """Shard the routed experts of every `MoE` in `module` (itself included) over `group`
    (default: the world) in place and return `module`. Layers without routed experts are left
    as they are. Every n_routed must be divisible by the group size; this is checked for all
    layers before any is changed. Replicated weights must already match on every rank (same
    seed, or `scatter_expert_state` afterwards); the local experts are sliced from each layer's
    current full stacks."""
    group = _resolve_group(group)
    w, rank = dist.get_world_size(group), dist.get_rank(group)
    layers = [(name, m) for name, m in module.named_modules() if isinstance(m, MoE)]
    if not layers:
        raise ValueError(f"apply_expert_parallel found no MoE layer in {type(module).__name__}")
    for name, m in layers:
        label = repr(name) if name else "(the module itself)"
        if isinstance(m, GlobalRouterLossMoE):
            raise ValueError(f"MoE layer {label} is already expert-parallel or has global router losses")
        e = m.config.n_routed
        if e % w:
            raise ValueError(f"expert parallelism over {w} ranks needs n_routed divisible by {w}, but MoE "
                             f"layer {label} has n_routed={e}; choose n_routed as a multiple of the "
                             f"expert-parallel world size")
    for _, m in layers:
        if not m.config.n_routed:
            continue
        lo, hi = rank * (m.config.n_routed // w), (rank + 1) * (m.config.n_routed // w)
        for pname in EXPERT_PARAMS:
            full = getattr(m, pname)
            setattr(m, pname, nn.Parameter(full.detach()[lo:hi].clone(), requires_grad=full.requires_grad))
        m.__class__ = ExpertParallelMoE
        m.ep_group, m.ep_rank, m.ep_size, m.stats_group = group, rank, w, group
    return module


def _expert_layers(module: nn.Module) -> list[tuple[str, ExpertParallelMoE]]:
    return [(name, m) for name, m in module.named_modules() if isinstance(m, ExpertParallelMoE)]


def _expert_keys(module: nn.Module) -> list[str]:
    return [f"{name}.{p}" if name else p for name, _ in _expert_layers(module) for p in EXPERT_PARAMS]


def expert_parameter_names(module: nn.Module) -> set[str]:
    """Names (as in module.named_parameters()) of the sharded routed-expert weights: these differ
    between ranks, so a data-parallel gradient reduction over the same ranks must skip them."""
    return set(_expert_keys(module))


def sync_expert_parallel_grads(module: nn.Module, group=None, *, average: bool = True) -> None:
    """Reduce gradients after backward on every rank of `group` (see the module docstring).

    average=False: replicated gradients are summed over ranks (the gradient of sum_r loss_r);
    expert gradients are left as they are (already that sum). average=True: replicated gradients
    are averaged and expert gradients divided by W (the gradient of mean_r loss_r).
    Parameters without a gradient must be the same on every rank; they are left alone."""
    group = _resolve_group(group)
    w = dist.get_world_size(group)
    experts = {id(p) for _, m in _expert_layers(module) for p in (getattr(m, n) for n in EXPERT_PARAMS)}
    params = [p for p in module.parameters() if p.requires_grad]
    replicated = [p for p in params if id(p) not in experts]
    if replicated:
        has_grad = torch.tensor([p.grad is not None for p in replicated], dtype=torch.int64,
                                device=replicated[0].device)
        dist.all_reduce(has_grad, group=group)
        if not bool(((has_grad == 0) | (has_grad == w)).all()):
            raise RuntimeError("sync_expert_parallel_grads: some replicated parameters have a gradient on some ranks "
                               "only; every rank must backpropagate through the same layers")
    by_kind: dict[tuple, list[Tensor]] = {}
    for p in replicated:
        if p.grad is not None:
            by_kind.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
    for grads in by_kind.values():  # one flat all-reduce per dtype and device
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=group)
        if average:
            flat /= w
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
    if average:
        for p in params:
            if id(p) in experts and p.grad is not None:
                p.grad /= w


def gather_expert_state(module: nn.Module, group=None, dst: int = 0,
                        state: dict[str, Tensor] | None = None) -> dict[str, Tensor] | None:
    """The full single-device state dict of `module` (expert stacks of every shard concatenated
    in expert order), returned on group rank `dst`; None on the other ranks. As with
    `state_dict()`, the replicated entries alias the live parameters. `state`: the module's
    state dict to complete instead of `module.state_dict()` (e.g. with FSDP-sharded entries
    already gathered). Collective: every rank of `group` must call it."""
    group = _resolve_group(group)
    rank, w = dist.get_rank(group), dist.get_world_size(group)
    state = module.state_dict() if state is None else dict(state)
    for key in _expert_keys(module):
        local = state[key].contiguous()
        parts = [torch.empty_like(local) for _ in range(w)] if rank == dst else None
        dist.gather(local, parts, dst=dist.get_global_rank(group, dst), group=group)
        if rank == dst:
            state[key] = torch.cat(parts)
    return state if rank == dst else None


def _check_full_state(local: dict[str, Tensor], full: dict[str, Tensor], expert_keys: set[str], w: int) -> str | None:
    if not isinstance(full, dict):
        return f"the state dict on the source rank must be a dict, got {type(full).__name__}"
    missing, unexpected = sorted(set(local) - set(full)), sorted(set(full) - set(local))
    if missing or unexpected:
        return f"state dict keys do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
    for key, t in local.items():
        want = (t.shape[0] * w, *t.shape[1:]) if key in expert_keys else tuple(t.shape)
        if tuple(full[key].shape) != tuple(want):
            return f"{key} has shape {tuple(full[key].shape)} in the state dict but the full model needs {want}"
    return None


@torch.no_grad()
def scatter_expert_state(module: nn.Module, state_dict: dict[str, Tensor] | None, group=None, src: int = 0) -> None:
    """Load a full single-device state dict, held by group rank `src` (the other ranks pass
    None), into the expert-parallel `module` on every rank: replicated entries are broadcast,
    each rank receives its slice of the expert stacks. Keys and shapes are checked on `src`
    and a mismatch raises ValueError on every rank. Collective: every rank must call it."""
    group = _resolve_group(group)
    rank, w = dist.get_rank(group), dist.get_world_size(group)
    src_global = dist.get_global_rank(group, src)
    local = module.state_dict()
    expert_keys = set(_expert_keys(module))
    verdict = [_check_full_state(local, state_dict, expert_keys, w) if rank == src else None]
    dist.broadcast_object_list(verdict, src=src_global, group=group)
    if verdict[0] is not None:
        raise ValueError(f"scatter_expert_state: {verdict[0]}")
    for key, t in local.items():  # same order on every rank
        buf = torch.empty_like(t, memory_format=torch.contiguous_format)
        if key in expert_keys:
            parts = None
            if rank == src:
                parts = [c.contiguous() for c in state_dict[key].to(dtype=t.dtype, device=t.device).chunk(w)]
            dist.scatter(buf, parts, src=src_global, group=group)
        else:
            if rank == src:
                buf.copy_(state_dict[key])
            dist.broadcast(buf, src=src_global, group=group)
        t.copy_(buf)


def _expert_params(module: nn.Module) -> dict[int, ExpertParallelMoE]:
    """id of each sharded expert stack -> its layer."""
    return {id(getattr(m, n)): m for _, m in _expert_layers(module) for n in EXPERT_PARAMS}


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[nn.Parameter]:
    """The parameters in the order of the integer keys of optimizer.state_dict()."""
    return [p for g in optimizer.param_groups for p in g["params"]]


def gather_expert_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer, group=None,
                                  dst: int = 0, state: dict | None = None) -> dict | None:
    """The optimizer state dict a single-device run would hold, on group rank `dst` (None on the
    others): per-parameter state tensors of an expert stack that have its shape (AdamW's
    exp_avg, exp_avg_sq) are gathered along dim 0 in expert order; scalars (step) and the
    replicated parameters' state are this rank's. The optimizer's own state is not modified.
    `state`: the optimizer state dict to complete instead of `optimizer.state_dict()`.
    Collective: every rank of `group` must call it."""
    group = _resolve_group(group)
    rank, w = dist.get_rank(group), dist.get_world_size(group)
    state = optimizer.state_dict() if state is None else state
    experts = _expert_params(module)
    entries = [(i, key) for i, p in enumerate(_optimizer_params(optimizer)) if id(p) in experts and i in state["state"]
               for key, v in sorted(state["state"][i].items()) if isinstance(v, Tensor) and v.shape == p.shape]
    everyone = [None] * w
    dist.all_gather_object(everyone, entries, group=group)
    if any(e != entries for e in everyone):
        raise RuntimeError("gather_expert_optimizer_state: the ranks hold optimizer state for different expert "
                           "parameters; every rank must step the same parameters")
    state["state"] = {i: dict(s) for i, s in state["state"].items()}  # never replace the live tensors
    for i, key in entries:
        local = state["state"][i][key].contiguous()
        parts = [torch.empty_like(local) for _ in range(w)] if rank == dst else None
        dist.gather(local, parts, dst=dist.get_global_rank(group, dst), group=group)
        if rank == dst:
            state["state"][i][key] = torch.cat(parts)
    return state if rank == dst else None


def shard_expert_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer, full_state: dict) -> dict:
    """This rank's optimizer state dict from a single-device one (as saved by
    `gather_expert_optimizer_state` or by a single-device run): state tensors of an expert stack
    shaped like the full stack are sliced to the local experts. No communication: every rank
    reads the same saved state. A tensor whose shape fits neither the full nor the local stack
    raises ValueError naming it."""
    experts = _expert_params(module)
    params = _optimizer_params(optimizer)
    out = {**full_state, "state": {}}
    for i, st in full_state["state"].items():
        i = int(i)
        if i >= len(params):
            raise ValueError(f"optimizer state has an entry for parameter {i}, but the optimizer has {len(params)}")
        p, layer = params[i], experts.get(id(params[i]))
        if layer is None:
            out["state"][i] = st
            continue
        full = (p.shape[0] * layer.ep_size, *p.shape[1:])
        lo = layer.ep_rank * layer.n_local
        sliced = {}
        for key, v in st.items():
            if isinstance(v, Tensor) and v.dim() > 0:
                if tuple(v.shape) != full:
                    raise ValueError(f"optimizer state {key!r} of parameter {i} has shape {tuple(v.shape)}; the full "
                                     f"expert stack it belongs to has shape {full}")
                v = v[lo:lo + layer.n_local].clone()
            sliced[key] = v
        out["state"][i] = sliced
    return out
