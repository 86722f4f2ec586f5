"""Data parallelism for the trainer over torch.distributed, applied from outside the model.

`torchrun --nproc-per-node N -m generalist train ...` runs the same training on N processes; a
world of one (no torchrun) has no process group at all and the trainer runs its single-process
code unchanged.

- `Distributed.from_env` reads torchrun's WORLD_SIZE / RANK / LOCAL_RANK and initialises the
  process group (gloo on CPU, nccl on CUDA) with a timeout, unless one is already initialised.
- Every rank draws the same global batch of B picks from its own copy of the MixtureSampler
  (same seed, same state) and keeps its contiguous slice of B/N (B % N == 0): the task mixture
  and the examples seen are those of one process with batch B, and the sampler state every rank
  holds is the single-process one, so checkpoints move freely between world sizes.
- `DataParallel` wraps one micro-batch's forward (generative pass, both contrastive embeddings,
  contrastive loss) in DDP(find_unused_parameters=True): the set of parameters a rank uses
  changes from step to step (the contrastive head only on steps with contrastive pairs, an
  embedder only when its modality is in the slice), so the graph is not static. Parameters a
  rank did not use enter the all-reduce as zeros; one that no rank used keeps grad None, as in
  one process.
- Losses are weighted so that DDP's gradient average is the gradient of the global batch's
  loss: the LM loss (a mean over the batch's generative examples) enters as the rank's sum over
  its examples / G_global, times N to undo DDP's division by N; the contrastive loss (in-batch
  negatives) is computed on every rank over the all-gathered embeddings of the whole batch, with
  gradient through the rank's own rows (times N) and through the shared logit scale (once).
  The MoE aux losses (load balance, z-loss) are global too: `parallelize_moe` makes every MoE
  layer all-reduce its router statistics, so each rank holds the single-process aux loss and
  back-propagates it once (DDP's average of the router gradients is then the full gradient).
  Since every layer call is a collective, every rank calls the model as often as the others:
  on an empty slice (the model accepts an empty batch) and, for the contrastive pass, with no
  pairs of its own.
- Expert parallelism (`expert_parallel=True`): each rank keeps n_routed / N of every layer's
  routed experts and exchanges tokens with the others (generalist/parallel/expert.py). DDP
  ignores those weights; their gradients already sum every rank's loss (N x its share), so
  `clip_grad_norm` divides them by N, then clips with the global norm. Checkpoints gather the
  expert stacks and their AdamW moments on rank 0 (the single-process format); on resume every
  rank reads the full checkpoint and keeps its slice.
- FSDP2 (`fsdp=True`) instead of DDP: `fully_shard` on every encoder and decoder block and on
  `_MicroBatch` as the root unit (embedders, norms, heads, logit scale: the wrapper's forward
  spans every use of them). FSDP reduce-scatters the gradients its parameters have, so every
  rank must give gradients to the same ones: the root parameters enter the loss times zero, and
  those no rank really used (found by walking the autograd graph) lose that zero gradient after
  the step's last backward, so AdamW skips them as in one process. Checkpoints gather every
  DTensor in full on rank 0; on resume each rank keeps its shard of the saved optimizer state.
  With expert parallelism too, FSDP ignores the expert weights (already sharded by expert).
- The numbers logged are global: loss, per-task losses, token and routing counts go through one
  float64 all-reduce per micro-batch, so every rank holds (and rank 0 writes) the global values.
- A SIGTERM or SIGINT that reaches any rank stops every rank after the same step (the trainer
  folds it into the all-reduce of each step's time), so that they all join the checkpoint.
- A collective that fails or times out (a rank died or hung) raises `DistributedError`, one line
  that names the likely cause, instead of a hang or a gloo/nccl traceback.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel

from generalist.parallel.expert import (apply_expert_parallel, apply_global_router_losses, expert_parameter_names,
                                        gather_expert_optimizer_state, gather_expert_state,
                                        shard_expert_optimizer_state)

DEFAULT_TIMEOUT_S = 600.0
_PEER_FAILURE = ("connection closed", "connection reset", "broken pipe", "timed out", "timeout", "gloo", "nccl",
                 "socket", "peer")


class DistributedError(RuntimeError):
    """A collective failed or timed out: another rank most likely died or hung."""


def _first_line(error: BaseException) -> str:
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return re.sub(r"^\[[^\]]*\]\s*", "", first).split(". ")[0][:200]  # gloo: "[pair.cc:553] Connection ..."


def check_batch(batch_size: int, world: int, contrastive_batch: int = 0) -> None:
    for name, n in (("batch_size", batch_size), ("contrastive_batch", contrastive_batch)):
        if n % world:
            raise ValueError(f"{name} ({n}) must be a multiple of the number of processes ({world}): "
                             f"each process takes {name} / {world} examples of every global batch")


def check_expert_parallel(n_routed: int, world: int) -> None:
    """expert_parallel=true needs every MoE layer's routed experts split evenly over the ranks."""
    if n_routed % world:
        raise ValueError(f"expert_parallel: model.n_routed ({n_routed}) must be a multiple of the number of processes "
                         f"({world}): each process holds n_routed / {world} of every MoE layer's routed experts")


@dataclass
class Distributed:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    timeout_s: float
    owns_group: bool  # this object initialised the process group, so close() destroys it

    @classmethod
    def from_env(cls, timeout_s: float = DEFAULT_TIMEOUT_S, device: str | torch.device | None = None
                 ) -> "Distributed | None":
        """None outside torchrun (WORLD_SIZE unset or 1); else this rank, its process group ready."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return None
        if "RANK" not in os.environ:
            raise ValueError(f"WORLD_SIZE is {world} but RANK is not set; launch with torchrun")
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
        if device is None:
            device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local_rank)
        owns = not dist.is_initialized()
        if owns:
            if device.type == "cuda":
                torch.cuda.set_device(device)
            try:
                dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                        timeout=timedelta(seconds=timeout_s))
            except RuntimeError as error:  # DistStoreError, DistNetworkError: a rank never came
                where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
                raise DistributedError(f"rank {rank} of {world}: could not form the process group at {where} within "
                                       f"{timeout_s:g} s (option dist_timeout_s): {_first_line(error)}") from error
        if dist.get_world_size() != world or dist.get_rank() != rank:
            raise ValueError(f"the process group (rank {dist.get_rank()} of {dist.get_world_size()}) disagrees with "
                             f"RANK={rank} WORLD_SIZE={world}")
        return cls(rank, world, local_rank, device, timeout_s, owns)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False

    def lost(self, error: BaseException) -> DistributedError:
        return DistributedError(
            f"rank {self.rank} of {self.world}: a collective failed or timed out (limit {self.timeout_s:g} s, "
            f"option dist_timeout_s); another rank most likely died or hung, see its log. Cause: {_first_line(error)}")

    @contextlib.contextmanager
    def guard(self):
        """Turns a failed collective inside the block into a one-line DistributedError."""
        try:
            yield
        except DistributedError:
            raise
        except RuntimeError as error:  # DistBackendError and friends subclass RuntimeError
            if isinstance(error, dist.DistError) or any(w in str(error).lower() for w in _PEER_FAILURE):
                raise self.lost(error) from error
            raise

    # ---- collectives (each one guarded) --------------------------------------------------------
    def all_reduce(self, x: Tensor, op=dist.ReduceOp.SUM) -> Tensor:
        with self.guard():
            dist.all_reduce(x, op=op)
        return x

    def max(self, *values: float) -> tuple[float, ...]:
        """The largest of each value over ranks (identical on every rank), in one all-reduce."""
        return tuple(self.all_reduce(torch.tensor(values, dtype=torch.float64, device=self.device),
                                     dist.ReduceOp.MAX).tolist())

    def broadcast_object(self, obj):
        box = [obj]
        with self.guard():
            dist.broadcast_object_list(box, src=0, device=self.device)
        return box[0]

    def gather_objects(self, obj) -> list:
        out = [None] * self.world
        with self.guard():
            dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        with self.guard():
            if self.device.type == "cuda":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()


def parallelize_moe(model: nn.Module, group: Distributed, expert_parallel: bool):
    """Converts the model's MoE layers for `group` (before the optimizer is built) and returns the
    process group their collectives use: one of their own, apart from DDP's, whose bucket
    all-reduces start as gradients become ready during backward, at points that differ from
    rank to rank (each rank's batch uses different embedders), and would otherwise interleave
    differently with the layers' exchanges. expert_parallel: each rank keeps n_routed / N of
    every layer's routed experts; else the experts stay replicated and only the router losses
    become global."""
    with group.guard():
        moe_group = dist.new_group(timeout=timedelta(seconds=group.timeout_s))
    (apply_expert_parallel if expert_parallel else apply_global_router_losses)(model, moe_group)
    return moe_group


class _MicroBatch(nn.Module):
    """What DDP wraps (or FSDP's root unit): every use of a parameter in one micro-batch happens
    inside this forward (DDP finds unused parameters from its outputs, and a parameter used
    outside it would be reduced twice; FSDP gathers the root's weights for this forward only)."""

    def __init__(self, model: nn.Module, group: Distributed, contrastive_weight: float,
                 root_params: list[str] | None = None):
        """root_params (FSDP only): names of the model parameters that the root unit shards."""
        super().__init__()
        self.model, self.group, self.weight = model, group, contrastive_weight
        self.root_params = root_params

    def forward(self, gen: list, con_inputs: list, con_texts: list, n_gen: int, con_counts: list[int],
                lm_scale: float = 1.0, con_scale: float = 1.0):
        """gen: this rank's encoded generative examples; con_*: its contrastive pairs (encoded);
        n_gen: generative examples in the global micro-batch; con_counts: contrastive pairs on
        each rank; lm_scale, con_scale: the weights of the text and contrastive losses. Returns
        (the loss this rank back-propagates, detached statistics)."""
        model, world = self.model, self.group.world
        zero = torch.zeros((), device=model.boundary.device)
        lm = aux = closs = zero
        stats = {"ce": None, "tokens": 0, "routing": None}
        # Every rank calls the model as often as the others, an empty slice included: each MoE
        # layer call exchanges router statistics (and, expert-parallel, tokens) with every rank.
        if n_gen:
            out = model(gen)
            lm = out.lm_loss * (lm_scale * len(gen) / n_gen)  # this rank's share of the global mean over examples
            aux = out.aux_loss / world  # global: the same on every rank
            if gen:
                with torch.no_grad():
                    ce = F.cross_entropy(out.logits.float(), out.labels, reduction="none")
                    stats["ce"] = torch.stack([p.mean() for p in ce.split([len(ex.target_ids) + 1 for ex in gen])])
            stats["tokens"] = int(out.labels.numel()) + out.n_input_tokens
            stats["routing"] = (torch.stack([s.counts_by_task for s in out.moe_stats]),
                                torch.stack([s.counts_by_modality for s in out.moe_stats]))
        if sum(con_counts) >= 2:
            mine = torch.stack([model.embed(con_inputs), model.embed(con_texts)])
            a_CE, b_CE = self._gather_pairs(mine, con_counts, model.cfg.embed_dim, zero.device)
            closs = model.contrastive_loss(a_CE, b_CE)
            # Every rank computes the same loss, so the gradient of the one parameter it shares
            # across rows (the logit scale) would count N times: the second term, with the
            # embeddings detached, takes N - 1 of them back (its value cancels out).
            closs_for_grad = con_scale * (world * closs - (world - 1) * model.contrastive_loss(a_CE.detach(),
                                                                                               b_CE.detach()))
        else:
            closs_for_grad = closs
        loss = world * (lm + aux) + self.weight * closs_for_grad
        if self.root_params is not None:
            loss, stats["used"] = self._touch_root(loss)
        if not loss.requires_grad:  # nothing to do on any rank: still take part in the all-reduce
            # (the logit scale then counts as used here, with a zero gradient)
            loss = loss + 0.0 * model.logit_scale.sum()
        stats["report"] = (lm + aux + (self.weight * con_scale * closs if self.group.main else 0.0)).detach()
        stats["aux"] = aux.detach()  # this rank's 1/N of the global MoE aux loss: the all-reduce sums it
        stats["contrastive"] = closs.detach()
        return loss, stats

    def _touch_root(self, loss: Tensor) -> tuple[Tensor, Tensor]:
        """FSDP reduce-scatters the gradients of the root unit's parameters that have one, so
        every rank must give a gradient to the same ones: each enters the loss times zero. Returns
        that loss and whether each one was really used here (int, root_params order), so that
        those no rank used can drop their zero gradient, as in one process."""
        params = dict(self.model.named_parameters())  # unsharded inside the root's forward
        root = [params[n] for n in self.root_params]
        reached = _leaves(loss)
        used = torch.tensor([id(p) in reached for p in root], dtype=torch.int32)
        return loss + sum(0.0 * p.sum() for p in root if p.requires_grad), used

    def _gather_pairs(self, mine_2CE: Tensor, counts: list[int], dim: int, device) -> tuple[Tensor, Tensor]:
        """The whole micro-batch's (a, b) embeddings in global order; only this rank's rows carry
        gradient (each rank back-propagates the same loss through its own rows; DDP's average
        of those, times N, is the full gradient). This rank's rows enter even when there are
        none, so that the backward pass runs through its (empty) encoder passes too."""
        width = max(counts)
        pad = torch.zeros(2, width, dim, dtype=torch.float32, device=device)
        pad[:, :mine_2CE.shape[1]] = mine_2CE.detach().float()
        bufs = [torch.empty_like(pad) for _ in range(self.group.world)]
        with self.group.guard():
            dist.all_gather(bufs, pad)
        parts = [mine_2CE.float() if r == self.group.rank else bufs[r][:, :n]
                 for r, n in enumerate(counts) if n or r == self.group.rank]
        both = torch.cat(parts, dim=1)
        return both[0], both[1]


def _full(v):
    return v.full_tensor() if isinstance(v, DTensor) else v


def _shard_like_params(optimizer: torch.optim.Optimizer, saved: dict) -> dict:
    """A single-process optimizer state dict -> one whose per-parameter tensors are sharded like
    the (FSDP, DTensor) parameters they belong to; every rank holds the full saved state, so
    each keeps its own shard with no communication."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    out = {**saved, "state": {}}
    for i, st in saved["state"].items():
        i = int(i)
        if i >= len(params):
            raise ValueError(f"optimizer state has an entry for parameter {i}, but the optimizer has {len(params)}")
        p, mine = params[i], {}
        for key, v in st.items():
            if isinstance(p, DTensor) and isinstance(v, Tensor) and v.dim() > 0:
                if tuple(v.shape) != tuple(p.shape):
                    raise ValueError(f"optimizer state {key!r} of parameter {i} has shape {tuple(v.shape)}, the "
                                     f"parameter {tuple(p.shape)}")
                v = distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
            mine[key] = v
        out["state"][i] = mine
    return out


def _leaves(t: Tensor) -> set[int]:
    """ids of the leaf tensors (parameters) that t's autograd graph accumulates gradients into."""
    out, seen, stack = set(), set(), [t.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        leaf = getattr(fn, "variable", None)  # AccumulateGrad
        if leaf is not None:
            out.add(id(leaf))
        stack.extend(f for f, _ in fn.next_functions)
    return out


class DataParallel:
    """The trainer's data-parallel micro-batch: this rank's slice of the global picks, the
    DDP-wrapped forward and backward, and the global statistics."""

    def __init__(self, trainer, group: Distributed):
        """Converts trainer.model in place for `group` (before the optimizer is built): MoE layers
        (`parallelize_moe`), then DDP, or FSDP2 (`fully_shard` on every encoder and decoder block
        and on the rest as the root unit) with trainer.cfg.fsdp."""
        self.trainer, self.group = trainer, group
        cfg, model = trainer.cfg, trainer.model
        check_batch(cfg.batch_size, group.world, cfg.contrastive_batch)
        self.moe_group = parallelize_moe(model, group, cfg.expert_parallel)
        self.expert_names = expert_parameter_names(model)  # empty unless expert-parallel
        self.fsdp = cfg.fsdp
        if self.fsdp:
            from torch.distributed.fsdp import fully_shard

            root = [n for n, _ in model.named_parameters() if not n.startswith(("encoder.", "decoder."))]
            micro = _MicroBatch(model, group, cfg.contrastive_weight, root)
            experts = {model.get_parameter(n) for n in self.expert_names}  # already sharded, by expert
            with group.guard():
                for block in [*model.encoder, *model.decoder]:
                    fully_shard(block, ignored_params=experts)
                self.wrapped = fully_shard(micro, ignored_params=experts)
            params = dict(model.named_parameters())  # now sharded (DTensor)
            self.root_params = [params[n] for n in root]
            self._used = None  # whether each root parameter had a gradient on any micro-batch of the step
        else:
            micro = _MicroBatch(model, group, cfg.contrastive_weight)
            if self.expert_names:  # each rank's own experts: never averaged with another rank's
                DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                    micro, [f"model.{n}" for n in self.expert_names])
            with group.guard():  # DDP checks the shapes and broadcasts rank 0's weights
                self.wrapped = DistributedDataParallel(micro, find_unused_parameters=True)
        params = dict(model.named_parameters())
        self.expert_params = [params[n] for n in sorted(self.expert_names)]
        self.replicated_params = [p for n, p in params.items() if n not in self.expert_names]
        self.names = trainer.tasks + ["contrastive"]

    def clip_grad_norm(self, max_norm: float) -> float:
        """After the last micro-batch's backward: finishes the expert gradients and clips every
        gradient to the global norm, identical on every rank (so they all agree to skip a step
        with a non-finite one).

        Each rank's loss is N x its share of the global loss (see _MicroBatch), so the routed
        experts, which receive the gradients of every rank's loss through the token exchange and
        are not averaged by DDP, hold N x their gradient until divided here."""
        from torch.nn.utils import clip_grads_with_norm_, get_total_norm

        if not self.expert_params:
            total = torch.nn.utils.clip_grad_norm_(self.trainer.model.parameters(), max_norm)
            if isinstance(total, DTensor):  # FSDP
                with self.group.guard():
                    total = total.full_tensor()
            return float(total)
        experts = [p.grad for p in self.expert_params if p.grad is not None]
        for g in experts:
            g.div_(self.group.world)
        replicated = [p.grad for p in self.replicated_params if p.grad is not None]
        device = self.group.device
        with self.group.guard():
            squares = torch.stack([_full(get_total_norm(gs)).to(device, torch.float64) ** 2 if gs else
                                   torch.zeros((), dtype=torch.float64, device=device)
                                   for gs in (replicated, experts)])  # FSDP: the replicated norm is global
            dist.all_reduce(squares[1:], group=self.moe_group)  # each rank holds different experts
        total = squares.sum().sqrt().to(torch.float32)
        for params in (self.replicated_params, self.expert_params):  # DTensors (FSDP) and plain tensors apart
            clip_grads_with_norm_(params, max_norm, total)
        return float(total)

    def full_state(self) -> tuple[dict | None, dict]:
        """(model state dict, optimizer state dict) as one process would hold them, on rank 0
        (expert stacks gathered from every rank); elsewhere (None, {}). Every rank calls it."""
        tr = self.trainer
        if not self.fsdp and not self.expert_names:
            return None, tr.opt.state_dict()
        with self.group.guard():
            model, opt = tr.model.state_dict(), tr.opt.state_dict()
            if self.fsdp:  # every sharded tensor in full on every rank, in the same order everywhere
                model = {k: _full(v) for k, v in model.items()}
                opt["state"] = {i: {k: _full(v) for k, v in sorted(st.items())} for i, st in sorted(opt["state"].items())}
            if self.expert_names:  # each rank's experts, concatenated on rank 0
                model = gather_expert_state(tr.model, self.moe_group, state=model)
                opt = gather_expert_optimizer_state(tr.model, tr.opt, self.moe_group, state=opt)
        return (model, opt) if self.group.main else (None, {})

    def shard_optimizer_state(self, saved: dict) -> dict:
        """A saved (single-process) optimizer state dict -> this rank's."""
        if self.expert_names:
            saved = shard_expert_optimizer_state(self.trainer.model, self.trainer.opt, saved)
        return _shard_like_params(self.trainer.opt, saved) if self.fsdp else saved

    def local(self, picks: list, rank: int | None = None) -> list:
        n = len(picks) // self.group.world
        r = self.group.rank if rank is None else rank
        return picks[r * n:(r + 1) * n]

    def micro_batch(self, picks: list, scale: float, sync: bool, extra: list = (), lm_scale: float = 1.0,
                    con_scale: float = 1.0) -> tuple[float, dict[str, list[float]], int, float]:
        """Forward and (if the global loss is finite) backward of (loss * scale) for this rank's
        slice of `picks` (and of `extra`, contrastive examples for the contrastive loss alone);
        gradients are all-reduced when `sync` (under FSDP reduce-scattered on every micro-batch).
        `lm_scale`, `con_scale` weigh the text and contrastive losses (Trainer.step_scales).
        Returns the global loss, the per-task losses, the global token count and the MoE aux loss
        (load balance and z-loss, weighted; over the global micro-batch)."""
        tr, g = self.trainer, self.group
        task = {name: tr.data[name].task for name in tr.data}
        n_gen = sum(task[t].generative for t, _ in picks)
        con_counts = [sum(task[t].contrastive for t, _ in self.local(picks, r)) + len(self.local(list(extra), r))
                      for r in range(g.world)]
        mine = self.local(picks)
        gen = [tr._encode(t, i) for t, i in mine if task[t].generative]
        con = [(t, i) for t, i in mine if task[t].contrastive] + self.local(list(extra))
        con_inputs, con_texts = tr._contrastive_pairs(con) if con and sum(con_counts) >= 2 else ([], [])
        gen_tasks = [t for t, _ in mine if task[t].generative]
        if self.fsdp:
            # every micro-batch reduce-scatters into the sharded gradients: left unsynced, FSDP keeps
            # them on its unsharded parameters, where a skipped step's zero_grad cannot reach them
            self.wrapped.set_requires_gradient_sync(True)
        with g.guard(), (contextlib.nullcontext() if sync or self.fsdp else self.wrapped.no_sync()):
            with torch.autocast(tr.device.type, dtype=torch.bfloat16,
                                enabled=tr.cfg.bf16 and tr.device.type == "cuda"):
                loss, st = self.wrapped(gen, con_inputs, con_texts, n_gen, con_counts, lm_scale, con_scale)
            vec = self._reduce(st, gen_tasks, sum(con_counts) >= 2)
            total = float(vec[0])
            if torch.isfinite(vec[0]):
                (loss * scale).backward()
                if self.fsdp:
                    self._drop_unused(st["used"], sync)
        return total, *self._unpack(vec)

    def discard(self) -> None:
        """Forgets what the micro-batches of a skipped step recorded (which root parameters they used)."""
        self._used = None

    def _drop_unused(self, used: Tensor, last: bool) -> None:
        """FSDP: after the step's last backward, the root parameters that no rank used on any of
        its micro-batches lose the zero gradient that _touch_root gave them (AdamW then leaves
        them alone, as in one process)."""
        self._used = used if self._used is None else self._used | used
        if last:
            flags = self.group.all_reduce(self._used.to(self.group.device), dist.ReduceOp.MAX)
            for p, flag in zip(self.root_params, flags.tolist()):
                if not flag:
                    p.grad = None
            self._used = None

    def _reduce(self, st: dict, gen_tasks: list[str], has_con: bool) -> Tensor:
        """[loss, tokens, per-task loss sums, per-task counts, routing by task, by modality, MoE aux loss]."""
        k, routing = len(self.names), self.trainer.routing
        vec = torch.zeros(2 + 2 * k + routing["task"].size + routing["modality"].size + 1, dtype=torch.float64)
        vec[-1] = float(st["aux"])
        vec[0], vec[1] = float(st["report"]), st["tokens"]
        for t, ce in zip(gen_tasks, st["ce"].tolist() if st["ce"] is not None else []):
            vec[2 + self.names.index(t)] += ce
            vec[2 + k + self.names.index(t)] += 1
        if has_con and self.group.main:
            vec[2 + k - 1], vec[2 + 2 * k - 1] = float(st["contrastive"]), 1
        if st["routing"] is not None:
            n = routing["task"].size
            vec[2 + 2 * k:2 + 2 * k + n] = st["routing"][0].flatten().double().cpu()
            vec[2 + 2 * k + n:-1] = st["routing"][1].flatten().double().cpu()
        return self.group.all_reduce(vec.to(self.group.device)).cpu()

    def _unpack(self, vec: Tensor) -> tuple[dict[str, list[float]], int, float]:
        k, routing = len(self.names), self.trainer.routing
        n = routing["task"].size
        routing["task"] += vec[2 + 2 * k:2 + 2 * k + n].round().long().numpy().reshape(routing["task"].shape)
        routing["modality"] += vec[2 + 2 * k + n:-1].round().long().numpy().reshape(routing["modality"].shape)
        per_task = {}
        for j, name in enumerate(self.names):
            count = int(round(float(vec[2 + k + j])))
            if count:  # one entry per example, so means over micro-batches weigh examples equally
                per_task[name] = [float(vec[2 + j]) / count] * count
        return per_task, int(round(float(vec[1]))), float(vec[-1])
