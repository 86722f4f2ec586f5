"""Pre-norm transformer blocks over packed streams: encoder (bidirectional self-attention +
MoE) and decoder (causal self-attention + cross-attention + MoE).

Shapes: T tokens of the stream, S encoder tokens, B sequences, M model dim.
"""

from __future__ import annotations

import types

import torch
import torch.fx.experimental._config as fx_config
from torch import Tensor, nn

from generalist.modules.attention import CrossAttention, SelfAttention, rotary_angles
from generalist.modules.moe import MoE, MoEConfig


# torch.compile's arguments for a block (compile_block). Dynamic shapes: a packed stream's length
# changes every batch. Inductor's reordering for peak memory is off: with it (torch 2.13, CPU) the
# MoE layer's input gradient came out wrong, the zeroed buffer that the gather's backward adds the
# routed experts' gradients into was read before they were added.
BLOCK_COMPILE = dict(dynamic=True, options={"reorder_for_peak_memory": False})


def compile_block(block: nn.Module, **overrides) -> None:
    """Makes `block`'s forward a torch.compile of its class's forward (BLOCK_COMPILE's arguments,
    `overrides` on top), kept as `block.compiled_forward`; its parameters and state dict stay as
    they are. The compiled function takes the block as an argument, so a deep copy of the block
    runs its own weights through it, and compiling a block again starts from the class's forward.

    Traced without duck shapes: with them, sizes that happen to be equal in the first batch (a
    stream of d_model tokens, say) share one symbol, d_model's constant, and the graph holds for
    that length only, so the next batch compiles again."""
    compiled = torch.compile(type(block).forward, **{**BLOCK_COMPILE, **overrides})

    def forward(self, *args, **kwargs):
        with fx_config.patch(use_duck_shape=False):
            return compiled(self, *args, **kwargs)

    block.compiled_forward = compiled
    block.forward = types.MethodType(forward, block)


class EncoderBlock(nn.Module):
    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, moe: MoEConfig, backend: str):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(d_model), nn.RMSNorm(d_model)
        self.attn = SelfAttention(d_model, n_heads, n_kv_heads, causal=False, backend=backend)
        self.moe = MoE(moe)

    def forward(self, x_TM: Tensor, s: "StreamInfo"):
        x_TM = x_TM + self.attn(self.norm1(x_TM), s.pos, s.cu_seqlens, s.max_seqlen, s.rotary(self.attn.d))
        y_TM, stats = self.moe(self.norm2(x_TM), s.task_ids, s.modality_ids)
        return x_TM + y_TM, stats


class DecoderBlock(nn.Module):
    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, moe: MoEConfig, backend: str):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.RMSNorm(d_model), nn.RMSNorm(d_model), nn.RMSNorm(d_model)
        self.attn = SelfAttention(d_model, n_heads, n_kv_heads, causal=True, backend=backend)
        self.cross = CrossAttention(d_model, n_heads, n_kv_heads, backend=backend)
        self.moe = MoE(moe)

    def forward(self, x_TM: Tensor, s: "StreamInfo", h_SM: Tensor, enc: "StreamInfo"):
        """h_SM: the encoder's output; its keys/values are projected here, inside the block's own
        forward (where FSDP has the block's weights gathered)."""
        memory = self.cross.memory(h_SM)
        x_TM = x_TM + self.attn(self.norm1(x_TM), s.pos, s.cu_seqlens, s.max_seqlen, s.rotary(self.attn.d))
        x_TM = x_TM + self.cross(self.norm2(x_TM), memory, s.cu_seqlens, enc.cu_seqlens, s.max_seqlen, enc.max_seqlen)
        y_TM, stats = self.moe(self.norm3(x_TM), s.task_ids, s.modality_ids)
        return x_TM + y_TM, stats

    def step(self, x_BM: Tensor, pos_B: Tensor, task_ids_B: Tensor, modality_ids_B: Tensor, cache: dict,
             enc: "StreamInfo"):
        """One token per sequence against the cached keys/values (see SelfAttention.step)."""
        x_BM = x_BM + self.attn.step(self.norm1(x_BM), pos_B, cache)
        # one query per sequence: cu_q = 0..B, made once and kept in the cache, so the op's check
        # of its values (a device sync on a GPU) runs once, not at every step
        cu_q = cache.get("cu_q")
        if cu_q is None or cu_q.shape[0] != x_BM.shape[0] + 1:
            cu_q = cache["cu_q"] = torch.arange(x_BM.shape[0] + 1, dtype=torch.int32, device=x_BM.device)
        x_BM = x_BM + self.cross(self.norm2(x_BM), cache["memory"], cu_q, enc.cu_seqlens, 1, enc.max_seqlen)
        y_BM, _ = self.moe(self.norm3(x_BM), task_ids_B, modality_ids_B, stats=False)
        return x_BM + y_BM


class StreamInfo:
    """What every block needs to know about a packed stream besides its activations."""

    def __init__(self, cu_seqlens: Tensor, max_seqlen: int, pos: Tensor, task_ids: Tensor, modality_ids: Tensor):
        self.cu_seqlens, self.max_seqlen, self.pos = cu_seqlens, max_seqlen, pos
        self.task_ids, self.modality_ids = task_ids, modality_ids
        self._angles: dict[int, tuple[Tensor, Tensor]] = {}

    def rotary(self, head_dim: int) -> tuple[Tensor, Tensor]:
        """`rotary_angles` of the stream's positions for `head_dim`: made once, then shared by
        every attention layer (the model makes them as it builds a stream, so that compiled
        blocks only read them)."""
        if head_dim not in self._angles:
            self._angles[head_dim] = rotary_angles(self.pos, head_dim)
        return self._angles[head_dim]
