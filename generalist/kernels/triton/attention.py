"""Flash attention over packed variable-length sequences, in Triton: forward and backward.

Layout (the varlen layout of generalist.ops.attention): q, out, dout (Tq, H, D); k, v (Tk, Hkv, D),
last dim contiguous, other strides free; lse, dlse (H, Tq) fp32; cu_seqlens_q / cu_seqlens_k int32
(B+1,); prefix_lens int32 (B,) or None. Query head h reads key/value head h // (H // Hkv). In a
sequence with lq queries and lk keys, query i sees key j when j < lk and, if causal,
j <= i + lk - lq (bottom-right aligned) or j < prefix. A row that sees no key gives zeros and
lse = -inf.

Kernels (one program per block of one sequence and one head; B = number of sequences):
  _attn_fwd_kernel        grid (B * cdiv(max_seqlen_q, BLOCK_M), H): a query block, online
                          softmax in fp32 over the key blocks it can see. With LONGEST_FIRST
                          (tuned like a block size) the grid is 1-D, ordered by block position
                          across the batch, so the longest blocks do not run last.
  _attn_bwd_delta_kernel  grid (cdiv(Tq, BLOCK_T), H): delta = rowsum(dO * O) - dlse.
  _attn_bwd_dkdv_kernel   grid (B * cdiv(max_seqlen_k, BLOCK_N), Hkv): a key block; loops over the
                          query blocks of every query head that reads it, dK/dV in fp32 registers.
  _attn_bwd_dq_kernel     grid (B * cdiv(max_seqlen_q, BLOCK_M), H): a query block; loops over
                          its key blocks as the forward does.
No atomics: the backward is deterministic. Key (query) blocks every row (key) of the program's
block sees entirely run without a mask; only the blocks on the causal diagonal and at the end of
a sequence pay for one, and blocks nobody sees are skipped.

Scores are kept in base 2 (scaled by softmax_scale * log2(e)) so that exp2 can be used; lse is
stored in natural log. fp32 inputs use exact fp32 products ("ieee"), not tf32, and the backward
adds each block's dK, dV, dQ contribution to its accumulator as a whole (common.dot_acc) rather
than in one FMA chain over the whole sequence, which on a GPU was 4x less accurate than PyTorch.

The launchers check layout and dtype only; generalist.ops validates values. Block sizes are
autotuned on a GPU; under TRITON_INTERPRET=1 (CPU tests) one small configuration is used.
GENERALIST_TRITON_AUTOTUNE=0 skips tuning (each table's first config). Importing this module
needs triton but no GPU.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

from generalist.kernels.triton.common import cdiv, dot_acc, next_power_of_2, tuned_launcher

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)  # log2(e)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)  # ln(2)
MAX_HEAD_DIM = 256
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------


@triton.jit
def _key_blocks(start_m, lq, lk, prefix, IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """For the query block at start_m: key blocks [0, full) are seen entirely by every row,
    [full, end) need the mask, later ones are seen by none."""
    if IS_CAUSAL:
        diag = lk - lq
        last = tl.minimum(start_m + BLOCK_M, lq) - 1
        end = tl.maximum(tl.minimum(lk, tl.maximum(prefix, last + diag + 1)), 0)
        full = tl.maximum(tl.minimum(lk, tl.maximum(prefix, start_m + diag + 1)), 0)
    else:
        end = lk
        full = lk
    full = (full // BLOCK_N) * BLOCK_N
    return full, end


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, lo, hi,
                    lk, lq, prefix, qk_scale, MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr,
                    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    d_ok = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_ok = (offs_n[:, None] < lk) & d_ok[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_kt + offs_d[None, :], mask=kv_ok, other=0.0)
        # scores in base 2; masked entries -inf
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if MASKED:
            visible = offs_n[None, :] < lk
            if IS_CAUSAL:
                visible &= (offs_n[None, :] <= offs_m[:, None] + (lk - lq)) | (offs_n[None, :] < prefix)
            s = tl.where(visible, s, float("-inf"))
        # online softmax; a row with nothing visible yet keeps m = -inf and shifts by 0
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=kv_ok, other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, OUT, LSE, CU_Q, CU_K, PREFIX,
    softmax_scale, max_seqlen_q, group, seq_bucket, batch, n_heads,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_ot, stride_oh, stride_lh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IS_CAUSAL: tl.constexpr,
    HAS_PREFIX: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, LONGEST_FIRST: tl.constexpr,
):
    num_m = tl.cdiv(max_seqlen_q, BLOCK_M)
    if LONGEST_FIRST:
        # 1-D grid, query-block position slowest: the last blocks of every sequence and head (the
        # longest under a causal mask, those of the longest sequences) start first batch-wide
        pid = tl.program_id(0)
        rank = pid // (batch * n_heads)
        b = (pid % (batch * n_heads)) // n_heads
        h = pid % n_heads
        start_m = (num_m - 1 - rank) * BLOCK_M
    else:
        # program -> (sequence, query block, head); in each sequence the longest causal blocks first
        pid = tl.program_id(0)
        h = tl.program_id(1)
        b = pid // num_m
        start_m = (num_m - 1 - pid % num_m) * BLOCK_M
    q_start = tl.load(CU_Q + b)
    lq = tl.load(CU_Q + b + 1) - q_start
    if start_m >= lq:
        return
    k_start = tl.load(CU_K + b)
    lk = tl.load(CU_K + b + 1) - k_start
    prefix = 0
    if HAS_PREFIX:
        prefix = tl.load(PREFIX + b)
    kvh = h // group

    # load the query block
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < lq
    d_ok = offs_d < HEAD_DIM
    q_base = Q + q_start.to(tl.int64) * stride_qt + h * stride_qh
    q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :],
                other=0.0)
    k_base = K + k_start.to(tl.int64) * stride_kt + kvh * stride_kh
    v_base = V + k_start.to(tl.int64) * stride_vt + kvh * stride_vh
    qk_scale = softmax_scale * LOG2E

    # key blocks every row sees entirely, then the masked ones
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    full, end = _key_blocks(start_m, lq, lk, prefix, IS_CAUSAL, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d,
                                    0, full, lk, lq, prefix, qk_scale, False, IS_CAUSAL, HEAD_DIM, BLOCK_N,
                                    DOT_PRECISION)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d,
                                    full, end, lk, lq, prefix, qk_scale, True, IS_CAUSAL, HEAD_DIM, BLOCK_N,
                                    DOT_PRECISION)

    # normalize; rows that saw nothing give zeros and lse = -inf
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)
    o_base = OUT + q_start.to(tl.int64) * stride_ot + h * stride_oh
    tl.store(o_base + offs_m[:, None] * stride_ot + offs_d[None, :], out.to(OUT.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + h * stride_lh + q_start.to(tl.int64) + offs_m, lse, mask=row_ok)


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------


@triton.jit
def _attn_bwd_delta_kernel(
    OUT, DOUT, DLSE, DELTA, total_q,
    stride_ot, stride_oh, stride_dot, stride_doh, stride_dlh, stride_dlt, stride_delh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_DLSE: tl.constexpr, BLOCK_T: tl.constexpr,
):
    # delta = rowsum(dO * O) - dlse, in fp32
    h = tl.program_id(1)
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    t_ok = offs_t < total_q
    ok = t_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    offs_t64 = offs_t.to(tl.int64)
    o = tl.load(OUT + offs_t64[:, None] * stride_ot + h * stride_oh + offs_d[None, :], mask=ok, other=0.0)
    do = tl.load(DOUT + offs_t64[:, None] * stride_dot + h * stride_doh + offs_d[None, :], mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + h * stride_dlh + offs_t64 * stride_dlt, mask=t_ok, other=0.0)
    tl.store(DELTA + h * stride_delh + offs_t64, delta, mask=t_ok)


@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_qh, stride_dot,
                         stride_doh, stride_lh, stride_delh, offs_n, offs_d, lo, num_blocks, group, lq, lk, prefix,
                         qk_scale, MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
                         BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCKED_SUM: tl.constexpr):
    # one flat loop over (query head of the group, query block from lo): nested loops cost registers
    d_ok = offs_d < HEAD_DIM
    zero = tl.where(lq < 0, 1.0, 0.0)
    for it in range(0, group * num_blocks):
        g = it // num_blocks
        offs_m = lo + (it - g * num_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = offs_m < lq
        ok = row_ok[:, None] & d_ok[None, :]
        q = tl.load(q_base + g * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :], mask=ok, other=0.0)
        # lse is +inf for padding rows and rows that see nothing: their probabilities are 0
        lse = tl.load(lse_base + g * stride_lh + offs_m, mask=row_ok, other=float("inf"))
        lse = tl.where(lse == float("-inf"), float("inf"), lse) * LOG2E
        # probabilities, transposed: (keys, queries)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
        p_t = tl.math.exp2(s_t - lse[None, :])
        if MASKED:
            visible = offs_n[:, None] < lk
            if IS_CAUSAL:
                visible &= (offs_n[:, None] <= offs_m[None, :] + (lk - lq)) | (offs_n[:, None] < prefix)
            p_t = tl.where(visible, p_t, 0.0)
        do = tl.load(do_base + g * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :], mask=ok, other=0.0)
        dv = dot_acc(p_t.to(do.dtype), do, dv, zero, DOT_PRECISION, BLOCKED_SUM)
        # dS = P * (dP - delta)
        delta = tl.load(delta_base + g * stride_delh + offs_m, mask=row_ok, other=0.0)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = dot_acc(ds_t.to(q.dtype), q, dk, zero, DOT_PRECISION, BLOCKED_SUM)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DOUT, LSE, DELTA, DK, DV, CU_Q, CU_K, PREFIX,
    softmax_scale, max_seqlen_k, group, seq_bucket,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_lh, stride_delh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IS_CAUSAL: tl.constexpr,
    HAS_PREFIX: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCKED_SUM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # program -> (sequence, key block, key/value head)
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    num_n = tl.cdiv(max_seqlen_k, BLOCK_N)
    b = pid // num_n
    start_n = (pid % num_n) * BLOCK_N
    k_start = tl.load(CU_K + b)
    lk = tl.load(CU_K + b + 1) - k_start
    if start_n >= lk:
        return
    q_start = tl.load(CU_Q + b)
    lq = tl.load(CU_Q + b + 1) - q_start
    prefix = 0
    if HAS_PREFIX:
        prefix = tl.load(PREFIX + b)

    # load the key block
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_ok = (offs_n < lk)[:, None] & (offs_d < HEAD_DIM)[None, :]
    k_base = K + k_start.to(tl.int64) * stride_kt + kvh * stride_kh
    v_base = V + k_start.to(tl.int64) * stride_vt + kvh * stride_vh
    k = tl.load(k_base + offs_n[:, None] * stride_kt + offs_d[None, :], mask=kv_ok, other=0.0)
    v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=kv_ok, other=0.0)
    qk_scale = softmax_scale * LOG2E

    # query rows [lo, full) need the mask, rows from full on see the whole key block
    lo = 0
    full = 0
    if IS_CAUSAL:
        diag = lk - lq
        lo = tl.where(start_n < prefix, 0, start_n - diag)
        full = tl.where(start_n + BLOCK_N <= prefix, 0, start_n + BLOCK_N - 1 - diag)
    lo = (tl.minimum(tl.maximum(lo, 0), lq) // BLOCK_M) * BLOCK_M
    full = tl.where(start_n + BLOCK_N > lk, lq, full)  # a partial key block is masked everywhere
    full = tl.minimum(tl.maximum(full, lo), lq)
    full = lo + tl.cdiv(full - lo, BLOCK_M) * BLOCK_M

    # every query head of the group, every query block that sees this key block
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    q_start64 = q_start.to(tl.int64)
    h0 = kvh * group
    q_base = Q + q_start64 * stride_qt + h0 * stride_qh
    do_base = DOUT + q_start64 * stride_dot + h0 * stride_doh
    lse_base = LSE + h0 * stride_lh + q_start64
    delta_base = DELTA + h0 * stride_delh + q_start64
    dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_qh,
                                  stride_dot, stride_doh, stride_lh, stride_delh, offs_n, offs_d, lo,
                                  (full - lo) // BLOCK_M, group, lq, lk, prefix, qk_scale, True, IS_CAUSAL, HEAD_DIM,
                                  BLOCK_M, DOT_PRECISION, BLOCKED_SUM)
    dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_qh,
                                  stride_dot, stride_doh, stride_lh, stride_delh, offs_n, offs_d, full,
                                  tl.cdiv(lq - full, BLOCK_M), group, lq, lk, prefix, qk_scale, False, IS_CAUSAL,
                                  HEAD_DIM, BLOCK_M, DOT_PRECISION, BLOCKED_SUM)

    # write dK (scaled) and dV
    dk_base = DK + k_start.to(tl.int64) * stride_dkt + kvh * stride_dkh
    dv_base = DV + k_start.to(tl.int64) * stride_dvt + kvh * stride_dvh
    tl.store(dk_base + offs_n[:, None] * stride_dkt + offs_d[None, :], (dk * softmax_scale).to(DK.dtype.element_ty),
             mask=kv_ok)
    tl.store(dv_base + offs_n[:, None] * stride_dvt + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_ok)


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, lo, hi,
                       lq, lk, prefix, qk_scale, MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr,
                       HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
                       BLOCKED_SUM: tl.constexpr):
    d_ok = offs_d < HEAD_DIM
    zero = tl.where(lq < 0, 1.0, 0.0)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_ok = (offs_n[:, None] < lk) & d_ok[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_kt + offs_d[None, :], mask=kv_ok, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=kv_ok, other=0.0)
        # probabilities from the saved lse
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        p = tl.math.exp2(s - lse[:, None])
        if MASKED:
            visible = offs_n[None, :] < lk
            if IS_CAUSAL:
                visible &= (offs_n[None, :] <= offs_m[:, None] + (lk - lq)) | (offs_n[None, :] < prefix)
            p = tl.where(visible, p, 0.0)
        # dS = P * (dP - delta); dQ += dS K
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = dot_acc(ds.to(k.dtype), k, dq, zero, DOT_PRECISION, BLOCKED_SUM)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DOUT, LSE, DELTA, DQ, CU_Q, CU_K, PREFIX,
    softmax_scale, max_seqlen_q, group, seq_bucket,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh, stride_lh, stride_delh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IS_CAUSAL: tl.constexpr,
    HAS_PREFIX: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCKED_SUM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # program -> (sequence, query block, head); the longest causal blocks start first
    pid = tl.program_id(0)
    h = tl.program_id(1)
    num_m = tl.cdiv(max_seqlen_q, BLOCK_M)
    b = pid // num_m
    start_m = (num_m - 1 - pid % num_m) * BLOCK_M
    q_start = tl.load(CU_Q + b)
    lq = tl.load(CU_Q + b + 1) - q_start
    if start_m >= lq:
        return
    k_start = tl.load(CU_K + b)
    lk = tl.load(CU_K + b + 1) - k_start
    prefix = 0
    if HAS_PREFIX:
        prefix = tl.load(PREFIX + b)
    kvh = h // group

    # load the query block, dO, lse (+inf where the row sees nothing) and delta
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < lq
    ok = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    q_start64 = q_start.to(tl.int64)
    q = tl.load(Q + q_start64 * stride_qt + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=ok, other=0.0)
    do = tl.load(DOUT + q_start64 * stride_dot + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
                 mask=ok, other=0.0)
    lse = tl.load(LSE + h * stride_lh + q_start64 + offs_m, mask=row_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * LOG2E
    delta = tl.load(DELTA + h * stride_delh + q_start64 + offs_m, mask=row_ok, other=0.0)
    k_base = K + k_start.to(tl.int64) * stride_kt + kvh * stride_kh
    v_base = V + k_start.to(tl.int64) * stride_vt + kvh * stride_vh
    qk_scale = softmax_scale * LOG2E

    # key blocks seen entirely, then the masked ones (same split as the forward)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    full, end = _key_blocks(start_m, lq, lk, prefix, IS_CAUSAL, BLOCK_M, BLOCK_N)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, 0, full,
                            lq, lk, prefix, qk_scale, False, IS_CAUSAL, HEAD_DIM, BLOCK_N, DOT_PRECISION, BLOCKED_SUM)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, full, end,
                            lq, lk, prefix, qk_scale, True, IS_CAUSAL, HEAD_DIM, BLOCK_N, DOT_PRECISION, BLOCKED_SUM)

    # write dQ (scaled)
    dq_base = DQ + q_start64 * stride_dqt + h * stride_dqh
    tl.store(dq_base + offs_m[:, None] * stride_dqt + offs_d[None, :], (dq * softmax_scale).to(DQ.dtype.element_ty),
             mask=ok)


# --------------------------------------------------------------------------------------------
# Configurations: autotuned on a GPU, one small fixed one under the interpreter
# --------------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, num_warps, num_stages) by kernel and BLOCK_D (64 stands for 16..64); BLOCK_M
# counts queries, BLOCK_N keys. 16-bit tables differ between Hopper (wgmma) and Ampere (mma.sync);
# fp32 runs exact fp32 products on the CUDA cores, which need small tiles on both. The first entry
# of each table (the default when tuning is off) compiles without register spills with Triton 3.6
# for full head dims (causal with a prefix as launched on aligned tensors and not, without a mask
# on aligned ones) and for masked ones; at hdim 128 on Hopper every entry does on aligned tensors
# (the compile tests).
# Elsewhere a few candidates spill a few bytes: the tuner weighs that.
# Hopper tuning is tiles, warps and pipeline depth: Triton 3.6's automatic warp specialization
# (tl.range(warp_specialize=True)) runs on Blackwell only and on plain matmul loops. On Hopper a
# dot runs on wgmma only when its row side (BLOCK_M in fwd and dq, BLOCK_N in dkdv) is at least
# 64; narrower tiles fall back to mma.sync. Up to hdim 128 those stay candidates but are no
# default: with one as the hdim-128 dkdv default, the untuned backward ran at a third of the tuned
# one's speed on an H100 (BENCHMARKS.md). At hdim 256 every wgmma tile spills, so mma.sync it is.
# The compile test checks every hdim-128 Hopper entry.
_CONFIGS_16BIT = {
    90: {
        ("fwd", 64): [(128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3),
                      (64, 32, 4, 2)],
        ("fwd", 128): [(128, 64, 8, 2), (128, 64, 8, 3), (64, 64, 8, 3), (128, 32, 8, 2), (64, 32, 4, 3),
                       (128, 128, 8, 2)],
        ("fwd", 256): [(32, 64, 8, 2), (32, 32, 8, 2), (64, 32, 8, 2), (128, 32, 8, 2), (64, 64, 8, 2)],
        ("dkdv", 64): [(32, 128, 8, 3), (64, 128, 8, 3), (32, 128, 8, 2), (64, 64, 8, 2), (32, 64, 4, 3),
                       (32, 64, 8, 3), (16, 128, 8, 2)],
        ("dkdv", 128): [(16, 64, 8, 2), (32, 64, 8, 2), (32, 128, 8, 3), (32, 128, 8, 2), (64, 64, 8, 3),
                        (64, 64, 8, 2), (32, 64, 4, 2), (16, 32, 8, 2)],
        ("dkdv", 256): [(16, 32, 8, 2), (32, 32, 8, 2)],
        ("dq", 64): [(128, 32, 8, 3), (128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), (64, 32, 4, 3)],
        ("dq", 128): [(64, 32, 8, 2), (64, 16, 8, 2), (32, 64, 8, 2), (32, 32, 8, 2), (128, 32, 8, 3),
                      (128, 64, 8, 2), (64, 64, 8, 2), (64, 64, 8, 3), (64, 32, 4, 3)],
        ("dq", 256): [(32, 16, 8, 2), (32, 32, 8, 2), (16, 32, 8, 2)],
    },
    80: {
        ("fwd", 64): [(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3), (64, 32, 4, 2)],
        ("fwd", 128): [(64, 64, 8, 3), (128, 32, 8, 2), (64, 32, 4, 3)],
        ("fwd", 256): [(64, 32, 8, 2), (64, 64, 8, 2), (32, 32, 8, 2), (64, 16, 8, 2)],
        ("dkdv", 64): [(32, 32, 4, 2), (32, 64, 4, 3), (16, 128, 8, 2), (16, 64, 4, 2)],
        ("dkdv", 128): [(32, 64, 8, 2), (16, 64, 8, 2), (32, 32, 8, 2), (16, 32, 8, 2)],
        ("dkdv", 256): [(16, 32, 8, 2)],
        ("dq", 64): [(128, 32, 8, 3), (128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), (64, 32, 4, 3)],
        ("dq", 128): [(64, 64, 8, 2), (64, 32, 8, 2), (32, 64, 8, 2), (64, 16, 8, 2), (32, 32, 8, 2)],
        ("dq", 256): [(32, 32, 8, 2), (16, 32, 8, 2), (32, 16, 8, 2)],
    },
}
_CONFIGS_FP32 = {
    ("fwd", 64): [(64, 16, 8, 2), (64, 32, 8, 2), (32, 32, 4, 2), (16, 32, 8, 2)],
    ("fwd", 128): [(16, 32, 8, 2), (16, 16, 4, 2)],
    ("fwd", 256): [(16, 16, 4, 2)],
    ("dkdv", 64): [(16, 16, 4, 2), (16, 32, 4, 2), (16, 32, 8, 2), (16, 16, 8, 2)],
    ("dkdv", 128): [(16, 32, 8, 2), (16, 16, 8, 2)],
    ("dkdv", 256): [(16, 16, 8, 1), (16, 32, 8, 2), (16, 16, 16, 2)],
    ("dq", 64): [(64, 32, 8, 2), (32, 16, 8, 2), (32, 32, 8, 2)],
    ("dq", 128): [(32, 32, 8, 2), (32, 16, 8, 2)],
    ("dq", 256): [(16, 32, 8, 2), (32, 16, 8, 2), (16, 16, 4, 2)],
}
# Under the interpreter: small blocks (fast on a CPU, several blocks per test sequence), and
# query and key blocks of different sizes so that both orders of the mask arithmetic run.
_INTERPRET_BLOCKS = {"fwd": (16, 32), "dkdv": (32, 16), "dq": (32, 16)}
# The forward's two program orders: both are tuning candidates on a GPU; the interpreter runs the
# first (tests switch it).
_FWD_ORDERS = (True, False)
_TUNE_KEY = ["HEAD_DIM", "IS_CAUSAL", "HAS_PREFIX", "seq_bucket"]
_KERNELS = {"fwd": _attn_fwd_kernel, "dkdv": _attn_bwd_dkdv_kernel, "dq": _attn_bwd_dq_kernel}


def _smem_estimate(kernel: str, bm: int, bn: int, stages: int, block_d: int, elem: int) -> int:
    """Shared memory a config needs, roughly: the resident tiles plus `stages` streamed tiles."""
    if kernel == "fwd":  # q resident, k and v streamed
        return (bm + 2 * bn * stages) * block_d * elem
    if kernel == "dkdv":  # k, v resident, q and dO streamed
        return (2 * bn + 2 * bm * stages) * block_d * elem
    return (2 * bm + 2 * bn * stages) * block_d * elem  # dq: q, dO resident, k and v streamed


def configs_for(kernel: str, elem: int, block_d: int, arch: int = 90,
                smem_limit: int | None = None) -> list[tuple[int, ...]]:
    """Candidate (BLOCK_M, BLOCK_N, num_warps, num_stages) for one kernel, operand width in bytes,
    BLOCK_D and architecture (90: Hopper and newer, 80: older), less those needing more shared
    memory than `smem_limit` (but never none)."""
    key = (kernel, max(64, block_d))
    table = _CONFIGS_FP32[key] if elem == 4 else _CONFIGS_16BIT[90 if arch >= 90 else 80][key]
    if smem_limit is None:
        return list(table)
    fits = [c for c in table if _smem_estimate(kernel, c[0], c[1], c[3], block_d, elem) <= smem_limit]
    return fits or [min(table, key=lambda c: _smem_estimate(kernel, c[0], c[1], c[3], block_d, elem))]


@functools.lru_cache(maxsize=None)
def _autotuned(kernel: str, elem: int, block_d: int, device: int, tune: bool):
    """The autotuned launcher (a TunedLauncher; its `tuner` is Triton's autotuner) of one kernel
    for one operand width and BLOCK_D on one device, built on first use (never at import)."""
    major, minor = torch.cuda.get_device_capability(device)
    arch = 80 if torch.version.hip is not None else 10 * major + minor
    props = triton.runtime.driver.active.utils.get_device_properties(device)
    table = configs_for(kernel, elem, block_d, arch, props["max_shared_mem"])
    if not tune:
        table = table[:1]
    orders = [{"LONGEST_FIRST": o} for o in (_FWD_ORDERS if tune else _FWD_ORDERS[:1])] if kernel == "fwd" else [{}]
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, **order}, num_warps=w, num_stages=s)
               for bm, bn, w, s in table for order in orders]
    return tuned_launcher(_KERNELS[kernel], configs, _TUNE_KEY)


def interpreting() -> bool:
    """True when the kernels run in Triton's interpreter (TRITON_INTERPRET=1 when this module was
    imported); only then can they take CPU tensors."""
    return not isinstance(_attn_fwd_kernel, triton.runtime.JITFunction)


def _use_interpreter_blocks() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1" or interpreting()


def _launch(kernel: str, grid_of, q: torch.Tensor, *args, **constexprs):
    """Launch with the interpreter's fixed blocks, or through the autotuner on a GPU.
    GENERALIST_TRITON_AUTOTUNE=0 skips tuning (each table's first config), e.g. for tests."""
    if _use_interpreter_blocks():
        bm, bn = _INTERPRET_BLOCKS[kernel]
        meta = {"BLOCK_M": bm, "BLOCK_N": bn, **({"LONGEST_FIRST": _FWD_ORDERS[0]} if kernel == "fwd" else {})}
        _KERNELS[kernel][grid_of(meta)](q, *args, **constexprs, **meta)
        return
    tune = os.environ.get("GENERALIST_TRITON_AUTOTUNE", "1") != "0"
    launcher = _autotuned(kernel, q.element_size(), constexprs["BLOCK_D"], q.device.index, tune)
    launcher[grid_of](q, *args, **constexprs)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _block_d(d: int) -> int:
    return max(16, next_power_of_2(d))


def _seq_bucket(n: int) -> int:
    """Autotuning key for a sequence length: powers of two from 128 to 16384."""
    return min(max(next_power_of_2(max(n, 1)), 128), 16384)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x with a contiguous last dim (other strides are passed to the kernels)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _check(q, k, v, cu_seqlens_q, cu_seqlens_k, prefix_lens):
    if q.dtype not in DTYPES:
        raise ValueError(f"triton attention: q dtype {q.dtype} not supported; use one of {DTYPES}")
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"triton attention: expected q (Tq, H, D) and k, v (Tk, Hkv, D); got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"triton attention: q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not 1 <= q.shape[-1] <= MAX_HEAD_DIM:
        raise ValueError(f"triton attention: head dim must be in 1..{MAX_HEAD_DIM}, got {q.shape[-1]}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"triton attention: {q.shape[1]} query heads are not a multiple of {k.shape[1]} kv heads")
    for name, t in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k), ("prefix_lens", prefix_lens)):
        if t is not None and (t.dtype != torch.int32 or not t.is_contiguous()):
            raise ValueError(f"triton attention: {name} must be a contiguous int32 tensor")


def _on_device(x: torch.Tensor):
    """Triton launches on the current CUDA device: make it x's."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # only fp32 operands read it


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                      cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float,
                      causal: bool, prefix_lens: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """q (Tq, H, D), k/v (Tk, Hkv, D) -> out (Tq, H, D) in q's dtype, lse (H, Tq) fp32."""
    _check(q, k, v, cu_seqlens_q, cu_seqlens_k, prefix_lens)
    q, k, v = _rows(q), _rows(k), _rows(v)
    tq, h, d = q.shape
    hkv = k.shape[1]
    batch = cu_seqlens_q.shape[0] - 1
    out = torch.empty((tq, h, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((h, tq), dtype=torch.float32, device=q.device)
    if tq == 0 or batch == 0 or max_seqlen_q == 0:
        return out, lse
    if k.shape[0] == 0:  # no keys anywhere: every row sees nothing
        return out.zero_(), lse.fill_(float("-inf"))
    has_prefix = prefix_lens is not None and bool(causal)
    with _on_device(q):
        _launch(
            "fwd", lambda meta: ((batch * cdiv(max_seqlen_q, meta["BLOCK_M"]) * h,) if meta["LONGEST_FIRST"]
                                 else (batch * cdiv(max_seqlen_q, meta["BLOCK_M"]), h)),
            q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, prefix_lens if has_prefix else cu_seqlens_q,
            float(softmax_scale), int(max_seqlen_q), h // hkv, _seq_bucket(max_seqlen_q), batch, h,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            out.stride(0), out.stride(1), lse.stride(0),
            HEAD_DIM=d, BLOCK_D=_block_d(d), IS_CAUSAL=bool(causal), HAS_PREFIX=has_prefix,
            DOT_PRECISION=_dot_precision(q.dtype),
        )
    return out, lse


def attention_backward(dout: torch.Tensor, dlse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
                       v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, cu_seqlens_q: torch.Tensor,
                       cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float,
                       causal: bool, prefix_lens: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """Gradients (dq, dk, dv) in the inputs' dtype; dlse (H, Tq), the gradient of lse, may be None."""
    _check(q, k, v, cu_seqlens_q, cu_seqlens_k, prefix_lens)
    if dout.shape != q.shape or out.shape != q.shape or lse.shape != (q.shape[1], q.shape[0]):
        raise ValueError(f"triton attention backward: dout/out must be {tuple(q.shape)} and lse "
                         f"{(q.shape[1], q.shape[0])}; got {tuple(dout.shape)}, {tuple(out.shape)}, {tuple(lse.shape)}")
    if dlse is not None and dlse.shape != lse.shape:
        raise ValueError(f"triton attention backward: dlse must be {tuple(lse.shape)}, got {tuple(dlse.shape)}")
    q, k, v, out, dout = _rows(q), _rows(k), _rows(v), _rows(out), _rows(dout)
    lse = lse.float().contiguous()
    tq, h, d = q.shape
    tk, hkv = k.shape[0], k.shape[1]
    batch = cu_seqlens_q.shape[0] - 1
    dq = torch.empty((tq, h, d), dtype=q.dtype, device=q.device)
    dk = torch.empty((tk, hkv, d), dtype=k.dtype, device=k.device)
    dv = torch.empty((tk, hkv, d), dtype=v.dtype, device=v.device)
    if tq == 0 or tk == 0 or batch == 0:  # nothing attends to anything
        return dq.zero_(), dk.zero_(), dv.zero_()
    block_d = _block_d(d)
    has_prefix = prefix_lens is not None and bool(causal)
    prefix = prefix_lens if has_prefix else cu_seqlens_q
    precision = _dot_precision(q.dtype)
    group = h // hkv

    with _on_device(q):
        # delta = rowsum(dO * O) - dlse
        delta = torch.empty((h, tq), dtype=torch.float32, device=q.device)
        dlse_arg = dlse.float() if dlse is not None else delta
        block_t = 16 if _use_interpreter_blocks() else 64
        _attn_bwd_delta_kernel[(cdiv(tq, block_t), h)](
            out, dout, dlse_arg, delta, tq,
            out.stride(0), out.stride(1), dout.stride(0), dout.stride(1), dlse_arg.stride(0), dlse_arg.stride(1),
            delta.stride(0),
            HEAD_DIM=d, BLOCK_D=block_d, HAS_DLSE=dlse is not None, BLOCK_T=block_t,
        )
        common = dict(HEAD_DIM=d, BLOCK_D=block_d, IS_CAUSAL=bool(causal), HAS_PREFIX=has_prefix,
                      DOT_PRECISION=precision, BLOCKED_SUM=q.dtype == torch.float32)

        # dK, dV: one program per key block
        _launch(
            "dkdv", lambda meta: (batch * cdiv(max_seqlen_k, meta["BLOCK_N"]), hkv),
            q, k, v, dout, lse, delta, dk, dv, cu_seqlens_q, cu_seqlens_k, prefix,
            float(softmax_scale), int(max_seqlen_k), group, _seq_bucket(max_seqlen_k),
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            dout.stride(0), dout.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
            lse.stride(0), delta.stride(0),
            **common,
        )
        # dQ: one program per query block
        _launch(
            "dq", lambda meta: (batch * cdiv(max_seqlen_q, meta["BLOCK_M"]), h),
            q, k, v, dout, lse, delta, dq, cu_seqlens_q, cu_seqlens_k, prefix,
            float(softmax_scale), int(max_seqlen_q), group, _seq_bucket(max_seqlen_q),
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            dout.stride(0), dout.stride(1), dq.stride(0), dq.stride(1), lse.stride(0), delta.stride(0),
            **common,
        )
    return dq, dk, dv

