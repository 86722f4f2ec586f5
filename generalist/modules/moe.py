"""The MoE feed-forward layer: `n_shared` always-on SwiGLU experts plus `n_routed` SwiGLU experts
chosen per token by a top-k router that sees the token and learned embeddings of its task and
modality (Pathways-style conditioned routing over one shared pool of experts).

Layout: routed expert e computes (silu(x W1_e) * (x W3_e)) W2_e, with the weights stacked as
w1_EDF, w3_EDF, w2_EFD for `grouped_mm`. The n_shared shared experts are stored as one wide
SwiGLU of hidden width n_shared * d_ff (exactly the sum of n_shared separate experts).
Routing is dropless by default: permute -> grouped_mm -> unpermute. The router (logits, softmax,
top-k weights, losses) and the weighted sum of expert outputs run in fp32 (fp64 for fp64 x), under
autocast too. The experts' matmuls run in autocast's dtype when it is on (bf16 in training on a
GPU), as the shared experts' do: grouped_mm is a custom op, which autocast does not cast by
itself, so the layer casts the permuted rows and the weights.
With n_routed == 0 the layer is a dense SwiGLU FFN of the shared experts, with zero aux loss.

Shapes: T tokens, D model dim, F expert hidden dim, H shared hidden dim (n_shared * F),
E routed experts, K experts per token, S kept token-expert assignments, N tasks, M modalities.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from generalist.ops import _attention_checks as checks
from generalist.ops.moe import grouped_mm, permute, unpermute

INIT_STD = 0.02
ROUTER_INIT_STD = 0.002  # near-uniform routing at the start, so load starts out balanced

# Bumped after every optimizer step: fused optimizers (AdamW(fused=True), which the trainer picks)
# write the parameters without bumping their version counters, so the kept casts also key on this.
_optimizer_steps = 0


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


register_optimizer_step_post_hook(_count_optimizer_step)


@dataclass
class MoEConfig:
    d_model: int
    d_ff: int  # hidden width of one expert
    n_shared: int = 1
    n_routed: int = 4
    top_k: int = 2
    n_tasks: int = 1
    n_modalities: int = 5
    condition_router: bool = True  # router input is x + task_emb + modality_emb
    # Training only: each expert keeps at most ceil(capacity_factor * T * top_k / n_routed)
    # assignments, first choices before second ones, earlier tokens first within a choice (ops.moe.permute);
    # None is dropless. Eval is always dropless.
    capacity_factor: float | None = None
    router_jitter: float = 0.0  # training only: router input scaled by U(1 - eps, 1 + eps)
    aux_loss_weight: float = 0.01  # Switch load-balancing loss
    z_loss_weight: float = 0.001  # ST-MoE router z-loss

    def __post_init__(self):
        for name in ("d_model", "d_ff", "n_tasks", "n_modalities"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"MoEConfig.{name} must be a positive int, got {getattr(self, name)!r}")
        for name in ("n_shared", "n_routed"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"MoEConfig.{name} must be a non-negative int, got {getattr(self, name)!r}")
        if self.n_shared + self.n_routed < 1:
            raise ValueError("MoEConfig needs at least one expert: n_shared + n_routed must be >= 1")
        if self.n_routed > 0 and not 1 <= self.top_k <= self.n_routed:
            raise ValueError(f"MoEConfig.top_k must be in [1, n_routed={self.n_routed}], got {self.top_k}")
        cf = self.capacity_factor
        if cf is not None and not (isinstance(cf, (int, float)) and math.isfinite(cf) and cf > 0):
            raise ValueError(f"MoEConfig.capacity_factor must be None or a positive number, got {cf!r}")
        if not 0.0 <= self.router_jitter < 1.0:
            raise ValueError(f"MoEConfig.router_jitter must be in [0, 1), got {self.router_jitter}")
        for name in ("aux_loss_weight", "z_loss_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"MoEConfig.{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class MoEStats:
    aux_loss: Tensor  # scalar in router dtype: aux_loss_weight * balance_loss + z_loss_weight * z_loss
    balance_loss: Tensor  # scalar, unweighted, detached (1.0 when perfectly balanced)
    z_loss: Tensor  # scalar, unweighted, detached
    counts_by_task: Tensor  # int64 (N, E): kept assignments per task and expert
    counts_by_modality: Tensor  # int64 (M, E)
    dropped: Tensor  # int64 scalar: assignments dropped by the capacity limit


def _swiglu(x_TD: Tensor, w1_DH: Tensor, w3_DH: Tensor, w2_HD: Tensor) -> Tensor:
    return (F.silu(x_TD @ w1_DH) * (x_TD @ w3_DH)) @ w2_HD


def _autocast_on(x: Tensor) -> bool:
    device = x.device.type
    # autocast knows no "meta" device, for one, so other devices ask first; CPU and CUDA skip the
    # question, which torch.compile cannot trace in torch 2.11 (a graph break in every MoE layer)
    return (device in ("cpu", "cuda") or torch.amp.is_autocast_available(device)) and torch.is_autocast_enabled(device)


def _matmul_dtype(x: Tensor) -> torch.dtype:
    """The dtype x's matmuls run in: autocast's for x's device when it is on and x is a type it
    casts (fp32, fp16, bf16; not fp64), else x's own."""
    if x.dtype in (torch.float32, torch.float16, torch.bfloat16) and _autocast_on(x):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _without_autocast(x: Tensor):
    """A context that turns autocast off on x's device if it is on (the router stays in fp32)."""
    return torch.autocast(x.device.type, enabled=False) if _autocast_on(x) else contextlib.nullcontext()


class MoE(nn.Module):
    """forward(x (T, D), task_ids int (T,), modality_ids int (T,)) -> (y (T, D), MoEStats), or
    (y, None) with stats=False.

    The router takes softmax over the n_routed experts, keeps the top_k and renormalises those
    k weights to sum to 1; y = shared(x) + sum over the kept top-k e of weight_e * expert_e(x).
    (So with top_k == 1 the weight is always 1 and the router learns from the aux losses only.)
    In training with a capacity factor, an assignment over its expert's capacity contributes
    zero and the other weights are not renormalised again; eval mode is always dropless, so
    incremental decoding routes like a full forward (up to rounding: where two experts' router
    logits tie to the last bits, a batch and a token alone may pick apart). Counts cover kept assignments;
    the balance loss uses the router's choices before drops.
    `init_scale` multiplies the std of the output projections (w2), e.g. 1/sqrt(2 * n_layers).
    """

    def __init__(self, config: MoEConfig, *, init_scale: float = 1.0, backend: str = "auto"):
        super().__init__()
        self.config, self.backend = config, backend
        self._kept_casts = None  # inference's cast expert weights (_cast_experts)
        c, d, f = config, config.d_model, config.d_ff
        self.shared_w1_DH = self.shared_w3_DH = self.shared_w2_HD = None
        if c.n_shared:
            h = c.n_shared * f
            self.shared_w1_DH = nn.Parameter(torch.empty(d, h))
            self.shared_w3_DH = nn.Parameter(torch.empty(d, h))
            self.shared_w2_HD = nn.Parameter(torch.empty(h, d))
        self.router = self.task_emb = self.modality_emb = None
        self.w1_EDF = self.w3_EDF = self.w2_EFD = None
        if c.n_routed:
            self.router = nn.Linear(d, c.n_routed, bias=False)
            if c.condition_router:
                self.task_emb = nn.Embedding(c.n_tasks, d)
                self.modality_emb = nn.Embedding(c.n_modalities, d)
            self.w1_EDF = nn.Parameter(torch.empty(c.n_routed, d, f))
            self.w3_EDF = nn.Parameter(torch.empty(c.n_routed, d, f))
            self.w2_EFD = nn.Parameter(torch.empty(c.n_routed, f, d))
        self.reset_parameters(init_scale)

    @torch.no_grad()
    def reset_parameters(self, init_scale: float = 1.0) -> None:
        for name, p in self.named_parameters():
            std = INIT_STD * init_scale if name.startswith(("w2", "shared_w2")) else INIT_STD
            nn.init.normal_(p, std=ROUTER_INIT_STD if name.startswith("router") else std)

    def _check_inputs(self, x_TD: Tensor, task_ids_T: Tensor, modality_ids_T: Tensor) -> None:
        c = self.config
        if not isinstance(x_TD, Tensor) or x_TD.dim() != 2 or x_TD.shape[1] != c.d_model:
            shape = tuple(x_TD.shape) if isinstance(x_TD, Tensor) else type(x_TD).__name__
            raise ValueError(f"x_TD must have shape (T, d_model={c.d_model}), got {shape}")
        for name, ids, n in (("task_ids_T", task_ids_T, c.n_tasks), ("modality_ids_T", modality_ids_T, c.n_modalities)):
            if not isinstance(ids, Tensor) or ids.dim() != 1 or ids.shape[0] != x_TD.shape[0]:
                shape = tuple(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__
                raise ValueError(f"{name} must have shape (T={x_TD.shape[0]},), got {shape}")
            if ids.dtype not in (torch.int32, torch.int64):
                raise ValueError(f"{name} must be int32 or int64, got {ids.dtype}")
            # the values: a device sync on a GPU, so once per tensor (the layers of a model share
            # one), and not at all under torch.compile or set_value_checks(False)
            if checks.value_checks_on(ids) and ids.numel() and not checks.checked_before(ids, ("ids", n)):
                lo, hi = torch.stack(torch.aminmax(ids)).tolist()  # one transfer
                if lo < 0 or hi >= n:
                    raise ValueError(f"{name} must lie in [0, {n}), got values in [{lo}, {hi}]")
                checks.remember_checked(ids, ("ids", n))

    def _router_input(self, x_TD: Tensor, task_ids_T: Tensor, modality_ids_T: Tensor) -> Tensor:
        h_TD = x_TD.to(torch.promote_types(x_TD.dtype, torch.float32))
        if self.task_emb is not None:
            # F.embedding rather than weight[ids]: the tables have a handful of rows for T tokens,
            # and the indexing backward (index_put_ accumulating, on a GPU) serializes each row's
            # thousands of duplicate updates (4.6 ms of a demo training step's GPU time on an
            # H100), where embedding's backward sums them by segments
            h_TD = h_TD + F.embedding(task_ids_T, self.task_emb.weight.to(h_TD.dtype)) \
                + F.embedding(modality_ids_T, self.modality_emb.weight.to(h_TD.dtype))
        return h_TD

    def router_logits(self, x_TD: Tensor, task_ids_T: Tensor, modality_ids_T: Tensor) -> Tensor:
        """logits (T, E) in fp32 (fp64 for fp64 x), without jitter, autocast or not."""
        with _without_autocast(x_TD):
            h_TD = self._router_input(x_TD, task_ids_T, modality_ids_T)
            return F.linear(h_TD, self.router.weight.to(h_TD.dtype))

    def forward(self, x_TD: Tensor, task_ids_T: Tensor, modality_ids_T: Tensor, *,
                stats: bool = True) -> tuple[Tensor, MoEStats | None]:
        """(y, MoEStats); with `stats=False` (decoding, which discards them) (y, None): no counts,
        no router losses, and so none of their small kernels nor router_stats' collectives."""
        self._check_inputs(x_TD, task_ids_T, modality_ids_T)
        c, (t, d), dt = self.config, x_TD.shape, x_TD.dtype
        if self.shared_w1_DH is not None:
            y_TD = _swiglu(x_TD, self.shared_w1_DH.to(dt), self.shared_w3_DH.to(dt), self.shared_w2_HD.to(dt))
        else:
            y_TD = x_TD.new_zeros((t, d))
        if not c.n_routed:
            if not stats:
                return y_TD, None
            # the router's dtype, as when there are routed experts: fp32, or fp64 for fp64 x
            zero = x_TD.new_zeros((), dtype=torch.promote_types(x_TD.dtype, torch.float32))
            ints = dict(dtype=torch.int64, device=x_TD.device)
            return y_TD, MoEStats(zero, zero, zero, torch.zeros((c.n_tasks, 0), **ints),
                                  torch.zeros((c.n_modalities, 0), **ints), torch.zeros((), **ints))

        e, k = c.n_routed, c.top_k
        with _without_autocast(x_TD):
            h_TD = self._router_input(x_TD, task_ids_T, modality_ids_T)
            if self.training and c.router_jitter > 0:
                h_TD = h_TD * torch.empty_like(h_TD).uniform_(1.0 - c.router_jitter, 1.0 + c.router_jitter)
            logits_TE = F.linear(h_TD, self.router.weight.to(h_TD.dtype))
            probs_TE = logits_TE.softmax(dim=-1)
            weights_TK, expert_idx_TK = probs_TE.topk(k, dim=-1)
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)

        capacity = None
        if self.training and c.capacity_factor is not None:
            # less a rounding margin: 1.1 * 200 / 4 is 55.000000000000007 in floats, whose ceil is 56
            capacity = math.ceil(c.capacity_factor * t * k / e - 1e-9)
        # the rows are cast before they are permuted (half the bytes moved under bf16 autocast)
        x_SD, sort_idx_S, sizes_E = permute(x_TD.to(_matmul_dtype(x_TD)), expert_idx_TK, e, capacity,
                                            check_values=False)
        # unpermute sums each token's experts in fp32; under autocast its result (bf16) and the
        # shared experts' are added in x's dtype
        y_TD = y_TD.to(x_TD.dtype) + unpermute(self.routed_experts(x_SD, sizes_E), sort_idx_S, weights_TK,
                                                  check_values=False)
        if not stats:
            return y_TD, None

        # Statistics and losses; f counts the router's choices before any drop.
        with torch.no_grad():
            # one histogram of (task, expert), then (modality, expert) keys of the rows kept, then
            # every choice's expert: (n_tasks + n_modalities + 1, E)
            tokens_S, experts_S = sort_idx_S // k, expert_idx_TK.reshape(-1)[sort_idx_S].long()
            nt, nm = c.n_tasks, c.n_modalities
            keys = torch.cat([task_ids_T.long()[tokens_S] * e + experts_S,
                              (modality_ids_T.long()[tokens_S] + nt) * e + experts_S,
                              expert_idx_TK.reshape(-1).long() + (nt + nm) * e])
            counts = _count(keys, nt + nm + 1, e)
            counts_by_task, counts_by_modality, routed_E = counts[:nt], counts[nt:nt + nm], counts[nt + nm]
            dropped = torch.full((), t * k - sort_idx_S.shape[0], dtype=torch.int64, device=x_TD.device)
        balance, z = self.router_losses(logits_TE, probs_TE, routed_E)
        aux = c.aux_loss_weight * balance + c.z_loss_weight * z
        return y_TD, MoEStats(aux, balance.detach(), z.detach(), counts_by_task, counts_by_modality, dropped)

    # `routed_experts` and `router_stats` are the hook points of expert parallelism
    # (generalist/parallel/expert.py), which overrides them; model code stays single-device.
    def routed_experts(self, x_SD: Tensor, sizes_E: Tensor) -> Tensor:
        """Rows sorted by expert (S, D), int32 group sizes (E,) -> SwiGLU expert outputs (S, D)."""
        dt = x_SD.dtype

        def mm(a: Tensor, w: Tensor) -> Tensor:
            return grouped_mm(a, w.to(dt), sizes_E, backend=self.backend, check_values=False)  # sizes from permute

        if self.w1_EDF.dtype == dt:
            h_SF = F.silu(mm(x_SD, self.w1_EDF)) * mm(x_SD, self.w3_EDF)
            return mm(h_SF, self.w2_EFD)
        # The weights are cast anyway (fp32 parameters under bf16 autocast): w1 and w3 go into one
        # operand, and one grouped matmul does both (one launch instead of two forward, two instead
        # of four backward; N twice as wide)
        w13_ED2F, w2_EFD = self._cast_experts(dt)
        h1_SF, h3_SF = mm(x_SD, w13_ED2F).split(self.w1_EDF.shape[2], dim=1)
        return mm(F.silu(h1_SF) * h3_SF, w2_EFD)

    def _cast_experts(self, dt: torch.dtype) -> tuple[Tensor, Tensor]:
        """(w1 and w3 cast into one (E, D, 2F) operand, w2 cast), in dt, for the price of the
        casts alone. Without grad (inference) they are kept and reused until a weight changes
        (its version counter or its storage), so decoding does not cast every expert again for
        each token; with grad they are made anew and anything kept is dropped."""
        w1, w3, w2 = self.w1_EDF, self.w3_EDF, self.w2_EFD
        keep = not torch.is_grad_enabled() and not torch.compiler.is_compiling()
        key = (dt, w1.device, _optimizer_steps, *((w._version, w.data_ptr()) for w in (w1, w3, w2))) if keep else None
        if keep and self._kept_casts is not None and self._kept_casts[0] == key:
            return self._kept_casts[1]
        e, d, f = w1.shape
        w13_ED2F = torch.empty((e, d, 2 * f), dtype=dt, device=w1.device)
        w13_ED2F[..., :f].copy_(w1)
        w13_ED2F[..., f:].copy_(w3)
        casts = (w13_ED2F, w2.to(dt))
        self._kept_casts = (key, casts) if keep else None
        return casts

    def router_losses(self, logits_TE: Tensor, probs_TE: Tensor, routed_E: Tensor) -> tuple[Tensor, Tensor]:
        """(balance, z) from logits and probs (T, E) and int64 router choices per expert (E,)
        before drops: balance = E * sum_e f_e * P_e (Switch), z = mean_t lse_t^2, over the tokens
        that `router_stats` sums (this batch here)."""
        e, k = self.config.n_routed, self.config.top_k
        sums = torch.cat([probs_TE.sum(dim=0), torch.logsumexp(logits_TE, dim=-1).square().sum().reshape(1)])
        routed_E, sums, t = self.router_stats(routed_E, sums, logits_TE.shape[0])
        if not t:  # no tokens: zero, and still connected to the router
            balance = z = logits_TE.sum()
            return balance, z
        f_E = routed_E.to(probs_TE.dtype) / (t * k)
        balance = e * (f_E * (sums[:e] / t)).sum()
        return balance, sums[e] / t

    def router_stats(self, routed_E: Tensor, sums: Tensor, t: int) -> tuple[Tensor, Tensor, int]:
        """The statistics the router losses are made of: router choices per expert (E,), [sum_t
        probs (E), sum_t lse^2] and the token count T. This batch's as they are; data parallelism
        sums them over ranks (generalist/parallel/expert.py)."""
        return routed_E, sums, t


def _count(key_S: Tensor, rows: int, cols: int) -> Tensor:
    """int64 (rows, cols) histogram of row * cols + col keys (scatter_add: static shape under compile)."""
    out = torch.zeros(rows * cols, dtype=torch.int64, device=key_S.device)
    return out.scatter_add_(0, key_S.long(), torch.ones_like(key_S, dtype=torch.int64)).view(rows, cols)
