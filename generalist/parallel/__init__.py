"""Parallelism applied from outside the single-device model code (torchtitan style)."""

from generalist.parallel.expert import (
    ExpertParallelMoE,
    apply_expert_parallel,
    expert_parameter_names,
    gather_expert_state,
    scatter_expert_state,
    sync_expert_parallel_grads,
)
