// Flash attention (FlashAttention-2 structure) for sm_80+ on tensor cores: mma.sync m16n8k16
// (fp16 / bf16 in, fp32 accumulate) fed by ldmatrix from shared memory, tiles streamed in with
// cp.async, two stages. Device code only (no torch headers); the parameters and the semantics
// are in attention.h, the host side in attention.cpp. Instantiated per element type in
// attention_{fwd,bwd}_{fp16,bf16}.cu for head dims 64 and 128.
//
// Every CTA has 4 warps; each warp owns whole rows of the CTA's tile (query rows in the forward
// and dQ kernels, key rows in the dK/dV kernel), so softmax rows never cross warps.
//   forward       grid (batch * cdiv(max_seqlen_q, 128), H): a 128-query tile, 32 rows per warp
//                 (two 16-row mma tiles sharing every K/V fragment), online softmax over the key
//                 tiles it can see (64 keys at D = 64, 32 at D = 128; fully masked tiles are not
//                 visited).
//   bwd delta     one warp per (token, head): delta = rowsum(dO * O) - dlse.
//   bwd dK/dV     grid (batch * cdiv(max_seqlen_k, 64), Hkv): a 64-key tile, looping over the
//                 query heads of its GQA group and the query tiles that see it. No atomics.
//   bwd dQ        grid (batch * cdiv(max_seqlen_q, 64), H): a 64-query tile, looping over its
//                 key tiles as the forward does.
// Scores are kept in base 2 (scaled by softmax_scale * log2(e)) so that ex2 can be used; lse is
// stored in natural log.
//
// Fragment layouts of mma.m16n8k16 (lane = 4 * g + t): A (16x16, row-major) a0 = (g, 2t..2t+1),
// a1 = (g+8, 2t..), a2 = (g, 2t+8..), a3 = (g+8, 2t+8..); B (16x8, k x n) b0 = (k 2t..2t+1, n g),
// b1 = (k 2t+8.., n g); C (16x8) c0,c1 = (g, 2t..2t+1), c2,c3 = (g+8, 2t..2t+1). Lower halves of a
// packed register hold the lower column index.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "attention.h"

namespace generalist::cuda_attention {

constexpr int kThreads = 128;  // 4 warps
constexpr int kBlockM = 64;    // query rows per CTA (dQ; the forward's are kFwdBlockM)
constexpr int kBlockN = 64;    // keys per tile
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Queries per step of the dK/dV kernel: 32 at D = 128 keeps dK, dV (fp32) and two score tiles
// in registers.
template <int D>
constexpr int kBwdBlockM = D <= 64 ? 64 : 32;

// Shared-memory row pitch in elements: 16 bytes of padding, so the 8 rows an ldmatrix reads fall
// in different banks and every row starts 16-byte aligned.
template <int D>
constexpr int kPitchOf = D + 8;

template <Dtype DT> struct Element;
template <> struct Element<Dtype::kFloat16> { using type = __half; };
template <> struct Element<Dtype::kBFloat16> { using type = __nv_bfloat16; };

// ---------------------------------------------------------------------------------------------
// PTX wrappers. "memory" clobbers keep them ordered with the barriers and plain shared loads.
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared; when !valid nothing is read and the 16 bytes are zero-filled (src
// must still be a valid address).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async_4(void* dst, const void* src, bool valid) {
  const int src_bytes = valid ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p))
               : "memory");
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p))
               : "memory");
}

// c += a * b (16x16 by 16x8, fp32 accumulators)
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats -> one register of two 16-bit values, lo in the lower half.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);

template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// 2^x with ex2.approx: 2^-inf = +0, which is how masked scores vanish.
__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// ---------------------------------------------------------------------------------------------
// Tiles and masks
// ---------------------------------------------------------------------------------------------

// The visible-key rule of one sequence (attention.h).
struct SeqMask {
  int lq, lk, prefix;
  bool causal;

  // Number of keys query i (0-based in its sequence) sees: always the leading run [0, n).
  __device__ __forceinline__ int visible(int i) const {
    if (!causal) return lk;
    const int n = max(prefix, i + lk - lq + 1);
    return min(max(n, 0), lk);
  }
};

// rows x D elements from global (row r at src + r * row_stride, 16-byte chunks) into shared
// memory with pitch kPitchOf<D>; rows >= valid_rows are zero-filled. Needs valid_rows >= 1
// (row 0 stands in as the address of the rows it does not read).
template <int ROWS, int D, typename T>
__device__ __forceinline__ void load_tile(T* dst, const T* src, int64_t row_stride, int valid_rows, int tid) {
  constexpr int kChunksPerRow = D / 8;
  constexpr int kChunks = ROWS * kChunksPerRow;
  static_assert(kChunks % kThreads == 0, "tile chunks must divide among the threads");
#pragma unroll
  for (int i = 0; i < kChunks / kThreads; ++i) {
    const int c = tid + i * kThreads;
    const int r = c / kChunksPerRow;
    const int col = (c % kChunksPerRow) * 8;
    const bool valid = r < valid_rows;
    cp_async_16(dst + r * kPitchOf<D> + col, valid ? src + r * row_stride + col : src, valid);
  }
}

// The A fragment (16 rows x 16 columns) at (row0, col0) of a row-major shared tile.
template <int D, typename T>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const T* tile, int row0, int col0, int lane) {
  ldmatrix_x4(a, tile + (row0 + (lane & 15)) * kPitchOf<D> + col0 + (lane >> 4) * 8);
}

// B fragments for B = X^T where X is a row-major shared tile (rows = n, columns = k): r[0], r[1]
// are b0, b1 of the n-block [n0, n0 + 8), r[2], r[3] of [n0 + 8, n0 + 16); k runs over [k0, k0 + 16).
template <int D, typename T>
__device__ __forceinline__ void load_b_rows(uint32_t (&r)[4], const T* tile, int n0, int k0, int lane) {
  ldmatrix_x4(r, tile + (n0 + (lane & 7) + ((lane >> 4) << 3)) * kPitchOf<D> + k0 + ((lane >> 3) & 1) * 8);
}

// B fragments for B = X where X is a row-major shared tile (rows = k, columns = n), transposed by
// ldmatrix: r[0], r[1] for the n-block [n0, n0 + 8), r[2], r[3] for [n0 + 8, n0 + 16); k over [k0, k0 + 16).
template <int D, typename T>
__device__ __forceinline__ void load_b_cols(uint32_t (&r)[4], const T* tile, int k0, int n0, int lane) {
  ldmatrix_x4_trans(r, tile + (k0 + (lane & 15)) * kPitchOf<D> + n0 + (lane >> 4) * 8);
}

// The A fragment of k-block kb from accumulators c (rows g / g+8, n-tiles 2kb and 2kb+1).
template <typename T, int NT>
__device__ __forceinline__ void acc_to_a(uint32_t (&a)[4], const float (&c)[NT][4], int kb) {
  a[0] = pack2<T>(c[2 * kb][0], c[2 * kb][1]);
  a[1] = pack2<T>(c[2 * kb][2], c[2 * kb][3]);
  a[2] = pack2<T>(c[2 * kb + 1][0], c[2 * kb + 1][1]);
  a[3] = pack2<T>(c[2 * kb + 1][2], c[2 * kb + 1][3]);
}

// c (16 x 8*NT) += rows [row0, row0 + 16) of A-tile (ROW-major, D columns) times rows of the
// B-tile transposed (n = B-tile rows [0, 8*NT), k = D columns): a 16 x D by D x 8*NT product.
template <typename T, int D, int NT>
__device__ __forceinline__ void gemm_abt(float (&c)[NT][4], const T* a_tile, int row0, const T* b_tile, int lane) {
  static_assert(NT % 2 == 0, "n-tiles come in pairs");
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t a[4];
    load_a<D>(a, a_tile, row0, kk * 16, lane);
#pragma unroll
    for (int nn = 0; nn < NT / 2; ++nn) {
      uint32_t b[4];
      load_b_rows<D>(b, b_tile, nn * 16, kk * 16, lane);
      mma_16816<T>(c[2 * nn], a, b[0], b[1]);
      mma_16816<T>(c[2 * nn + 1], a, b[2], b[3]);
    }
  }
}

// acc (16 x D) += p (16 x 8*NT, accumulator layout, rounded to T) times the B-tile (rows = k in
// [0, 8*NT), columns = D).
template <typename T, int D, int NT>
__device__ __forceinline__ void gemm_pb(float (&acc)[D / 8][4], const float (&p)[NT][4], const T* b_tile, int lane) {
#pragma unroll
  for (int kb = 0; kb < NT / 2; ++kb) {
    uint32_t a[4];
    acc_to_a<T>(a, p, kb);
#pragma unroll
    for (int dn = 0; dn < D / 16; ++dn) {
      uint32_t b[4];
      load_b_cols<D>(b, b_tile, kb * 16, dn * 16, lane);
      mma_16816<T>(acc[2 * dn], a, b[0], b[1]);
      mma_16816<T>(acc[2 * dn + 1], a, b[2], b[3]);
    }
  }
}

template <int NT>
__device__ __forceinline__ void zero(float (&c)[NT][4]) {
#pragma unroll
  for (int i = 0; i < NT; ++i) {
#pragma unroll
    for (int e = 0; e < 4; ++e) c[i][e] = 0.0f;
  }
}

// Rows (row, 2t..2t+1 of each n-tile) of an accumulator, times `scale`, to global memory.
template <typename T, int D>
__device__ __forceinline__ void store_row(T* dst, const float (&c)[D / 8][4], int half, float scale, int t) {
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt) {
    *reinterpret_cast<uint32_t*>(dst + dt * 8 + 2 * t) =
        pack2<T>(c[dt][2 * half] * scale, c[dt][2 * half + 1] * scale);
  }
}

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------

// c[mt][n], c[mt][n + 1] += a[mt] times the two 16x8 B fragments in b (n-blocks n and n + 1), for
// every row tile mt: one B fragment feeds MT mmas.
template <typename T, int MT, int NT>
__device__ __forceinline__ void mma_rows(float (&c)[MT][NT][4], const uint32_t (&a)[MT][4], const uint32_t (&b)[4],
                                         int n) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    mma_16816<T>(c[mt][n], a[mt], b[0], b[1]);
    mma_16816<T>(c[mt][n + 1], a[mt], b[2], b[3]);
  }
}

// s[mt] (16 x 8*NT) += rows [row0 + 16 mt, row0 + 16 mt + 16) of the A-tile times the B-tile
// transposed, for MT row tiles at once: each B fragment loaded from shared memory feeds MT mmas.
template <typename T, int D, int NT, int MT>
__device__ __forceinline__ void gemm_abt_rows(float (&c)[MT][NT][4], const T* a_tile, int row0, const T* b_tile,
                                              int lane) {
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t a[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) load_a<D>(a[mt], a_tile, row0 + 16 * mt, kk * 16, lane);
#pragma unroll
    for (int nn = 0; nn < NT / 2; ++nn) {
      uint32_t b[4];
      load_b_rows<D>(b, b_tile, nn * 16, kk * 16, lane);
      mma_rows<T>(c, a, b, 2 * nn);
    }
  }
}

// acc[mt] (16 x D) += p[mt] (16 x 8*NT, accumulator layout, rounded to T) times the B-tile, for
// MT row tiles at once (each V fragment feeds MT mmas).
template <typename T, int D, int NT, int MT>
__device__ __forceinline__ void gemm_pb_rows(float (&acc)[MT][D / 8][4], const float (&p)[MT][NT][4],
                                             const T* b_tile, int lane) {
#pragma unroll
  for (int kb = 0; kb < NT / 2; ++kb) {
    uint32_t a[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) acc_to_a<T>(a[mt], p[mt], kb);
#pragma unroll
    for (int dn = 0; dn < D / 16; ++dn) {
      uint32_t b[4];
      load_b_cols<D>(b, b_tile, kb * 16, dn * 16, lane);
      mma_rows<T>(acc, a, b, 2 * dn);
    }
  }
}

// Query rows per forward CTA: 4 warps of MT row tiles of 16.
template <int MT>
constexpr int kFwdBlockM = 4 * 16 * MT;
// Keys per tile of the 128-query forward: 32 at D = 128 keeps its two 16 x D accumulators, the
// scores and the fragments in registers (64 spills there).
template <int D>
constexpr int kFwdBlockN = D <= 64 ? 64 : 32;

// The forward for a tile of 64 * MT queries: warp w owns rows [16 MT w, 16 MT (w + 1)) of the tile,
// MT row tiles of 16. MT = 2 (FlashAttention-2's layout) is what is launched: every K and V
// fragment read from shared memory feeds two mmas, half the ldmatrix traffic per mma of MT = 1
// (16 rows per warp), which ran at 0.81-0.96x the speed of MT = 2 on an H200 (BENCHMARKS.md).
template <typename T, int D, int MT, int BN>
__global__ void __launch_bounds__(kThreads) attention_fwd_kernel(const AttentionParams p) {
  constexpr int kPitch = kPitchOf<D>;
  constexpr int kBM = kFwdBlockM<MT>;
  constexpr int kNT = BN / 8;  // score n-tiles per warp
  extern __shared__ __align__(16) unsigned char smem[];
  T* s_q = reinterpret_cast<T*>(smem);     // [kBM][kPitch]
  T* s_k = s_q + kBM * kPitch;             // [2][BN][kPitch]
  T* s_v = s_k + 2 * BN * kPitch;          // [2][BN][kPitch]

  // CTA -> (sequence, query tile, head); the last (longest causal) tiles start first
  const int num_m = (p.max_seqlen_q + kBM - 1) / kBM;
  const int b = blockIdx.x / num_m;
  const int m0 = (num_m - 1 - static_cast<int>(blockIdx.x % num_m)) * kBM;
  const int h = blockIdx.y;
  const int q_start = p.cu_seqlens_q[b];
  const int lq = p.cu_seqlens_q[b + 1] - q_start;
  if (m0 >= lq) return;
  const int k_start = p.cu_seqlens_k[b];
  const int lk = p.cu_seqlens_k[b + 1] - k_start;
  const SeqMask mask{lq, lk, (p.causal && p.prefix_lens != nullptr) ? p.prefix_lens[b] : 0, p.causal};
  const int kvh = h / (p.heads / p.kv_heads);
  const float scale_log2 = p.softmax_scale * kLog2e;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int wrow0 = warp * 16 * MT;  // this warp's first row in the tile
  // rows m0 + wrow0 + 16 mt + g + 8 half (in the sequence) are this thread's; vis: keys each sees
  int vis[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    vis[mt][0] = mask.visible(m0 + wrow0 + 16 * mt + g);
    vis[mt][1] = mask.visible(m0 + wrow0 + 16 * mt + g + 8);
  }

  // key tiles [0, full_tiles) are seen entirely by every row of the tile; [full_tiles, n_tiles)
  // need the mask; later ones are seen by none
  const int n_tiles = (mask.visible(min(m0 + kBM, lq) - 1) + BN - 1) / BN;
  const int full_tiles = mask.visible(m0) / BN;

  const T* q_tile = static_cast<const T*>(p.q) + (q_start + static_cast<int64_t>(m0)) * p.q_row_stride +
                    h * p.q_head_stride;
  const T* k_seq = static_cast<const T*>(p.k) + k_start * p.k_row_stride + kvh * p.k_head_stride;
  const T* v_seq = static_cast<const T*>(p.v) + k_start * p.v_row_stride + kvh * p.v_head_stride;

  float acc[MT][D / 8][4];
  float m_run[MT][2], l_run[MT][2];  // running max of base-2 scores; this thread's part of the row sum
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    zero(acc[mt]);
    m_run[mt][0] = m_run[mt][1] = -INFINITY;
    l_run[mt][0] = l_run[mt][1] = 0.0f;
  }

  if (n_tiles > 0) {
    load_tile<kBM, D>(s_q, q_tile, p.q_row_stride, lq - m0, tid);
    load_tile<BN, D>(s_k, k_seq, p.k_row_stride, lk, tid);
    load_tile<BN, D>(s_v, v_seq, p.v_row_stride, lk, tid);
    cp_async_commit();
  }
  for (int j = 0; j < n_tiles; ++j) {
    const int stage = j & 1;
    // prefetch the next K/V tile into the other stage, then wait for this one
    if (j + 1 < n_tiles) {
      const int n1 = (j + 1) * BN;
      const int nxt = (stage ^ 1) * BN * kPitch;
      load_tile<BN, D>(s_k + nxt, k_seq + n1 * p.k_row_stride, p.k_row_stride, lk - n1, tid);
      load_tile<BN, D>(s_v + nxt, v_seq + n1 * p.v_row_stride, p.v_row_stride, lk - n1, tid);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const T* k_tile = s_k + stage * BN * kPitch;
    const T* v_tile = s_v + stage * BN * kPitch;

    // scores S = Q K^T in base 2; keys past a row's visible run -> -inf
    float s[MT][kNT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) zero(s[mt]);
    gemm_abt_rows<T, D>(s, s_q, wrow0, k_tile, lane);
    const int n0 = j * BN;
    const bool masked = j >= full_tiles;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float x = s[mt][nt][e] * scale_log2;
          s[mt][nt][e] = (masked && n0 + nt * 8 + 2 * t + (e & 1) >= vis[mt][e >> 1]) ? -INFINITY : x;
        }
      }
    }

    // online softmax per row; a row with nothing visible yet keeps m = -inf and shifts by 0
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        float mx = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) mx = fmaxf(mx, fmaxf(s[mt][nt][2 * half], s[mt][nt][2 * half + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(m_run[mt][half], mx);
        const float shift = m_new == -INFINITY ? 0.0f : m_new;
        const float alpha = exp2_approx(m_run[mt][half] - shift);
        m_run[mt][half] = m_new;
        float sum = 0.0f;
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
          for (int e = 2 * half; e < 2 * half + 2; ++e) {
            s[mt][nt][e] = exp2_approx(s[mt][nt][e] - shift);
            sum += s[mt][nt][e];
          }
        }
        l_run[mt][half] = l_run[mt][half] * alpha + sum;
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt) {
          acc[mt][dt][2 * half] *= alpha;
          acc[mt][dt][2 * half + 1] *= alpha;
        }
      }
    }

    // acc += P V
    gemm_pb_rows<T, D>(acc, s, v_tile, lane);
    __syncthreads();  // every warp is done with this stage before it is refilled
  }

  // normalize; rows that saw nothing give zeros and lse = -inf
  T* out_seq = static_cast<T*>(p.out) + q_start * p.o_row_stride + h * p.o_head_stride;
  float* lse_seq = p.lse + h * p.total_q + q_start;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float l = l_run[mt][half];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      const int row = m0 + wrow0 + 16 * mt + g + 8 * half;
      if (row < lq) {
        // l == 0 only when the row sees no key; a NaN sum (a NaN score, which fmaxf may have
        // left out of the max but ex2 carries) makes the row NaN, as in the reference
        const bool seen = l != 0.0f;
        store_row<T, D>(out_seq + row * p.o_row_stride, acc[mt], half, seen ? 1.0f / l : 0.0f, t);
        if (t == 0) lse_seq[row] = seen ? (m_run[mt][half] + log2f(l)) * kLn2 : -INFINITY;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

// delta = rowsum(dO * O) - dlse; one warp per (token, head), 8 warps per block.
template <typename T>
__global__ void __launch_bounds__(256) attention_bwd_delta_kernel(const AttentionParams p) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * 8 + threadIdx.x / 32;  // = token * H + head
  if (row >= p.total_q * p.heads) return;
  const int lane = threadIdx.x % 32;
  const int64_t tok = row / p.heads;
  const int h = static_cast<int>(row % p.heads);
  const T* o = static_cast<const T*>(p.out) + tok * p.o_row_stride + h * p.o_head_stride;
  const T* d_o = static_cast<const T*>(p.dout) + tok * p.do_row_stride + h * p.do_head_stride;
  float sum = 0.0f;
  for (int c = lane; c < p.head_dim; c += 32) sum += to_float(o[c]) * to_float(d_o[c]);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  if (lane == 0) {
    const int64_t at = h * p.total_q + tok;
    p.delta[at] = sum - (p.dlse != nullptr ? p.dlse[at] : 0.0f);
  }
}

// dK, dV for a 64-key tile of one key/value head: loops over every query head of its group and
// every query tile that sees the key tile, two stages of Q / dO / lse / delta in flight. Each
// warp owns 16 keys and computes transposed tiles (keys x queries): S^T = K Q^T,
// P^T = exp2(S^T - lse), dV += P^T dO, dP^T = V dO^T, dS^T = P^T (dP^T - delta), dK += dS^T Q.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attention_bwd_dkdv_kernel(const AttentionParams p) {
  constexpr int kPitch = kPitchOf<D>;
  constexpr int kBM = kBwdBlockM<D>;
  constexpr int kNT = kBM / 8;  // score n-tiles (queries) per warp
  extern __shared__ __align__(16) unsigned char smem[];
  T* s_k = reinterpret_cast<T*>(smem);                    // [kBlockN][kPitch]
  T* s_v = s_k + kBlockN * kPitch;                        // [kBlockN][kPitch]
  T* s_q = s_v + kBlockN * kPitch;                        // [2][kBM][kPitch]
  T* s_do = s_q + 2 * kBM * kPitch;                       // [2][kBM][kPitch]
  float* s_lse = reinterpret_cast<float*>(s_do + 2 * kBM * kPitch);  // [2][kBM]
  float* s_delta = s_lse + 2 * kBM;                                  // [2][kBM]

  // CTA -> (sequence, key tile, key/value head)
  const int num_n = (p.max_seqlen_k + kBlockN - 1) / kBlockN;
  const int b = blockIdx.x / num_n;
  const int n0 = static_cast<int>(blockIdx.x % num_n) * kBlockN;
  const int kvh = blockIdx.y;
  const int k_start = p.cu_seqlens_k[b];
  const int lk = p.cu_seqlens_k[b + 1] - k_start;
  if (n0 >= lk) return;
  const int q_start = p.cu_seqlens_q[b];
  const int lq = p.cu_seqlens_q[b + 1] - q_start;
  const SeqMask mask{lq, lk, (p.causal && p.prefix_lens != nullptr) ? p.prefix_lens[b] : 0, p.causal};
  const int group = p.heads / p.kv_heads;
  const float scale_log2 = p.softmax_scale * kLog2e;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int key0 = n0 + warp * 16 + g;  // the two keys (in the sequence) this thread's rows hold

  // queries before i_min see only keys before n0 (visible(i) > n0 iff i >= i_min)
  const int i_min = (!mask.causal || mask.prefix > n0) ? 0 : max(0, n0 - lk + lq);
  const int m_first = i_min / kBM;  // first query tile
  const int n_m = i_min < lq ? (lq + kBM - 1) / kBM - m_first : 0;  // query tiles per head
  const int n_iter = group * n_m;

  const T* k_tile = static_cast<const T*>(p.k) + (k_start + static_cast<int64_t>(n0)) * p.k_row_stride +
                    kvh * p.k_head_stride;
  const T* v_tile = static_cast<const T*>(p.v) + (k_start + static_cast<int64_t>(n0)) * p.v_row_stride +
                    kvh * p.v_head_stride;

  // iteration `it` -> query head kvh * group + it / n_m, query tile m_first + it % n_m
  auto load_queries = [&](int it, int stage) {
    const int hq = kvh * group + it / n_m;
    const int m0 = (m_first + it % n_m) * kBM;
    const int64_t row = q_start + static_cast<int64_t>(m0);
    load_tile<kBM, D>(s_q + stage * kBM * kPitch, static_cast<const T*>(p.q) + row * p.q_row_stride +
                      hq * p.q_head_stride, p.q_row_stride, lq - m0, tid);
    load_tile<kBM, D>(s_do + stage * kBM * kPitch, static_cast<const T*>(p.dout) + row * p.do_row_stride +
                      hq * p.do_head_stride, p.do_row_stride, lq - m0, tid);
    if (tid < kBM) {
      const bool valid = m0 + tid < lq;
      const int64_t at = hq * p.total_q + row + (valid ? tid : 0);
      cp_async_4(s_lse + stage * kBM + tid, p.lse + at, valid);
      cp_async_4(s_delta + stage * kBM + tid, p.delta + at, valid);
    }
  };

  float dk[D / 8][4], dv[D / 8][4];
  zero(dk);
  zero(dv);

  if (n_iter > 0) {
    load_tile<kBlockN, D>(s_k, k_tile, p.k_row_stride, lk - n0, tid);
    load_tile<kBlockN, D>(s_v, v_tile, p.v_row_stride, lk - n0, tid);
    load_queries(0, 0);
    cp_async_commit();
  }
  for (int it = 0; it < n_iter; ++it) {
    const int stage = it & 1;
    if (it + 1 < n_iter) load_queries(it + 1, stage ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const T* q_tile = s_q + stage * kBM * kPitch;
    const T* do_tile = s_do + stage * kBM * kPitch;
    const float* lse_tile = s_lse + stage * kBM;
    const float* delta_tile = s_delta + stage * kBM;
    const int m0 = (m_first + it % n_m) * kBM;
    // rows past lq, or keys past a query's visible run, need the mask
    const bool masked = !(m0 + kBM <= lq && mask.visible(m0) >= n0 + kBlockN);

    // P^T = exp2(S^T - lse), zero where masked (lse = -inf: the query sees nothing, P = 0)
    float s[kNT][4];
    zero(s);
    gemm_abt<T, D>(s, s_k, warp * 16, q_tile, lane);
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int qi = nt * 8 + 2 * t + (e & 1);  // query in the tile
        const float lse = lse_tile[qi];
        const float lse2 = lse == -INFINITY ? INFINITY : lse * kLog2e;
        const float prob = exp2_approx(s[nt][e] * scale_log2 - lse2);
        const bool hidden = masked && (m0 + qi >= lq || key0 + 8 * (e >> 1) >= mask.visible(m0 + qi));
        s[nt][e] = hidden ? 0.0f : prob;
      }
    }

    // dV += P^T dO
    gemm_pb<T, D>(dv, s, do_tile, lane);

    // dP^T = V dO^T; dS^T = P^T (dP^T - delta)
    float dp[kNT][4];
    zero(dp);
    gemm_abt<T, D>(dp, s_v, warp * 16, do_tile, lane);
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] *= dp[nt][e] - delta_tile[nt * 8 + 2 * t + (e & 1)];
    }

    // dK += dS^T Q
    gemm_pb<T, D>(dk, s, q_tile, lane);
    __syncthreads();  // every warp is done with this stage before it is refilled
  }

  // write dK (scaled) and dV for the keys of the sequence
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int key = key0 + 8 * half;
    if (key < lk) {
      const int64_t off = (k_start + static_cast<int64_t>(key)) * p.dk_row_stride + kvh * p.dk_head_stride;
      store_row<T, D>(static_cast<T*>(p.dk) + off, dk, half, p.softmax_scale, t);
      store_row<T, D>(static_cast<T*>(p.dv) + off, dv, half, 1.0f, t);
    }
  }
}

// dQ for a 64-query tile of one head: loops over its key tiles as the forward does, two stages of
// K / V in flight. S = Q K^T, P = exp2(S - lse), dP = dO V^T, dS = P (dP - delta), dQ += dS K.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attention_bwd_dq_kernel(const AttentionParams p) {
  constexpr int kPitch = kPitchOf<D>;
  constexpr int kNT = kBlockN / 8;
  extern __shared__ __align__(16) unsigned char smem[];
  T* s_q = reinterpret_cast<T*>(smem);   // [kBlockM][kPitch]
  T* s_do = s_q + kBlockM * kPitch;      // [kBlockM][kPitch]
  T* s_k = s_do + kBlockM * kPitch;      // [2][kBlockN][kPitch]
  T* s_v = s_k + 2 * kBlockN * kPitch;   // [2][kBlockN][kPitch]

  const int num_m = (p.max_seqlen_q + kBlockM - 1) / kBlockM;
  const int b = blockIdx.x / num_m;
  const int m0 = (num_m - 1 - static_cast<int>(blockIdx.x % num_m)) * kBlockM;
  const int h = blockIdx.y;
  const int q_start = p.cu_seqlens_q[b];
  const int lq = p.cu_seqlens_q[b + 1] - q_start;
  if (m0 >= lq) return;
  const int k_start = p.cu_seqlens_k[b];
  const int lk = p.cu_seqlens_k[b + 1] - k_start;
  const SeqMask mask{lq, lk, (p.causal && p.prefix_lens != nullptr) ? p.prefix_lens[b] : 0, p.causal};
  const int kvh = h / (p.heads / p.kv_heads);
  const float scale_log2 = p.softmax_scale * kLog2e;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int row0 = m0 + warp * 16 + g;
  const int vis[2] = {mask.visible(row0), mask.visible(row0 + 8)};
  // per row: lse in base 2 (+inf where the row is padding or sees nothing: P = 0) and delta
  float lse2[2], delta[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = row0 + 8 * half;
    const int64_t at = h * p.total_q + q_start + row;
    const float lse = row < lq ? p.lse[at] : -INFINITY;
    lse2[half] = lse == -INFINITY ? INFINITY : lse * kLog2e;
    delta[half] = row < lq ? p.delta[at] : 0.0f;
  }

  const int n_tiles = (mask.visible(min(m0 + kBlockM, lq) - 1) + kBlockN - 1) / kBlockN;
  const int full_tiles = mask.visible(m0) / kBlockN;

  const int64_t q_row = q_start + static_cast<int64_t>(m0);
  const T* q_tile = static_cast<const T*>(p.q) + q_row * p.q_row_stride + h * p.q_head_stride;
  const T* do_tile = static_cast<const T*>(p.dout) + q_row * p.do_row_stride + h * p.do_head_stride;
  const T* k_seq = static_cast<const T*>(p.k) + k_start * p.k_row_stride + kvh * p.k_head_stride;
  const T* v_seq = static_cast<const T*>(p.v) + k_start * p.v_row_stride + kvh * p.v_head_stride;

  float dq[D / 8][4];
  zero(dq);

  if (n_tiles > 0) {
    load_tile<kBlockM, D>(s_q, q_tile, p.q_row_stride, lq - m0, tid);
    load_tile<kBlockM, D>(s_do, do_tile, p.do_row_stride, lq - m0, tid);
    load_tile<kBlockN, D>(s_k, k_seq, p.k_row_stride, lk, tid);
    load_tile<kBlockN, D>(s_v, v_seq, p.v_row_stride, lk, tid);
    cp_async_commit();
  }
  for (int j = 0; j < n_tiles; ++j) {
    const int stage = j & 1;
    if (j + 1 < n_tiles) {
      const int n1 = (j + 1) * kBlockN;
      const int nxt = (stage ^ 1) * kBlockN * kPitch;
      load_tile<kBlockN, D>(s_k + nxt, k_seq + n1 * p.k_row_stride, p.k_row_stride, lk - n1, tid);
      load_tile<kBlockN, D>(s_v + nxt, v_seq + n1 * p.v_row_stride, p.v_row_stride, lk - n1, tid);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const T* k_tile = s_k + stage * kBlockN * kPitch;
    const T* v_tile = s_v + stage * kBlockN * kPitch;

    // P = exp2(S - lse), zero past each row's visible keys
    float s[kNT][4];
    zero(s);
    gemm_abt<T, D>(s, s_q, warp * 16, k_tile, lane);
    const int n0 = j * kBlockN;
    const bool masked = j >= full_tiles;
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float prob = exp2_approx(s[nt][e] * scale_log2 - lse2[e >> 1]);
        s[nt][e] = (masked && n0 + nt * 8 + 2 * t + (e & 1) >= vis[e >> 1]) ? 0.0f : prob;
      }
    }

    // dP = dO V^T; dS = P (dP - delta)
    float dp[kNT][4];
    zero(dp);
    gemm_abt<T, D>(dp, s_do, warp * 16, v_tile, lane);
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] *= dp[nt][e] - delta[e >> 1];
    }

    // dQ += dS K
    gemm_pb<T, D>(dq, s, k_tile, lane);
    __syncthreads();
  }

  T* dq_seq = static_cast<T*>(p.dq) + q_start * p.dq_row_stride + h * p.dq_head_stride;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = row0 + 8 * half;
    if (row < lq) store_row<T, D>(dq_seq + row * p.dq_row_stride, dq, half, p.softmax_scale, t);
  }
}

// ---------------------------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------------------------

template <typename Kernel>
cudaError_t launch(Kernel kernel, dim3 grid, int threads, size_t smem, cudaStream_t stream, const AttentionParams& p) {
  if (grid.x == 0 || grid.y == 0) return cudaSuccess;
  if (smem > 48 * 1024) {
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  kernel<<<grid, threads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int D, int MT, int BN>
cudaError_t launch_fwd_tiles(const AttentionParams& p, cudaStream_t stream) {
  constexpr int kBM = kFwdBlockM<MT>;
  const size_t smem = sizeof(T) * (kBM + 4 * BN) * kPitchOf<D>;
  const unsigned num_m = (p.max_seqlen_q + kBM - 1) / kBM;
  return launch(attention_fwd_kernel<T, D, MT, BN>, dim3(num_m * p.batch, p.heads), kThreads, smem, stream, p);
}

template <Dtype DT, int D>
cudaError_t launch_attention_fwd(const AttentionParams& p, cudaStream_t stream) {
  return launch_fwd_tiles<typename Element<DT>::type, D, 2, kFwdBlockN<D>>(p, stream);
}

template <Dtype DT, int D>
cudaError_t launch_attention_bwd(const AttentionParams& p, cudaStream_t stream) {
  using T = typename Element<DT>::type;
  const int64_t rows = p.total_q * p.heads;
  cudaError_t err = launch(attention_bwd_delta_kernel<T>, dim3(static_cast<unsigned>((rows + 7) / 8)), 256, 0,
                           stream, p);
  if (err != cudaSuccess) return err;

  constexpr int kBM = kBwdBlockM<D>;
  const size_t smem_dkdv = sizeof(T) * (2 * kBlockN + 4 * kBM) * kPitchOf<D> + sizeof(float) * 4 * kBM;
  const unsigned num_n = (p.max_seqlen_k + kBlockN - 1) / kBlockN;
  err = launch(attention_bwd_dkdv_kernel<T, D>, dim3(num_n * p.batch, p.kv_heads), kThreads, smem_dkdv, stream, p);
  if (err != cudaSuccess) return err;

  const size_t smem_dq = sizeof(T) * (2 * kBlockM + 4 * kBlockN) * kPitchOf<D>;
  const unsigned num_m = (p.max_seqlen_q + kBlockM - 1) / kBlockM;
  return launch(attention_bwd_dq_kernel<T, D>, dim3(num_m * p.batch, p.heads), kThreads, smem_dq, stream, p);
}

}  // namespace generalist::cuda_attention

// One file per element type and direction instantiates both head dims.
#define GENERALIST_INSTANTIATE_ATTENTION(direction, dtype)                                                    \
  namespace generalist::cuda_attention {                                                                      \
  template cudaError_t launch_attention_##direction<dtype, 64>(const AttentionParams&, cudaStream_t);         \
  template cudaError_t launch_attention_##direction<dtype, 128>(const AttentionParams&, cudaStream_t);        \
  }
