// CUDA attention backend: the parameters that host code (attention.cpp) hands to the device code
// (attention_kernel.cuh, instantiated per element type in attention_{fwd,bwd}_{fp16,bf16}.cu).
// No torch headers here: nvcc compiles the device code alone (`make check-cuda`).
//
// Layout (varlen): q, out, dout, dq (Tq, H, D); k, v, dk, dv (Tk, Hkv, D); lse, dlse, delta (H, Tq)
// fp32, contiguous. Strides are in elements; the last dim of every tensor is contiguous, row and
// head strides are multiples of 8 and base pointers 16-byte aligned (host code ensures it), so
// that rows move in 16-byte chunks. Query head h reads key/value head h / (H / Hkv). Outputs
// (out, dq, dk, dv) are written with the row / head strides of their inputs' layout given here.
//
// In a sequence with lq queries and lk keys, query i sees the first n_i keys:
//   n_i = lk                                              (not causal)
//   n_i = clamp(max(prefix, i + lk - lq + 1), 0, lk)      (causal, bottom-right aligned)
// A query with n_i == 0 gives zeros and lse = -inf.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace generalist::cuda_attention {

enum class Dtype { kFloat16, kBFloat16 };

struct AttentionParams {
  // Forward reads q, k, v and writes out, lse. Backward reads q, k, v, out, lse, dout, dlse
  // (may be null: no lse gradient) and writes delta (scratch), dq, dk, dv.
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;  // const in the backward
  float* lse = nullptr;  // const in the backward
  const void* dout = nullptr;
  const float* dlse = nullptr;
  float* delta = nullptr;
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;

  int64_t q_row_stride = 0, q_head_stride = 0;
  int64_t k_row_stride = 0, k_head_stride = 0;
  int64_t v_row_stride = 0, v_head_stride = 0;
  int64_t o_row_stride = 0, o_head_stride = 0;    // out (written forward, read backward)
  int64_t do_row_stride = 0, do_head_stride = 0;  // dout
  int64_t dq_row_stride = 0, dq_head_stride = 0;
  int64_t dk_row_stride = 0, dk_head_stride = 0;  // dk and dv share their layout
  // lse, dlse and delta are (H, Tq) contiguous: element (h, t) at h * total_q + t.

  const int32_t* cu_seqlens_q = nullptr;  // (batch + 1,)
  const int32_t* cu_seqlens_k = nullptr;
  const int32_t* prefix_lens = nullptr;  // (batch,) or null; read only when causal

  int64_t total_q = 0, total_k = 0;
  int batch = 0, heads = 0, kv_heads = 0, head_dim = 0;
  int max_seqlen_q = 0, max_seqlen_k = 0;  // grid sizes: at least the longest sequence
  float softmax_scale = 1.0f;
  bool causal = false;
};

// Launchers per (element type, head dim), explicitly instantiated for D in {64, 128} in
// attention_{fwd,bwd}_{fp16,bf16}.cu. They return the first CUDA error (launch or attribute).
template <Dtype DT, int D>
cudaError_t launch_attention_fwd(const AttentionParams& p, cudaStream_t stream);
template <Dtype DT, int D>
cudaError_t launch_attention_bwd(const AttentionParams& p, cudaStream_t stream);

}  // namespace generalist::cuda_attention
