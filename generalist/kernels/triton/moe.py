"""Grouped (per-expert) matmul over variable-sized row groups, in Triton: forward and backward.

Layout (that of generalist.ops.moe): rows are sorted by expert; group e is the rows
[o_e, o_e + n_e) with o_e = n_0 + ... + n_{e-1}, n = group_sizes (E,) int32/int64 on the
tensors' device. Any strides; D and F need not be multiples of anything; empty groups are fine.

Kernels:
  _grouped_mm_kernel  c[rows of g] = a[rows of g] @ b[g]: a (T, K), b (E, K, N), c (T, N).
                      1-D grid over (row tile, column tile) pairs, row tiles of BLOCK_M rows that
                      never straddle two groups. The tile -> (group, first row) schedule is
                      worked out inside each program from group_sizes (a cumsum over E lanes),
                      so the host never reads group_sizes and the grid, cdiv(T, BLOCK_M) + E row
                      tiles (an upper bound), needs no sync; the unused ones exit at once. Or
                      persistent (configs with programs per SM): a few programs per multiprocessor
                      striding over the tiles that hold rows, the tile loop and the K loop
                      flattened into one software pipeline, loading through pointers or (where
                      the operands allow, Hopper) TMA; the tuner picks either kind.
                      The forward is (x, w); dx is (dy, w^T) via strides.
  _grouped_dw_kernel  dw[g] = x[rows of g]^T @ dy[rows of g]: one program per (BLOCK_M tile of D,
                      BLOCK_N tile of F, expert), looping over the group's rows; an empty group
                      writes zeros. E is grid axis 1, so at most 65535 experts. Or one program
                      per chunk of an expert's tiles (configs with a chunk), which loads x's and
                      dy's rows through TMA where they allow (16-byte rows) from descriptors of
                      the expert's rows alone, its tiles and row steps one software pipeline.
                      Or persistent (configs with programs per SM): a grid of a few programs per
                      multiprocessor striding over the tiles. Chunked and persistent programs
                      may store their tiles through TMA (async, from shared memory, while the
                      program goes on) where dw has 16-byte rows; the tuner picks the kind.
The backward runs dx and dw one after the other, or side by side on two streams (dw first, on a
side stream of higher priority), whichever was timed faster at the shape's first backward.
Products accumulate in fp32 and are stored in the inputs' dtype; fp32 inputs use exact fp32
products ("ieee"), not tf32, summed per BLOCK_K slice and then across slices (a sequential sum
over a 1000-row group is several times less accurate than cuBLAS). No atomics: results are
deterministic.

The launchers check layout and dtype only; generalist.ops validates values. Block sizes are
autotuned on a GPU; under TRITON_INTERPRET=1 (CPU tests) one small configuration is used.
GENERALIST_TRITON_AUTOTUNE=0 skips tuning (each table's first config). Importing this module
needs triton but no GPU.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.runtime import _allocation

from generalist.kernels.triton.common import cdiv, dot_acc, next_power_of_2, tuned_launcher

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
GROUP_SIZE_DTYPES = (torch.int32, torch.int64)


@triton.jit
def _row_tile(sizes, tiles, tile_end, offs_e, tile, BLOCK_M: tl.constexpr):
    """Row tile `tile` -> (group, its first row, the group's end row), from the groups' sizes, row
    tiles and their cumsum tile_end (over E lanes); group >= E when `tile` lies past the last
    tile. Group e owns tiles [tile_end_{e-1}, tile_end_e)."""
    g = tl.sum((tile_end <= tile).to(tl.int32), 0)
    before = offs_e < g
    row_start = tl.sum(tl.where(before, sizes, 0), 0) + (tile - tl.sum(tl.where(before, tiles, 0), 0)) * BLOCK_M
    row_end = tl.sum(tl.where(offs_e <= g, sizes, 0), 0)
    return g, row_start, row_end


@triton.jit
def _store_rows(C, acc, offs_m, offs_n, m_ok, n_ok, stride_ct, stride_cn):
    """c[offs_m, offs_n] = acc in c's dtype, where m_ok and n_ok."""
    c_ptrs = C + offs_m.to(tl.int64)[:, None] * stride_ct + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _mm_tile(A, B, C, g, row_start, row_end, pid_n, K, N,
             stride_at, stride_ak, stride_be, stride_bk, stride_bn, stride_ct, stride_cn,
             DOT_PRECISION: tl.constexpr, BLOCKED_SUM: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """c[rows row_start .. row_end of group g, column tile pid_n] = a[those rows] @ b[g]."""
    offs_m = row_start + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < row_end
    n_ok = offs_n < N
    a_ptrs = A + offs_m.to(tl.int64)[:, None] * stride_at + offs_k[None, :] * stride_ak
    b_ptrs = B + g.to(tl.int64) * stride_be + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn

    # K loop, fp32 accumulator; ragged edges load zeros
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    zero = tl.where(K < 0, 1.0, 0.0)
    for k in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = dot_acc(a, b, acc, zero, DOT_PRECISION, BLOCKED_SUM)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    _store_rows(C, acc, offs_m, offs_n, m_ok, n_ok, stride_ct, stride_cn)


@triton.jit
def _swizzle(tile, num_m, num_n, GROUP_M: tl.constexpr):
    """Tile `tile` of num_m row tiles x num_n column tiles -> (row tile, column tile), GROUP_M row
    tiles at a time, so that neighbouring tiles share both a's rows and b's columns in L2."""
    per_group = GROUP_M * num_n
    first_m = (tile // per_group) * GROUP_M
    # at least 1: a persistent program's flattened loop decodes the tile after its last too (its
    # loads are predicated off), which can lie past the last group of row tiles
    rows_here = tl.maximum(tl.minimum(num_m - first_m, GROUP_M), 1)
    return first_m + (tile % per_group) % rows_here, (tile % per_group) // rows_here


@triton.jit
def _mm_tile_flat(A, B, C, g, row_start, row_end, pid_n, K, N,
                  stride_at, stride_ak, stride_be, stride_bk, stride_bn, stride_ct, stride_cn,
                  DOT_PRECISION: tl.constexpr, BLOCKED_SUM: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """_mm_tile for a loop the compiler flattens into the persistent tile loop: the K loop
    carries only its step, and builds each step's pointers from the tile's row and column offsets
    (carrying pointer tiles across the flattened loop, as _mm_tile does across its own, takes
    registers for two tiles' pointers at once)."""
    offs_m = row_start + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < row_end
    n_ok = offs_n < N
    a_rows = A + offs_m.to(tl.int64)[:, None] * stride_at
    b_cols = B + g.to(tl.int64) * stride_be + offs_n[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    zero = tl.where(K < 0, 1.0, 0.0)
    for k in range(0, K, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        a = tl.load(a_rows + offs_k[None, :] * stride_ak, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_cols + offs_k[:, None] * stride_bk, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = dot_acc(a, b, acc, zero, DOT_PRECISION, BLOCKED_SUM)
    _store_rows(C, acc, offs_m, offs_n, m_ok, n_ok, stride_ct, stride_cn)


@triton.jit
def _grouped_mm_kernel(
    A, B, C, SIZES,
    T, K, N, E, t_bucket,
    stride_at, stride_ak, stride_be, stride_bk, stride_bn, stride_ct, stride_cn,
    DOT_PRECISION: tl.constexpr, BLOCKED_SUM: tl.constexpr, BLOCK_E: tl.constexpr, GROUP_M: tl.constexpr,
    TMA_OK: tl.constexpr, B_TRANSPOSED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PROGRAMS_PER_SM: tl.constexpr, TMA_LOAD: tl.constexpr,
):
    # row tile -> expert and rows, from the group sizes read here (the host never reads them)
    offs_e = tl.arange(0, BLOCK_E)
    sizes = tl.load(SIZES + offs_e, mask=offs_e < E, other=0).to(tl.int32)
    tiles = (sizes + BLOCK_M - 1) // BLOCK_M
    tile_end = tl.cumsum(tiles, 0)
    num_n = tl.cdiv(N, BLOCK_N)
    if PROGRAMS_PER_SM == 0:
        # a program per (row tile, column tile) of the upper bound cdiv(T, BLOCK_M) + E row tiles;
        # tiles past the last group have nothing to do
        pid_m, pid_n = _swizzle(tl.program_id(0), tl.cdiv(T, BLOCK_M) + E, num_n, GROUP_M)
        g, row_start, row_end = _row_tile(sizes, tiles, tile_end, offs_e, pid_m, BLOCK_M)
        if g >= E:
            return
        _mm_tile(A, B, C, g, row_start, row_end, pid_n, K, N,
                 stride_at, stride_ak, stride_be, stride_bk, stride_bn, stride_ct, stride_cn,
                 DOT_PRECISION, BLOCKED_SUM, BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        # persistent: a few programs per multiprocessor, each taking every num_programs-th of the
        # tiles that hold rows (counted here), in the same GROUP_M order. The K loop's bounds are
        # the same for every tile, so the compiler flattens the two loops into one pipeline: the
        # next tile's first loads are in flight while this tile's result is stored.
        num_m = tl.sum(tiles, 0)
        if TMA_LOAD > 0 and TMA_OK:
            # tiles of a and b[g] come in through the tensor memory accelerator (no address
            # registers): a as one (T, K) matrix, whose rows past a group's end belong to the next
            # group (loaded, never stored) or lie past T (zeros); b as (E, K, N), or (E, N, K)
            # where b[g] is a transposed view (dx's w^T), so that K past its end reads zeros
            # inside each expert
            a_desc = tl.make_tensor_descriptor(A, shape=[T, K], strides=[stride_at, 1], block_shape=[BLOCK_M, BLOCK_K])
            if B_TRANSPOSED:
                b_desc = tl.make_tensor_descriptor(B, shape=[E, N, K], strides=[stride_be, stride_bn, 1],
                                                   block_shape=[1, BLOCK_N, BLOCK_K])
            else:
                b_desc = tl.make_tensor_descriptor(B, shape=[E, K, N], strides=[stride_be, stride_bk, 1],
                                                   block_shape=[1, BLOCK_K, BLOCK_N])
            zero = tl.where(K < 0, 1.0, 0.0)
            for tile in tl.range(tl.program_id(0), num_m * num_n, tl.num_programs(0), flatten=True):
                pid_m, pid_n = _swizzle(tile, num_m, num_n, GROUP_M)
                g, row_start, row_end = _row_tile(sizes, tiles, tile_end, offs_e, pid_m, BLOCK_M)
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for k in range(0, K, BLOCK_K):
                    a = a_desc.load([row_start, k])
                    if B_TRANSPOSED:
                        b = tl.trans(tl.reshape(b_desc.load([g, pid_n * BLOCK_N, k]), (BLOCK_N, BLOCK_K)))
                    else:
                        b = tl.reshape(b_desc.load([g, k, pid_n * BLOCK_N]), (BLOCK_K, BLOCK_N))
                    acc = dot_acc(a, b, acc, zero, DOT_PRECISION, BLOCKED_SUM)
                offs_m = row_start + tl.arange(0, BLOCK_M)
                offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
                _store_rows(C, acc, offs_m, offs_n, offs_m < row_end, offs_n < N, stride_ct, stride_cn)
        else:
            for tile in tl.range(tl.program_id(0), num_m * num_n, tl.num_programs(0), flatten=True):
                pid_m, pid_n = _swizzle(tile, num_m, num_n, GROUP_M)
                g, row_start, row_end = _row_tile(sizes, tiles, tile_end, offs_e, pid_m, BLOCK_M)
                _mm_tile_flat(A, B, C, g, row_start, row_end, pid_n, K, N,
                              stride_at, stride_ak, stride_be, stride_bk, stride_bn, stride_ct, stride_cn,
                              DOT_PRECISION, BLOCKED_SUM, BLOCK_M, BLOCK_N, BLOCK_K)


@triton.jit
def _dw_tile(X, DY, sizes, offs_e, g, pid_m, pid_n, T, D, F,
             stride_xt, stride_xd, stride_yt, stride_yf,
             DOT_PRECISION: tl.constexpr, BLOCKED_SUM: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """dw[g]'s (pid_m, pid_n) tile in fp32: x[rows of g]^T @ dy[rows of g] over BLOCK_K-row steps
    (zeros for an empty group)."""
    row_start = tl.sum(tl.where(offs_e < g, sizes, 0), 0)
    row_end = row_start + tl.sum(tl.where(offs_e == g, sizes, 0), 0)
    offs_d = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_f = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = row_start + tl.arange(0, BLOCK_K)
    d_ok = offs_d < D
    f_ok = offs_f < F
    x_ptrs = X + offs_r.to(tl.int64)[None, :] * stride_xt + offs_d[:, None] * stride_xd
    dy_ptrs = DY + offs_r.to(tl.int64)[:, None] * stride_yt + offs_f[None, :] * stride_yf
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    zero = tl.where(T < 0, 1.0, 0.0)
    for r in range(row_start, row_end, BLOCK_K):
        r_ok = offs_r < row_end - (r - row_start)
        xt = tl.load(x_ptrs, mask=d_ok[:, None] & r_ok[None, :], other=0.0)
        dy = tl.load(dy_ptrs, mask=r_ok[:, None] & f_ok[None, :], other=0.0)
        acc = dot_acc(xt, dy, acc, zero, DOT_PRECISION, BLOCKED_SUM)
        x_ptrs += BLOCK_K * stride_xt
        dy_ptrs += BLOCK_K * stride_yt
    return acc


@triton.jit
def _store_dw_tile(DW, dw_desc, acc, g, pid_m, pid_n, D, F, stride_we, stride_wd, stride_wf,
                   TMA: tl.constexpr, TMA_STORE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dw[g]'s (pid_m, pid_n) tile = acc: through TMA (dw_desc, (E, D, F)), whole or in two column
    halves (TMA_STORE 1, 2), or plainly."""
    if TMA:
        out = tl.reshape(acc.to(DW.dtype.element_ty), (1, BLOCK_M, BLOCK_N))
        if TMA_STORE == 2:
            left, right = tl.split(tl.permute(tl.reshape(out, (1, BLOCK_M, 2, BLOCK_N // 2)), (0, 1, 3, 2)))
            dw_desc.store([g, pid_m * BLOCK_M, pid_n * BLOCK_N], left)
            dw_desc.store([g, pid_m * BLOCK_M, pid_n * BLOCK_N + BLOCK_N // 2], right)
        else:
            dw_desc.store([g, pid_m * BLOCK_M, pid_n * BLOCK_N], out)
    else:
        offs_d = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_f = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        dw_ptrs = DW + g.to(tl.int64) * stride_we + offs_d[:, None] * stride_wd + offs_f[None, :] * stride_wf
        tl.store(dw_ptrs, acc.to(DW.dtype.element_ty), mask=(offs_d < D)[:, None] & (offs_f < F)[None, :])


@triton.jit
def _grouped_dw_kernel(
    X, DY, DW, SIZES,
    T, D, F, E, t_bucket,
    stride_xt, stride_xd, stride_yt, stride_yf, stride_we, stride_wd, stride_wf,
    DOT_PRECISION: tl.constexpr, BLOCKED_SUM: tl.constexpr, BLOCK_E: tl.constexpr, TMA_OK: tl.constexpr,
    TMA_LOAD_OK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PROGRAMS_PER_SM: tl.constexpr, TMA_STORE: tl.constexpr, CHUNK: tl.constexpr,
):
    # BLOCK_M tiles D, BLOCK_N tiles F, BLOCK_K steps over a group's rows
    offs_e = tl.arange(0, BLOCK_E)
    sizes = tl.load(SIZES + offs_e, mask=offs_e < E, other=0).to(tl.int32)
    num_n = tl.cdiv(F, BLOCK_N)
    per_expert = tl.cdiv(D, BLOCK_M) * num_n
    # With TMA_STORE (where the host found dw laid out for it, TMA_OK) a tile goes out through the
    # tensor memory accelerator from shared memory, asynchronously, while the program goes on:
    # whole (1), or as two column halves (2), which halves the staging tile's shared memory. dw is
    # an (E, D, F) descriptor, so an expert's last D tile is clipped at D, not written into the next
    TMA_STORES: tl.constexpr = TMA_STORE > 0 and TMA_OK
    if TMA_STORES:
        dw_desc = tl.make_tensor_descriptor(DW, shape=[E, D, F], strides=[stride_we, stride_wd, 1],
                                            block_shape=[1, BLOCK_M, BLOCK_N // TMA_STORE])
    else:
        dw_desc = DW  # not read
    if PROGRAMS_PER_SM == 0 and CHUNK == 0:
        # one program per (D tile, F tile, expert), the expert slowest so that neighbours share
        # its rows in L2
        pid = tl.program_id(0)
        g = tl.program_id(1)
        acc = _dw_tile(X, DY, sizes, offs_e, g, pid // num_n, pid % num_n, T, D, F, stride_xt, stride_xd, stride_yt,
                       stride_yf, DOT_PRECISION, BLOCKED_SUM, BLOCK_M, BLOCK_N, BLOCK_K)
        _store_dw_tile(DW, dw_desc, acc, g, pid // num_n, pid % num_n, D, F, stride_we, stride_wd, stride_wf,
                       TMA_STORES, TMA_STORE, BLOCK_M, BLOCK_N)
    elif PROGRAMS_PER_SM == 0:
        # one program per (chunk of CHUNK consecutive tiles, expert). Where x and dy allow
        # (TMA_LOAD_OK), their rows come in through TMA from descriptors of the expert's rows
        # alone, so a row step past the group's end reads zeros: no masks, no address registers.
        # Every tile of the chunk takes the same row steps, so the compiler flattens the tile and
        # row loops into one software pipeline: a tile's first rows load while the one before it
        # finishes and is stored, and a pipeline fills once a chunk rather than once a tile (at 64
        # experts of 256 rows, a tile is only four 64-row steps)
        g = tl.program_id(1)
        first = tl.program_id(0) * CHUNK
        last = tl.minimum(first + CHUNK, per_expert)
        row_start = tl.sum(tl.where(offs_e < g, sizes, 0), 0)
        rows = tl.sum(tl.where(offs_e == g, sizes, 0), 0)
        if TMA_LOAD_OK:
            if rows > 0:  # (a descriptor needs at least one row)
                x_desc = tl.make_tensor_descriptor(X + row_start.to(tl.int64) * stride_xt, shape=[rows, D],
                                                   strides=[stride_xt, 1], block_shape=[BLOCK_K, BLOCK_M])
                dy_desc = tl.make_tensor_descriptor(DY + row_start.to(tl.int64) * stride_yt, shape=[rows, F],
                                                    strides=[stride_yt, 1], block_shape=[BLOCK_K, BLOCK_N])
                zero = tl.where(T < 0, 1.0, 0.0)
                for tile in tl.range(first, last, flatten=True):
                    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                    for r in range(0, rows, BLOCK_K):
                        xt = tl.trans(x_desc.load([r, tile // num_n * BLOCK_M]))
                        dy = dy_desc.load([r, tile % num_n * BLOCK_N])
                        acc = dot_acc(xt, dy, acc, zero, DOT_PRECISION, BLOCKED_SUM)
                    _store_dw_tile(DW, dw_desc, acc, g, tile // num_n, tile % num_n, D, F, stride_we, stride_wd,
                                   stride_wf, TMA_STORES, TMA_STORE, BLOCK_M, BLOCK_N)
            else:
                for tile in range(first, last):
                    _store_dw_tile(DW, dw_desc, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), g, tile // num_n,
                                   tile % num_n, D, F, stride_we, stride_wd, stride_wf, TMA_STORES, TMA_STORE,
                                   BLOCK_M, BLOCK_N)
        else:
            for tile in range(first, last):
                acc = _dw_tile(X, DY, sizes, offs_e, g, tile // num_n, tile % num_n, T, D, F, stride_xt, stride_xd,
                               stride_yt, stride_yf, DOT_PRECISION, BLOCKED_SUM, BLOCK_M, BLOCK_N, BLOCK_K)
                _store_dw_tile(DW, dw_desc, acc, g, tile // num_n, tile % num_n, D, F, stride_we, stride_wd,
                               stride_wf, TMA_STORES, TMA_STORE, BLOCK_M, BLOCK_N)
    else:
        # persistent: a few programs per multiprocessor, each taking every num_programs-th tile in
        # (expert, D tile, F tile) order
        for tile in tl.range(tl.program_id(0), E * per_expert, tl.num_programs(0)):
            g = tile // per_expert
            pid = tile % per_expert
            acc = _dw_tile(X, DY, sizes, offs_e, g, pid // num_n, pid % num_n, T, D, F, stride_xt, stride_xd,
                           stride_yt, stride_yf, DOT_PRECISION, BLOCKED_SUM, BLOCK_M, BLOCK_N, BLOCK_K)
            _store_dw_tile(DW, dw_desc, acc, g, pid // num_n, pid % num_n, D, F, stride_we, stride_wd, stride_wf,
                           TMA_STORES, TMA_STORE, BLOCK_M, BLOCK_N)


# --------------------------------------------------------------------------------------------
# Configurations: autotuned on a GPU, one small fixed one under the interpreter
# --------------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages[, programs per SM[, TMA[, chunk]]]). For
# "mm" BLOCK_M counts rows of a group and BLOCK_N output columns; for "dw" they tile D and F and
# BLOCK_K steps over the group's rows. The optional entries default to 0. Programs per SM make
# a kernel persistent: that many programs per multiprocessor (their registers capped so that
# they fit side by side, `maxnreg`). TMA: mm's load their tiles through pointers (0) or TMA (1);
# dw's store theirs plainly (0) or through TMA, whole (1) or as two column halves (2), in any
# kind of program. A chunk (dw, with no programs per SM) makes a program per that many tiles of
# an expert, loading through TMA.
# 16-bit tables differ between Hopper (wgmma, accumulators spread over a warpgroup) and Ampere
# (mma.sync, which spills with 128x128 tiles on 4 warps); fp32 runs exact fp32 products on the
# CUDA cores, which want small tiles. Every entry compiles without register spills with Triton
# 3.6 for contiguous operands with D, F multiples of 16 (see the compile test); the first is the
# default when tuning is off.
_CONFIGS_16BIT = {
    90: {
        "mm": [(128, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 256, 64, 8, 3), (128, 256, 64, 8, 4),
               (256, 128, 64, 8, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (64, 64, 64, 4, 3),
               # persistent programs, whose tile loop and K loop the compiler flattens into one
               # pipeline, so that a tile's first loads are in flight while the one before it is
               # stored (dx at 8 experts ran at 75% of the dense dx on an H100: each program one
               # 22-step K loop of 128 x 128, filled and drained, and a 32 KB store after it).
               # Loading through pointers, a flattened 128 x 128 program takes ~190 registers a
               # thread (two tiles' addresses), so one per SM; through TMA ~120, and with a
               # two-stage pipeline two fit an SM
               (128, 128, 64, 8, 4, 1), (128, 256, 64, 8, 3, 1),
               (128, 128, 64, 8, 3, 1, 1), (128, 128, 64, 8, 4, 1, 1), (128, 256, 64, 8, 3, 1, 1),
               (128, 128, 64, 8, 2, 2, 1)],
        "dw": [(128, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 256, 64, 8, 3), (128, 256, 64, 8, 4),
               (256, 128, 64, 8, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4),
               # for many short groups (64 experts of 256 rows: four 64-row steps per tile), where
               # the pipeline's fill and the tile's store are not hidden: fewer, longer row steps,
               # or shorter ones in a deeper pipeline (programs covering 4 experts each, one
               # pipeline over their row steps, were tried and never chosen on an H100) ...
               (128, 128, 128, 8, 2), (128, 128, 32, 4, 4),
               # ... or persistent programs, whose tile stores (E·D·F gradients: 369 MB at 64
               # experts of 2048 x 1408) leave through TMA while the next tile is computed: one
               # program per SM (128 KB, 208 KB of shared memory), or two (96 KB, or 112 KB with
               # the store in halves, and at most 128 registers a thread each); and one storing as
               # the others do, to compare. (Running all of a program's row steps as one loop, which
               # the compiler pipelines across tiles, written out by hand since the steps a tile
               # takes vary, was 1.5-2x slower on an H100 at 64 experts.)
               (128, 128, 64, 8, 3, 1, 1), (128, 256, 64, 8, 3, 1, 1), (128, 128, 64, 8, 2, 2, 1),
               (128, 128, 32, 8, 4, 2, 1), (128, 128, 64, 8, 3, 2, 2), (128, 128, 64, 8, 3, 1, 0),
               # ... or a program per chunk of 4 or 8 tiles of an expert, loading through TMA (no
               # address registers: ~90 a thread) in one pipeline over the chunk's tiles, so that
               # the pipeline fills once a chunk; two fit an SM where shared memory allows
               (128, 128, 64, 8, 2, 0, 1, 4), (128, 128, 32, 8, 4, 0, 1, 4), (128, 128, 64, 8, 3, 0, 2, 4),
               (128, 128, 32, 8, 4, 0, 1, 8), (128, 256, 64, 8, 3, 0, 1, 4)],
    },
    80: {
        "mm": [(128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 64, 64, 4, 3)],
        "dw": [(128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4)],
    },
}
_CONFIGS_FP32 = {
    "mm": [(64, 64, 32, 4, 3), (32, 64, 32, 4, 2), (128, 64, 16, 8, 2)],
    "dw": [(64, 64, 32, 4, 3), (32, 64, 32, 4, 2), (64, 32, 32, 4, 2)],
}
# Under the interpreter: one small config (fast on a CPU, several tiles per test group; warps and
# stages mean nothing there), rectangular so that a transposed index mix-up shows; the other
# kinds of program are tested by swapping in (32, 64, 32, 4, 2, programs per SM, TMA[, chunk]),
# persistent ones with INTERPRET_SMS multiprocessors.
_INTERPRET_CONFIGS = {"mm": (32, 64, 32, 4, 2), "dw": (32, 64, 32, 4, 2)}
INTERPRET_SMS = 2
_TUNE_KEYS = {"mm": ["K", "N", "E", "t_bucket", "TMA_OK", "B_TRANSPOSED"],
              "dw": ["D", "F", "E", "t_bucket", "TMA_OK", "TMA_LOAD_OK"]}
_KERNELS = {"mm": _grouped_mm_kernel, "dw": _grouped_dw_kernel}


def configs_for(kernel: str, elem: int, arch: int = 90, smem_limit: int | None = None) -> list[tuple[int, ...]]:
    """Candidate (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages[, programs per SM, TMA[, chunk]])
    for one kernel, operand width in bytes and architecture (90: Hopper and newer, 80: older),
    less those needing more shared memory than `smem_limit` (but never none)."""
    table = _CONFIGS_FP32[kernel] if elem == 4 else _CONFIGS_16BIT[90 if arch >= 90 else 80][kernel]
    if smem_limit is None:
        return list(table)
    return ([c for c in table if smem(kernel, c, elem) <= smem_limit]
            or [min(table, key=lambda c: smem(kernel, c, elem))])


def smem(kernel: str, config: tuple, elem: int) -> int:
    """A config's shared memory in bytes: its a and b tiles, num_stages deep, and the tile its
    result is staged in before it is stored: dw's TMA store's (whole or half), and a persistent
    mm's (whose flattened loop keeps the pipeline's buffers busy while a tile is stored). That
    is what the compiler allocates for these kernels on Hopper (see the compile test)."""
    programs, tma = persistence(config)
    if kernel == "dw":
        staged = config[0] * config[1] // tma if tma else 0
    else:
        staged = config[0] * config[1] if programs else 0
    return ((config[0] + config[1]) * config[2] * config[4] + staged) * elem


def persistence(config: tuple) -> tuple[int, int]:
    """A config's (programs per SM, TMA: loads for mm, the store for dw), (0, 0) when it has
    neither entry."""
    return (tuple(config[5:7]) + (0, 0))[:2]


def chunk(config: tuple) -> int:
    """A dw config's tiles a chunk (its eighth entry; 0 when absent): a program per chunk of that
    many of an expert's tiles, loading through TMA where x and dy allow, in one pipeline."""
    return config[7] if len(config) > 7 else 0


def _meta(kernel: str, config: tuple) -> dict:
    """A config tuple's constexprs, the persistent ones too (0 when absent)."""
    meta = {"BLOCK_M": config[0], "BLOCK_N": config[1], "BLOCK_K": config[2]}
    programs, tma = persistence(config)
    meta["PROGRAMS_PER_SM"] = programs
    meta["TMA_STORE" if kernel == "dw" else "TMA_LOAD"] = tma
    if kernel == "dw":
        meta["CHUNK"] = chunk(config)
    return meta


def maxnreg(config: tuple) -> int | None:
    """The register cap that lets a persistent config's programs per SM run side by side (the
    65,536 registers of an SM shared among them), or None (the compiler's choice)."""
    programs = persistence(config)[0]
    if programs < 2:
        return None
    return min(255, 65536 // (programs * config[3] * 32) // 8 * 8)


@functools.lru_cache(maxsize=None)
def _arch_and_smem(device: int) -> tuple[int, int]:
    """The table architecture (90, 80, ...) and the shared memory a program may have, of a GPU."""
    major, minor = torch.cuda.get_device_capability(device)
    arch = 80 if torch.version.hip is not None else 10 * major + minor
    return arch, triton.runtime.driver.active.utils.get_device_properties(device)["max_shared_mem"]


@functools.lru_cache(maxsize=None)
def _autotuned(kernel: str, elem: int, device: int, tune: bool, config: tuple | None = None):
    """The autotuned launcher (a TunedLauncher; its `tuner` is Triton's autotuner) of one kernel
    for one operand width on one device, built on first use (never at import); with `config`, a
    launcher of that configuration alone. Tuning reruns the kernel; it only writes its output, so
    that is safe."""
    table = configs_for(kernel, elem, *_arch_and_smem(device))
    if config is not None:
        table = [config]
    elif not tune:
        table = table[:1]
    configs = [triton.Config(_meta(kernel, c), num_warps=c[3], num_stages=c[4], maxnreg=maxnreg(c)) for c in table]
    return tuned_launcher(_KERNELS[kernel], configs, _TUNE_KEYS[kernel])


def interpreting() -> bool:
    """True when the kernels run in Triton's interpreter (TRITON_INTERPRET=1 when this module was
    imported); only then can they take CPU tensors."""
    return not isinstance(_grouped_mm_kernel, triton.runtime.JITFunction)


def _use_interpreter_blocks() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1" or interpreting()


def _tuning() -> bool:
    return os.environ.get("GENERALIST_TRITON_AUTOTUNE", "1") != "0"


def _launch(kernel: str, grid_of, device: torch.device, elem: int, *args, config: tuple | None = None,
            **constexprs):
    """Launch with the interpreter's fixed blocks, or through the autotuner on a GPU; `config`
    (a table entry) launches that configuration instead, on a GPU or in the interpreter."""
    if _use_interpreter_blocks():
        meta = _meta(kernel, config or _INTERPRET_CONFIGS[kernel])
        _KERNELS[kernel][grid_of(meta)](*args, **constexprs, **meta)
        return
    launcher = (_autotuned(kernel, elem, device.index, _tuning()) if config is None  # one cache entry a kernel
                else _autotuned(kernel, elem, device.index, _tuning(), config))
    # TMA loads and stores build their descriptors in global memory, which Triton asks an allocator
    # for at launch: a torch one for this launch, unless the caller has set an allocator of their own
    token = (_allocation._allocator.set(_torch_scratch)
             if _allocation._allocator.get() is _allocation._NULL_ALLOCATOR else None)
    try:
        launcher[grid_of](*args, **constexprs)
    finally:
        if token is not None:
            _allocation._allocator.reset(token)


def _torch_scratch(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def tma_storable(dw_EDF: torch.Tensor) -> bool:
    """Whether dw's TMA store can write this (E, D, F) tensor: unit column stride, the other two
    positive multiples of 16 bytes (expanded, stride-0 experts or rows are not), 16-byte aligned."""
    elem = dw_EDF.element_size()
    s_e, s_d, s_f = dw_EDF.stride()
    return s_f == 1 and all(s > 0 and s * elem % 16 == 0 for s in (s_e, s_d)) and dw_EDF.data_ptr() % 16 == 0


def tma_rows_loadable(x_TD: torch.Tensor, dy_TF: torch.Tensor) -> bool:
    """Whether dw's TMA loads can read x (T, D) and dy (T, F) a group of rows at a time: unit
    column strides, row strides positive multiples of 16 bytes (so that every group's first row
    is 16-byte aligned too), 16-byte aligned."""
    return all(a.stride(1) == 1 and a.stride(0) > 0 and a.stride(0) * a.element_size() % 16 == 0
               and a.data_ptr() % 16 == 0 for a in (x_TD, dy_TF))


def _b_transposed(b_EKN: torch.Tensor) -> bool:
    """Whether b[g] is a transposed view, unit stride along K (dx's w^T), rather than along N."""
    return b_EKN.stride(1) == 1 and b_EKN.stride(2) != 1


def tma_loadable(a_TK: torch.Tensor, b_EKN: torch.Tensor) -> bool:
    """Whether the persistent mm's TMA loads can read a (T, K) and b (E, K, N): a with unit column
    stride; b[g] with unit stride along N, or along K where it is a transposed view; every other
    stride a positive multiple of 16 bytes (an expanded, stride-0 b is not), and both 16-byte
    aligned."""
    elem = a_TK.element_size()
    s_e, s_k, s_n = b_EKN.stride()
    unit, rows = (s_k, s_n) if _b_transposed(b_EKN) else (s_n, s_k)
    return (a_TK.stride(1) == 1 and unit == 1 and all(s > 0 and s * elem % 16 == 0 for s in (a_TK.stride(0), s_e, rows))
            and a_TK.data_ptr() % 16 == 0 and b_EKN.data_ptr() % 16 == 0)


@functools.lru_cache(maxsize=None)
def _has_tma(device: int) -> bool:
    """Hopper and newer (the interpreter emulates TMA)."""
    return _use_interpreter_blocks() or (torch.version.hip is None and torch.cuda.get_device_capability(device)[0] >= 9)


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: int) -> int:
    if _use_interpreter_blocks():
        return INTERPRET_SMS
    return triton.runtime.driver.active.utils.get_device_properties(device)["multiprocessor_count"]


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _t_bucket(t: int) -> int:
    """Autotuning key for a row count: powers of two from 256 to 65536."""
    return min(max(next_power_of_2(max(t, 1)), 256), 65536)


def _block_e(e: int) -> int:
    return max(2, next_power_of_2(e))


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # only fp32 operands read it


def _on_device(x: torch.Tensor):
    """Triton launches on the current CUDA device: make it x's."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _check(name: str, a: torch.Tensor, ndim: int, dtype: torch.dtype, device: torch.device) -> None:
    if a.dim() != ndim:
        raise ValueError(f"triton grouped_mm: {name} must have {ndim} dims, got {tuple(a.shape)}")
    if a.dtype != dtype:
        raise ValueError(f"triton grouped_mm: {name} has dtype {a.dtype}, expected {dtype}")
    if a.device != device:
        raise ValueError(f"triton grouped_mm: {name} is on {a.device}, expected {device}")


def _check_sizes(group_sizes_E: torch.Tensor, e: int, device: torch.device) -> torch.Tensor:
    if group_sizes_E.dtype not in GROUP_SIZE_DTYPES or group_sizes_E.shape != (e,):
        raise ValueError(f"triton grouped_mm: group_sizes_E must be int32/int64 of shape ({e},), got "
                         f"{group_sizes_E.dtype} {tuple(group_sizes_E.shape)}")
    if group_sizes_E.device != device:
        raise ValueError(f"triton grouped_mm: group_sizes_E is on {group_sizes_E.device}, expected {device}")
    return group_sizes_E.contiguous()


def _mm(a_TK: torch.Tensor, b_EKN: torch.Tensor, sizes_E: torch.Tensor, config: tuple | None = None) -> torch.Tensor:
    """c (T, N) = a[rows of e] @ b[e] per group; b may be any strided view. `config`, an entry of
    mm's table, runs that configuration instead of the tuner's choice."""
    t, k = a_TK.shape
    e, _, n = b_EKN.shape
    c_TN = torch.empty((t, n), dtype=a_TK.dtype, device=a_TK.device)
    if t == 0 or n == 0:
        return c_TN
    if k == 0 or e == 0:
        return c_TN.zero_()
    sms = _multiprocessors(a_TK.device.index if a_TK.is_cuda else -1)

    def grid(meta):
        tiles = (cdiv(t, meta["BLOCK_M"]) + e) * cdiv(n, meta["BLOCK_N"])  # an upper bound
        return (min(tiles, sms * meta["PROGRAMS_PER_SM"]) if meta["PROGRAMS_PER_SM"] else tiles,)

    tma_ok = _has_tma(a_TK.device.index if a_TK.is_cuda else -1) and tma_loadable(a_TK, b_EKN)
    with _on_device(a_TK):
        _launch(
            "mm", grid,
            a_TK.device, a_TK.element_size(),
            a_TK, b_EKN, c_TN, sizes_E, t, k, n, e, _t_bucket(t),
            a_TK.stride(0), a_TK.stride(1), b_EKN.stride(0), b_EKN.stride(1), b_EKN.stride(2),
            c_TN.stride(0), c_TN.stride(1),
            DOT_PRECISION=_dot_precision(a_TK.dtype), BLOCKED_SUM=a_TK.dtype == torch.float32,
            BLOCK_E=_block_e(e), GROUP_M=8, TMA_OK=tma_ok, B_TRANSPOSED=_b_transposed(b_EKN), config=config,
        )
    return c_TN


def grouped_mm(x_TD: torch.Tensor, w_EDF: torch.Tensor, group_sizes_E: torch.Tensor) -> torch.Tensor:
    """y (T, F) with y[rows of e] = x[rows of e] @ w[e]; x (T, D), w (E, D, F) in one of DTYPES,
    group_sizes (E,) summing to T (not checked here)."""
    if x_TD.dtype not in DTYPES:
        raise ValueError(f"triton grouped_mm: dtype {x_TD.dtype} not supported; use one of {DTYPES}")
    _check("x_TD", x_TD, 2, x_TD.dtype, x_TD.device)
    _check("w_EDF", w_EDF, 3, x_TD.dtype, x_TD.device)
    if w_EDF.shape[1] != x_TD.shape[1]:
        raise ValueError(f"triton grouped_mm: w_EDF {tuple(w_EDF.shape)} does not fit x_TD {tuple(x_TD.shape)}")
    return _mm(x_TD, w_EDF, _check_sizes(group_sizes_E, w_EDF.shape[0], x_TD.device))


def grouped_mm_backward(dy_TF: torch.Tensor, x_TD: torch.Tensor, w_EDF: torch.Tensor,
                        group_sizes_E: torch.Tensor, *, plan: Plan | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx (T, D), dw (E, D, F)): dx[rows of e] = dy[rows of e] @ w[e]^T, dw[e] = x[rows of e]^T @
    dy[rows of e] (zeros for an empty group), in the inputs' dtype. `plan`, one of
    `backward_plans`, runs the two kernels that way instead of the one timed fastest."""
    if x_TD.dtype not in DTYPES:
        raise ValueError(f"triton grouped_mm: dtype {x_TD.dtype} not supported; use one of {DTYPES}")
    _check("x_TD", x_TD, 2, x_TD.dtype, x_TD.device)
    _check("w_EDF", w_EDF, 3, x_TD.dtype, x_TD.device)
    _check("dy_TF", dy_TF, 2, x_TD.dtype, x_TD.device)
    t, d = x_TD.shape
    e, _, f = w_EDF.shape
    if w_EDF.shape[1] != d or dy_TF.shape != (t, f):
        raise ValueError(f"triton grouped_mm backward: x_TD {tuple(x_TD.shape)}, w_EDF {tuple(w_EDF.shape)} and "
                         f"dy_TF {tuple(dy_TF.shape)} do not fit")
    sizes_E = _check_sizes(group_sizes_E, e, x_TD.device)
    if plan is None:
        plan = _plan(dy_TF, x_TD, w_EDF, sizes_E)
    return _backward(dy_TF, x_TD, w_EDF, sizes_E, plan)


def _dw(x_TD: torch.Tensor, dy_TF: torch.Tensor, sizes_E: torch.Tensor, e: int,
        out: torch.Tensor | None = None, config: tuple | None = None) -> torch.Tensor:
    """dw (E, D, F), contiguous: dw[g] = x[rows of g]^T @ dy[rows of g], zeros for an empty group.
    `out`, an (E, D, F) view of any strides, receives it instead (the MoE benchmark passes one
    whose experts all alias one block, to time the kernel without its gradient's memory traffic).
    `config`, an entry of dw's table, runs that configuration instead of the tuner's choice."""
    t, d = x_TD.shape
    f = dy_TF.shape[1]
    if out is not None:
        _check("out", out, 3, x_TD.dtype, x_TD.device)
        if out.shape != (e, d, f):
            raise ValueError(f"triton grouped_mm dw: out has shape {tuple(out.shape)}, expected {(e, d, f)}")
    dw_EDF = torch.empty((e, d, f), dtype=x_TD.dtype, device=x_TD.device) if out is None else out
    if e == 0 or d == 0 or f == 0:
        return dw_EDF
    if t == 0:
        return dw_EDF.zero_()
    sms = _multiprocessors(x_TD.device.index if x_TD.is_cuda else -1)

    def grid(meta):
        tiles = cdiv(d, meta["BLOCK_M"]) * cdiv(f, meta["BLOCK_N"])
        if meta["PROGRAMS_PER_SM"]:
            return (min(tiles * e, sms * meta["PROGRAMS_PER_SM"]),)
        return (cdiv(tiles, meta["CHUNK"]) if meta["CHUNK"] else tiles, e)

    has_tma = _has_tma(x_TD.device.index if x_TD.is_cuda else -1)
    with _on_device(x_TD):
        _launch(
            "dw", grid, x_TD.device, x_TD.element_size(),
            x_TD, dy_TF, dw_EDF, sizes_E, t, d, f, e, _t_bucket(t),
            x_TD.stride(0), x_TD.stride(1), dy_TF.stride(0), dy_TF.stride(1),
            dw_EDF.stride(0), dw_EDF.stride(1), dw_EDF.stride(2),
            DOT_PRECISION=_dot_precision(x_TD.dtype), BLOCKED_SUM=x_TD.dtype == torch.float32,
            BLOCK_E=_block_e(e), TMA_OK=has_tma and tma_storable(dw_EDF),
            TMA_LOAD_OK=has_tma and tma_rows_loadable(x_TD, dy_TF), config=config,
        )
    return dw_EDF


# --------------------------------------------------------------------------------------------
# The backward: dx and dw one after the other, or side by side
# --------------------------------------------------------------------------------------------
# dx reads the E·D·F weights and dw writes as many bytes of gradient. At 64 experts of 256 rows
# those bytes take about as long as the FLOPs, and apart neither kernel hides them (an H100 ran
# dx at 63% and dw at 48% of the dense matmul at E64, D 2048, F 1408). Side by side, dw goes first
# on a side stream of higher priority and dx right after on the caller's stream, so that an SM can
# hold a program of each and compute one kernel's tile while the other's bytes move: a persistent
# dw with one program per SM (128 KB of shared memory with its TMA staging tile, 126 registers)
# leaves room for a 96 KB dx program beside it (102 registers, compiled for sm_90). Whether that
# wins depends on the card and the shapes, so it is timed: the first backward of a key (device,
# dtype, rows bucket, D, F, E) on a GPU times each of `backward_plans` and keeps the fastest, in
# the process and in Triton's cache directory next to the tuner's choices (so a resumed run, and
# every run after, picks the same plan and computes the same bits). A plan that fails to run
# (a configuration this card cannot compile) is passed over. While a CUDA graph is being captured
# nothing is timed: an untimed key runs one after the other there. With tuning off
# (GENERALIST_TRITON_AUTOTUNE=0) every backward runs one after the other.


class Plan(NamedTuple):
    """How the backward runs its two kernels: side by side (on two streams) or one after the other,
    and the configuration of each (None: its tuner's choice)."""

    side_by_side: bool
    dw: tuple | None = None
    dx: tuple | None = None


SEQUENTIAL = Plan(False)
_PLANS: dict[tuple, Plan] = {}
_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}


def backward_plans(elem: int, arch: int = 90, smem_limit: int | None = None) -> list[Plan]:
    """The plans a backward is timed under, for an operand width, architecture and shared memory a
    program may have (as configs_for): one after the other, and side by side with both kernels as
    tuned, and with dw under each of its persistent configurations of one program per SM, both
    with dx as tuned and under the first dx configuration of a program per tile whose shared memory
    fits beside it."""
    plans = [SEQUENTIAL, Plan(True)]
    limit = smem_limit if smem_limit is not None else 232448 if arch >= 90 else 166912
    for c in configs_for("dw", elem, arch, smem_limit):
        if persistence(c)[0] == 1:
            plans.append(Plan(True, c))
            # an SM's shared memory is a program's limit and 1 KB, less 1 KB for each program on it
            beside = [m for m in configs_for("mm", elem, arch, smem_limit)
                      if not persistence(m)[0] and smem("dw", c, elem) + smem("mm", m, elem) + 1024 <= limit]
            if beside:
                plans.append(Plan(True, c, beside[0]))
    return plans


def _side_stream(device: int) -> torch.cuda.Stream:
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device, priority=-1)  # the higher priority
    return _SIDE_STREAMS[device]


def _backward(dy_TF, x_TD, w_EDF, sizes_E, plan: Plan) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dw) under `plan` (side by side only for CUDA tensors): the caller's stream, on return,
    has waited for both kernels."""
    e = w_EDF.shape[0]
    if not (plan.side_by_side and x_TD.is_cuda):
        return (_mm(dy_TF, w_EDF.transpose(1, 2), sizes_E, config=plan.dx),
                _dw(x_TD, dy_TF, sizes_E, e, config=plan.dw))
    # dw's memory is the caller stream's, which waits for the side stream before anything else,
    # so neither it nor the inputs read there can be reused while dw runs
    dw_EDF = torch.empty(w_EDF.shape, dtype=x_TD.dtype, device=x_TD.device)
    caller = torch.cuda.current_stream(x_TD.device)
    side = _side_stream(x_TD.device.index)
    side.wait_stream(caller)
    with torch.cuda.stream(side):
        _dw(x_TD, dy_TF, sizes_E, e, out=dw_EDF, config=plan.dw)
    try:
        dx_TD = _mm(dy_TF, w_EDF.transpose(1, 2), sizes_E, config=plan.dx)
    finally:  # should dx fail to launch, dw's memory is still not freed under it
        caller.wait_stream(side)
    return dx_TD, dw_EDF


def _plan(dy_TF, x_TD, w_EDF, sizes_E) -> Plan:
    """The plan for this backward: timed on a GPU at a key's first call (see above)."""
    if not x_TD.is_cuda or _use_interpreter_blocks() or not _tuning():
        return SEQUENTIAL
    t, d = x_TD.shape
    e, _, f = w_EDF.shape
    device = x_TD.device.index
    key = (device, x_TD.dtype, _t_bucket(t), d, f, e)
    if key in _PLANS:
        return _PLANS[key]
    plans = backward_plans(x_TD.element_size(), *_arch_and_smem(device))
    # on disk, the card's name and multiprocessor count stand for the device index (two cards of
    # one name can differ in SMs and clocks: an H100 PCIe and SXM)
    card = (torch.cuda.get_device_name(device), _multiprocessors(device))
    with torch.cuda.device(device):  # the timing's events and L2 flush are the current device's
        return _planned(key, plans, lambda plan: _backward(dy_TF, x_TD, w_EDF, sizes_E, plan),
                        torch.cuda.is_current_stream_capturing(), PlanFile(_plan_digest(key[1:] + card, plans)))


def _planned(key: tuple, plans: list[Plan], run, capturing: bool, disk: PlanFile | None = None) -> Plan:
    """The plan kept for `key`: from this process, else from `disk`, else (not `capturing`) each
    of `plans` timed by running `run(plan)` (one that raises is passed over, unless it is the
    first) and the fastest kept, here and on `disk`. While capturing, an untimed key gets
    SEQUENTIAL, kept by nobody."""
    if key not in _PLANS:
        kept = disk.load(plans) if disk is not None else None
        if kept is None:
            if capturing:
                return SEQUENTIAL
            times = []
            for i, plan in enumerate(plans):
                try:
                    times.append(_seconds(lambda plan=plan: run(plan)))
                except Exception:
                    if i == 0:
                        raise
                    times.append(float("inf"))
            kept = plans[times.index(min(times))]
            if disk is not None:
                disk.save(kept, dict(zip(plans, times)))
        _PLANS[key] = kept
    return _PLANS[key]


def _plan_digest(key: tuple, plans: list[Plan]) -> str:
    """What a kept plan depends on, hashed as Triton hashes a tuning: Triton and its target, both
    kernels' sources, the key (less the device index, with the card's name and multiprocessor
    count) and the plans timed."""
    from triton.compiler.compiler import make_backend
    from triton.runtime.cache import triton_key

    target = make_backend(triton.runtime.driver.active.get_current_target()).hash()
    # a compiled kernel's cache_key hashes its source and the functions it calls; the interpreter's
    # kernels have only their source
    sources = [k.cache_key if isinstance(k, triton.runtime.JITFunction) else inspect.getsource(k.fn)
               for k in (_grouped_mm_kernel, _grouped_dw_kernel)]
    parts = [triton_key(), target, *sources, str(key)]
    return hashlib.sha256("-".join(parts + [str(p) for p in plans]).encode()).hexdigest()


class PlanFile:
    """A kept backward plan in Triton's cache directory (TRITON_CACHE_DIR, else ~/.triton/cache),
    under a digest of what it depends on, with the time of each plan. Delete it (or the cache) to
    time again."""

    NAME = "grouped_mm_backward.plan.json"

    def __init__(self, digest: str):
        from triton.runtime.cache import get_cache_manager

        self.cache = get_cache_manager(digest)

    def load(self, plans: list[Plan]) -> Plan | None:
        """The kept plan if there is one, it reads, and it is one of `plans`; else None."""
        path = self.cache.get_file(self.NAME)
        if path is None:
            return None
        try:
            with open(path) as f:
                side_by_side, dw, dx = json.load(f)["plan"]
            plan = Plan(bool(side_by_side), dw and tuple(dw), dx and tuple(dx))
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return plan if plan in plans else None

    def save(self, plan: Plan, seconds: dict[Plan, float]) -> None:
        timed = [[list(p), s if s != float("inf") else None] for p, s in seconds.items()]
        self.cache.put(json.dumps({"plan": list(plan), "seconds": timed}), self.NAME, binary=False)


def _seconds(fn) -> float:
    """fn's median time on the GPU, L2 flushed before each run (as the autotuner times)."""
    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median") / 1e3
