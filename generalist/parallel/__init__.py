"""Parallelism applied from outside the single-device model code (torchtitan style)."""

from generalist.parallel.expert import (
    ExpertParallelMoE,
    GlobalRouterLossMoE,
    apply_expert_parallel,
    apply_global_router_losses,
    expert_parameter_names,
    gather_expert_optimizer_state,
    gather_expert_state,
    scatter_expert_state,
    shard_expert_optimizer_state,
    sync_expert_parallel_grads,
)
