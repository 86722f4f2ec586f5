// CPU attention backend, host side: checks -> params -> the kernel for the input dtype and the
// widest instruction set this CPU has (attention_kernel_*.cpp). Schemas of
// generalist::_attention_fwd_cpu / _attention_bwd_cpu are in csrc/registration.cpp; the Python
// glue that puts them in the attention registry is generalist/ops/attention_cpu.py.
#include "cpu/attention.h"

#include <ATen/Config.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <string>
#include <tuple>

#if AT_PARALLEL_OPENMP && !defined(_OPENMP)
#warning "generalist._C is compiled without OpenMP: at::parallel_for runs the CPU attention kernels on one thread"
#endif

namespace generalist::cpu_attention {
namespace {

bool use_avx2() {
#if GENERALIST_ATTENTION_AVX2
  // at::get_cpu_capability() honours ATEN_CPU_CAPABILITY=default, which forces the baseline kernels.
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          at::get_cpu_capability() != "DEFAULT";
  return yes;
#else
  return false;
#endif
}

template <typename scalar_t>
void run_fwd(const AttentionParams& p) {
#if GENERALIST_ATTENTION_AVX2
  if (use_avx2()) return avx2::attention_fwd<scalar_t>(p);
#endif
  baseline::attention_fwd<scalar_t>(p);
}

template <typename scalar_t>
void run_bwd(const AttentionParams& p) {
#if GENERALIST_ATTENTION_AVX2
  if (use_avx2()) return avx2::attention_bwd<scalar_t>(p);
#endif
  baseline::attention_bwd<scalar_t>(p);
}

template <typename Fn>
void dispatch_dtype(at::ScalarType dtype, const Fn& fn) {
  switch (dtype) {
    case at::kFloat: return fn(float{});
    case at::kBFloat16: return fn(c10::BFloat16{});
    case at::kHalf: return fn(c10::Half{});
    default: TORCH_CHECK(false, "attention (cpu): unsupported dtype ", dtype);
  }
}

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3,
              "attention (cpu): q must be (Tq, H, D) and k, v (Tk, Hkv, D), got q ", q.sizes(), ", k ", k.sizes(),
              ", v ", v.sizes());
  for (const at::Tensor* x : {&q, &k, &v}) {
    TORCH_CHECK(x->device().is_cpu(), "attention (cpu): inputs must be CPU tensors, got one on ", x->device());
  }
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "attention (cpu): q must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(k.scalar_type() == dtype && v.scalar_type() == dtype, "attention (cpu): k and v must have q's dtype ",
              dtype, ", got ", k.scalar_type(), " and ", v.scalar_type());
  TORCH_CHECK(k.sizes() == v.sizes(), "attention (cpu): k and v must have the same shape, got ", k.sizes(), " and ",
              v.sizes());
  TORCH_CHECK(k.size(2) == q.size(2), "attention (cpu): k head dim ", k.size(2), " differs from q head dim ", q.size(2));
  TORCH_CHECK(q.size(2) >= 1 && q.size(2) <= kMaxHeadDim, "attention (cpu): head dim must be in [1, ", kMaxHeadDim,
              "], got ", q.size(2));
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "attention (cpu): q's heads (", q.size(1),
              ") must be a multiple of k/v's (", k.size(1), ")");
}

// The sequences of a varlen batch, with cu_seqlens validated here too: the Python-side value
// checks can be switched off, and a bad offset must not become an out-of-bounds read.
std::vector<Sequence> make_sequences(const at::Tensor& cu_q, const at::Tensor& cu_k,
                                     const std::optional<at::Tensor>& prefix_lens, int64_t total_q, int64_t total_k) {
  for (const at::Tensor* cu : {&cu_q, &cu_k}) {
    TORCH_CHECK(cu->dim() == 1 && cu->numel() >= 1 && cu->scalar_type() == at::kInt && cu->device().is_cpu(),
                "attention (cpu): cu_seqlens must be 1-D int32 CPU tensors with B+1 >= 1 entries, got ", cu->sizes(),
                " ", cu->scalar_type());
  }
  TORCH_CHECK(cu_q.numel() == cu_k.numel(), "attention (cpu): cu_seqlens_q has ", cu_q.numel() - 1,
              " sequences but cu_seqlens_k has ", cu_k.numel() - 1);
  const int64_t n_seq = cu_q.numel() - 1;
  const at::Tensor cq = cu_q.contiguous(), ck = cu_k.contiguous();
  const int32_t* q_ptr = cq.data_ptr<int32_t>();
  const int32_t* k_ptr = ck.data_ptr<int32_t>();
  TORCH_CHECK(q_ptr[0] == 0 && k_ptr[0] == 0, "attention (cpu): cu_seqlens must start at 0");
  TORCH_CHECK(q_ptr[n_seq] == total_q && k_ptr[n_seq] == total_k, "attention (cpu): cu_seqlens_q[-1] (", q_ptr[n_seq],
              ") and cu_seqlens_k[-1] (", k_ptr[n_seq], ") must equal the token counts ", total_q, " and ", total_k);
  const int32_t* prefix_ptr = nullptr;
  at::Tensor prefix;
  if (prefix_lens.has_value()) {
    prefix = prefix_lens->contiguous();
    TORCH_CHECK(prefix.dim() == 1 && prefix.numel() == n_seq && prefix.scalar_type() == at::kInt &&
                    prefix.device().is_cpu(),
                "attention (cpu): prefix_lens must be a 1-D int32 CPU tensor with one entry per sequence (", n_seq,
                "), got ", prefix.sizes(), " ", prefix.scalar_type());
    prefix_ptr = prefix.data_ptr<int32_t>();
  }
  std::vector<Sequence> seqs(n_seq);
  for (int64_t b = 0; b < n_seq; ++b) {
    TORCH_CHECK(q_ptr[b + 1] >= q_ptr[b] && k_ptr[b + 1] >= k_ptr[b],
                "attention (cpu): cu_seqlens must be non-decreasing (sequence ", b, ")");
    const int64_t prefix_b = prefix_ptr == nullptr ? 0 : prefix_ptr[b];
    seqs[b] = {q_ptr[b], k_ptr[b], q_ptr[b + 1] - q_ptr[b], k_ptr[b + 1] - k_ptr[b], prefix_b > 0 ? prefix_b : 0};
  }
  return seqs;
}

AttentionParams make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cu_q, const at::Tensor& cu_k,
                            double softmax_scale, bool causal, const std::optional<at::Tensor>& prefix_lens) {
  TORCH_CHECK(std::isfinite(softmax_scale), "attention (cpu): softmax_scale must be finite, got ", softmax_scale);
  AttentionParams p;
  p.total_q = q.size(0);
  p.total_k = k.size(0);
  p.heads = q.size(1);
  p.kv_heads = k.size(1);
  p.head_dim = q.size(2);
  p.softmax_scale = static_cast<float>(softmax_scale);
  p.causal = causal;
  p.seqs = make_sequences(cu_q, cu_k, causal ? prefix_lens : std::nullopt, p.total_q, p.total_k);
  return p;
}

// Runs the forward kernel on p (sequences and shapes set) over contiguous-row q and the k/v that
// p's sequences index: (out shaped like q, lse (H, Tq) fp32).
std::tuple<at::Tensor, at::Tensor> run_forward(AttentionParams& p, const at::Tensor& q, const at::Tensor& k,
                                               const at::Tensor& v) {
  at::Tensor out = at::empty(q.sizes(), q.options());  // contiguous, whatever q's strides
  at::Tensor lse = at::empty({p.heads, p.total_q}, q.options().dtype(at::kFloat));
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  if (p.total_q > 0) {
    dispatch_dtype(q.scalar_type(), [&](auto tag) { run_fwd<decltype(tag)>(p); });
  }
  return {out, lse};
}

// max_seqlen_q / max_seqlen_k are part of the op's signature but not needed: lengths come from cu_seqlens.
std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                     const at::Tensor& v_in, const at::Tensor& cu_seqlens_q,
                                                     const at::Tensor& cu_seqlens_k, int64_t /*max_seqlen_q*/,
                                                     int64_t /*max_seqlen_k*/, double softmax_scale, bool causal,
                                                     const std::optional<at::Tensor>& prefix_lens) {
  check_qkv(q_in, k_in, v_in);
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  AttentionParams p = make_params(q, k, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, prefix_lens);
  return run_forward(p, q, k, v);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& dout_in, const std::optional<at::Tensor>& dlse_in, const at::Tensor& q_in,
    const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse_in,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t /*max_seqlen_q*/,
    int64_t /*max_seqlen_k*/, double softmax_scale, bool causal, const std::optional<at::Tensor>& prefix_lens) {
  check_qkv(q_in, k_in, v_in);
  for (const at::Tensor* x : {&dout_in, &out_in}) {
    TORCH_CHECK(x->sizes() == q_in.sizes() && x->scalar_type() == q_in.scalar_type() && x->device().is_cpu(),
                "attention (cpu): dout and out must be CPU tensors shaped and typed like q ", q_in.sizes(), " ",
                q_in.scalar_type(), ", got ", x->sizes(), " ", x->scalar_type());
  }
  const int64_t heads = q_in.size(1), total_q = q_in.size(0);
  TORCH_CHECK(lse_in.dim() == 2 && lse_in.size(0) == heads && lse_in.size(1) == total_q &&
                  lse_in.scalar_type() == at::kFloat && lse_in.device().is_cpu(),
              "attention (cpu): lse must be a float32 CPU tensor of shape (H, Tq) = (", heads, ", ", total_q, "), got ",
              lse_in.sizes(), " ", lse_in.scalar_type());
  at::Tensor dlse;
  if (dlse_in.has_value()) {
    TORCH_CHECK(dlse_in->sizes() == lse_in.sizes() && dlse_in->scalar_type() == at::kFloat && dlse_in->device().is_cpu(),
                "attention (cpu): dlse must be shaped and typed like lse (", heads, ", ", total_q, ") float32, got ",
                dlse_in->sizes(), " ", dlse_in->scalar_type());
    dlse = dlse_in->contiguous();
  }
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const at::Tensor dout = dout_in.contiguous(), out = out_in.contiguous(), lse = lse_in.contiguous();
  AttentionParams p = make_params(q, k, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, prefix_lens);
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.dout = dout.data_ptr();
  p.dlse = dlse.defined() ? dlse.data_ptr<float>() : nullptr;
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  if (p.total_q > 0 || p.total_k > 0) {
    dispatch_dtype(q.scalar_type(), [&](auto tag) { run_bwd<decltype(tag)>(p); });
  }
  return {dq, dk, dv};
}

// Decoding against a KV cache: q (B, Lq, H, D), k_cache/v_cache (B, S, Hkv, D), cache_lens int32 (B,)
// -> (out (B, Lq, H, D), lse (B, H, Lq) fp32). The forward kernel serves it as it is: sequence b's
// queries are its own rows of q, its keys the first cache_lens[b] rows of its cache (positions
// past cache_lens[b] are never read), and the causal mask's bottom-right alignment is the
// decoding mask.

// Rows of (Hkv * D) values from one sequence's cache to the next when the caches can be read
// where they are (each sequence's (S, Hkv, D) block contiguous, sequences a whole number of rows
// apart, k and v alike: a cache buffer sliced to its filled positions is), else 0.
int64_t cache_row_stride(const at::Tensor& k, const at::Tensor& v) {
  const int64_t batch = k.size(0), capacity = k.size(1), row = k.size(2) * k.size(3);
  for (const at::Tensor* x : {&k, &v}) {
    if (batch > 0 && capacity > 0 && !x->select(0, 0).is_contiguous()) return 0;
  }
  if (batch <= 1) return capacity;
  if (k.stride(0) != v.stride(0) || row == 0 || k.stride(0) % row != 0 || k.stride(0) < capacity * row) return 0;
  return k.stride(0) / row;
}

std::tuple<at::Tensor, at::Tensor> attention_decode_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                        const at::Tensor& v_in, const at::Tensor& cache_lens,
                                                        double softmax_scale) {
  TORCH_CHECK(q_in.dim() == 4 && k_in.dim() == 4 && v_in.dim() == 4,
              "attention_decode (cpu): q must be (B, Lq, H, D) and k_cache, v_cache (B, S, Hkv, D), got q ",
              q_in.sizes(), ", k_cache ", k_in.sizes(), ", v_cache ", v_in.sizes());
  for (const at::Tensor* x : {&q_in, &k_in, &v_in}) {
    TORCH_CHECK(x->device().is_cpu(), "attention_decode (cpu): inputs must be CPU tensors, got one on ", x->device());
  }
  const auto dtype = q_in.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "attention_decode (cpu): q must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(k_in.scalar_type() == dtype && v_in.scalar_type() == dtype,
              "attention_decode (cpu): k_cache and v_cache must have q's dtype ", dtype, ", got ", k_in.scalar_type(),
              " and ", v_in.scalar_type());
  TORCH_CHECK(k_in.sizes() == v_in.sizes(), "attention_decode (cpu): k_cache and v_cache must have the same shape, got ",
              k_in.sizes(), " and ", v_in.sizes());
  const int64_t batch = q_in.size(0), q_len = q_in.size(1), heads = q_in.size(2), dim = q_in.size(3);
  const int64_t capacity = k_in.size(1), hkv = k_in.size(2);
  TORCH_CHECK(k_in.size(0) == batch, "attention_decode (cpu): k_cache holds ", k_in.size(0), " sequences but q has ",
              batch);
  TORCH_CHECK(k_in.size(3) == dim, "attention_decode (cpu): k_cache head dim ", k_in.size(3),
              " differs from q head dim ", dim);
  TORCH_CHECK(dim >= 1 && dim <= kMaxHeadDim, "attention_decode (cpu): head dim must be in [1, ", kMaxHeadDim,
              "], got ", dim);
  TORCH_CHECK(hkv > 0 && heads % hkv == 0, "attention_decode (cpu): q's heads (", heads,
              ") must be a multiple of k_cache's (", hkv, ")");
  TORCH_CHECK(cache_lens.dim() == 1 && cache_lens.numel() == batch && cache_lens.scalar_type() == at::kInt &&
                  cache_lens.device().is_cpu(),
              "attention_decode (cpu): cache_lens must be a 1-D int32 CPU tensor with one entry per sequence (", batch,
              "), got ", cache_lens.sizes(), " ", cache_lens.scalar_type());
  TORCH_CHECK(std::isfinite(softmax_scale), "attention_decode (cpu): softmax_scale must be finite, got ",
              softmax_scale);
  // The caches are read in place when their layout allows (the model's are slices of larger
  // buffers), else from contiguous copies.
  int64_t row_stride = cache_row_stride(k_in, v_in);
  const bool in_place = row_stride > 0;
  const at::Tensor k = in_place ? k_in : k_in.contiguous(), v = in_place ? v_in : v_in.contiguous();
  if (!in_place) row_stride = capacity;
  // One new token per sequence (token-by-token decoding) sees every valid key, so the G = H / Hkv
  // query heads that share a kv head can be one sequence's G query rows of that kv head, unmasked:
  // q (B, 1, Hkv * G, D) -> rows (B * G, Hkv, D). Each cache tile is then read once per kv head
  // instead of once per query head. (With one sequence the reshape may return a strided view
  // rather than a copy, which is why the rows are made contiguous: the kernel reads them so.)
  const int64_t groups = q_len == 1 ? heads / hkv : 1;
  const int64_t rows = q_len * groups;  // query rows per sequence
  const at::Tensor q = groups > 1 ? q_in.contiguous().view({batch, hkv, groups, dim}).transpose(1, 2).reshape(
                                        {batch * groups, hkv, dim}).contiguous()
                                  : q_in.contiguous().view({batch * q_len, heads, dim});
  const at::Tensor lens = cache_lens.contiguous();
  const int32_t* len_ptr = lens.data_ptr<int32_t>();
  AttentionParams p;
  p.total_q = q.size(0);
  p.total_k = batch * capacity;
  p.heads = q.size(1);
  p.kv_heads = hkv;
  p.head_dim = dim;
  p.softmax_scale = static_cast<float>(softmax_scale);
  p.causal = groups == 1;
  p.seqs.resize(batch);
  for (int64_t b = 0; b < batch; ++b) {
    // checked here too: the Python-side value checks can be switched off, and a bad length must
    // not become an out-of-bounds read
    TORCH_CHECK(len_ptr[b] >= 0 && len_ptr[b] <= capacity, "attention_decode (cpu): cache_lens must lie in [0, ",
                capacity, "] (the cache capacity S), got ", len_ptr[b], " for sequence ", b);
    p.seqs[b] = {b * rows, b * row_stride, rows, len_ptr[b], 0};
  }
  const auto [out, lse] = run_forward(p, q, k, v);
  if (groups > 1) {  // rows (B * G, Hkv, D) -> (B, 1, Hkv * G, D); lse (Hkv, B * G) -> (B, Hkv * G, 1)
    return {out.view({batch, groups, hkv, dim}).transpose(1, 2).reshape(q_in.sizes()),
            lse.view({hkv, batch, groups}).permute({1, 0, 2}).reshape({batch, heads, 1})};
  }
  // lse (H, B * Lq) -> (B, H, Lq)
  return {out.view(q_in.sizes()), lse.view({heads, batch, q_len}).permute({1, 0, 2}).contiguous()};
}

}  // namespace

TORCH_LIBRARY_IMPL(generalist, CPU, m) {
  m.impl("_attention_fwd_cpu", &attention_fwd_cpu);
  m.impl("_attention_bwd_cpu", &attention_bwd_cpu);
  m.impl("_attention_decode_cpu", &attention_decode_cpu);
}

}  // namespace generalist::cpu_attention
