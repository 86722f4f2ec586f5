// CPU attention backend: the parameters that host code (attention.cpp) hands to the kernels
// (attention_kernel.h, compiled once per instruction set by attention_kernel_*.cpp).
//
// Layout (varlen): q (Tq, H, D), k/v (Tk, Hkv, D), out (Tq, H, D) in the input dtype; lse (H, Tq)
// fp32. Query head h reads key/value head h / (H / Hkv). Every tensor here is contiguous.
#pragma once

#include <cstdint>
#include <vector>

namespace generalist::cpu_attention {

// Head dims are padded to a multiple of this in the kernels' fp32 tiles (the widest vector).
constexpr int64_t kHeadDimAlign = 8;
constexpr int64_t kMaxHeadDim = 256;

struct Sequence {
  int64_t q_start, k_start;  // first token in the packed q / k streams
  int64_t len_q, len_k;
  int64_t prefix;  // keys [0, prefix) are visible to every query (causal only); >= 0
};

struct AttentionParams {
  std::vector<Sequence> seqs;
  int64_t total_q = 0, total_k = 0, heads = 0, kv_heads = 0, head_dim = 0;
  float softmax_scale = 1.0f;
  bool causal = false;

  // Forward: reads q, k, v; writes out and lse.
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;
  float* lse = nullptr;

  // Backward: reads q, k, v, the forward's out and lse, dout and dlse (may be null); writes dq,
  // dk and dv.
  const void* dout = nullptr;
  const float* dlse = nullptr;
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;

  // Number of keys query i (0-based within sequence s) may see; always a leading run of keys.
  int64_t visible_keys(const Sequence& s, int64_t i) const {
    if (!causal) return s.len_k;
    int64_t n = i + s.len_k - s.len_q + 1;
    n = n > s.prefix ? n : s.prefix;
    return n < 0 ? 0 : (n > s.len_k ? s.len_k : n);
  }
};

// One set of entry points per instruction set; attention.cpp picks one at run time.
#define GENERALIST_DECLARE_ATTENTION_KERNELS(isa)                             \
  namespace isa {                                                             \
  template <typename scalar_t> void attention_fwd(const AttentionParams& p);  \
  template <typename scalar_t> void attention_bwd(const AttentionParams& p);  \
  }

GENERALIST_DECLARE_ATTENTION_KERNELS(baseline)
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define GENERALIST_ATTENTION_AVX2 1
GENERALIST_DECLARE_ATTENTION_KERNELS(avx2)
#endif

}  // namespace generalist::cpu_attention
