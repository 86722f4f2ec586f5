// CUDA attention backend, host side: checks -> params -> the kernels for the input dtype and
// head dim (attention_kernel.cuh, instantiated in attention_{fwd,bwd}_{fp16,bf16}.cu). Schemas of
// generalist::_attention_fwd_cuda / _attention_bwd_cuda are in csrc/registration.cpp; the Python
// glue that puts them in the attention registry is generalist/ops/attention_cuda.py.
//
// Serves fp16 / bf16 with head dims 64 and 128 on sm_80+; other inputs are refused here with a
// message (Python's `unsupported` sends them to another backend before they get here). Value
// checks on cu_seqlens / prefix_lens need a device sync and are done by the Python op.
#include "cuda/attention.h"

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>

namespace generalist::cuda_attention {
namespace {

bool rows_aligned(const at::Tensor& x) {
  // the kernels move rows in 16-byte chunks: contiguous last dim, 8-element row / head strides
  return x.stride(2) == 1 && x.stride(0) % 8 == 0 && x.stride(1) % 8 == 0 &&
         reinterpret_cast<std::uintptr_t>(x.data_ptr()) % 16 == 0;
}

// x itself when the kernels can read it in place, else a contiguous copy.
at::Tensor readable(const at::Tensor& x) {
  return rows_aligned(x) ? x : x.clone(at::MemoryFormat::Contiguous);
}

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3,
              "attention (cuda): q must be (Tq, H, D) and k, v (Tk, Hkv, D), got q ", q.sizes(), ", k ", k.sizes(),
              ", v ", v.sizes());
  for (const at::Tensor* x : {&q, &k, &v}) {
    TORCH_CHECK(x->is_cuda() && x->device() == q.device(),
                "attention (cuda): q, k and v must be CUDA tensors on one device, got ", x->device());
  }
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16,
              "attention (cuda): q must be float16 or bfloat16, got ", dtype);
  TORCH_CHECK(k.scalar_type() == dtype && v.scalar_type() == dtype, "attention (cuda): k and v must have q's dtype ",
              dtype, ", got ", k.scalar_type(), " and ", v.scalar_type());
  TORCH_CHECK(k.sizes() == v.sizes(), "attention (cuda): k and v must have the same shape, got ", k.sizes(), " and ",
              v.sizes());
  TORCH_CHECK(k.size(2) == q.size(2), "attention (cuda): k head dim ", k.size(2), " differs from q head dim ",
              q.size(2));
  TORCH_CHECK(q.size(2) == 64 || q.size(2) == 128, "attention (cuda): head dim must be 64 or 128, got ", q.size(2));
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "attention (cuda): q's heads (", q.size(1),
              ") must be a multiple of k/v's (", k.size(1), ")");
  TORCH_CHECK(q.size(1) <= 65535, "attention (cuda): at most 65535 heads, got ", q.size(1));
  TORCH_CHECK(q.size(0) < std::numeric_limits<int32_t>::max() && k.size(0) < std::numeric_limits<int32_t>::max(),
              "attention (cuda): token counts must fit in int32");
}

void check_int32(const at::Tensor& x, const char* name, const at::Tensor& q) {
  TORCH_CHECK(x.dim() == 1 && x.scalar_type() == at::kInt && x.device() == q.device(), "attention (cuda): ", name,
              " must be a 1-D int32 tensor on ", q.device(), ", got ", x.sizes(), " ", x.scalar_type(), " on ",
              x.device());
}

// Everything but the data pointers of the backward-only tensors. The int32 tensors are returned
// (contiguous) so that they outlive the launch.
struct Prepared {
  AttentionParams p;
  at::Tensor cu_q, cu_k, prefix;
};

Prepared prepare(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
                 const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double softmax_scale,
                 bool causal, const std::optional<at::Tensor>& prefix_lens) {
  check_int32(cu_seqlens_q, "cu_seqlens_q", q);
  check_int32(cu_seqlens_k, "cu_seqlens_k", q);
  TORCH_CHECK(cu_seqlens_q.numel() >= 1 && cu_seqlens_q.numel() == cu_seqlens_k.numel(),
              "attention (cuda): cu_seqlens_q and cu_seqlens_k must have the same B+1 >= 1 entries, got ",
              cu_seqlens_q.numel(), " and ", cu_seqlens_k.numel());
  TORCH_CHECK(max_seqlen_q >= 0 && max_seqlen_k >= 0 && max_seqlen_q < std::numeric_limits<int32_t>::max() &&
                  max_seqlen_k < std::numeric_limits<int32_t>::max(),
              "attention (cuda): max_seqlen_q / max_seqlen_k must be in [0, 2^31 - 1), got ", max_seqlen_q, " and ",
              max_seqlen_k);
  TORCH_CHECK(std::isfinite(softmax_scale), "attention (cuda): softmax_scale must be finite, got ", softmax_scale);
  Prepared out;
  out.cu_q = cu_seqlens_q.contiguous();
  out.cu_k = cu_seqlens_k.contiguous();
  const int64_t batch = out.cu_q.numel() - 1;
  if (causal && prefix_lens.has_value()) {
    check_int32(*prefix_lens, "prefix_lens", q);
    TORCH_CHECK(prefix_lens->numel() == batch, "attention (cuda): prefix_lens must have one entry per sequence (",
                batch, "), got ", prefix_lens->numel());
    out.prefix = prefix_lens->contiguous();
  }
  // grid x = batch * tiles of 64 (attention_kernel.cuh)
  const int64_t tiles = (std::max(max_seqlen_q, max_seqlen_k) + 63) / 64;
  TORCH_CHECK(batch * tiles <= std::numeric_limits<int32_t>::max(), "attention (cuda): ", batch, " sequences of up to ",
              std::max(max_seqlen_q, max_seqlen_k), " tokens exceed the launch grid");

  AttentionParams& p = out.p;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.q_row_stride = q.stride(0);
  p.q_head_stride = q.stride(1);
  p.k_row_stride = k.stride(0);
  p.k_head_stride = k.stride(1);
  p.v_row_stride = v.stride(0);
  p.v_head_stride = v.stride(1);
  p.cu_seqlens_q = out.cu_q.data_ptr<int32_t>();
  p.cu_seqlens_k = out.cu_k.data_ptr<int32_t>();
  p.prefix_lens = out.prefix.defined() ? out.prefix.data_ptr<int32_t>() : nullptr;
  p.total_q = q.size(0);
  p.total_k = k.size(0);
  p.batch = static_cast<int>(batch);
  p.heads = static_cast<int>(q.size(1));
  p.kv_heads = static_cast<int>(k.size(1));
  p.head_dim = static_cast<int>(q.size(2));
  p.max_seqlen_q = static_cast<int>(max_seqlen_q);
  p.max_seqlen_k = static_cast<int>(max_seqlen_k);
  p.softmax_scale = static_cast<float>(softmax_scale);
  p.causal = causal;
  return out;
}

template <typename Fn>
cudaError_t dispatch(at::ScalarType dtype, int64_t head_dim, const Fn& fn) {
  // fn(dtype tag, head-dim tag); check_qkv has limited both to what is instantiated
  using F16 = std::integral_constant<Dtype, Dtype::kFloat16>;
  using BF16 = std::integral_constant<Dtype, Dtype::kBFloat16>;
  using D64 = std::integral_constant<int, 64>;
  using D128 = std::integral_constant<int, 128>;
  if (dtype == at::kHalf) return head_dim == 64 ? fn(F16{}, D64{}) : fn(F16{}, D128{});
  return head_dim == 64 ? fn(BF16{}, D64{}) : fn(BF16{}, D128{});
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                      const at::Tensor& v_in, const at::Tensor& cu_seqlens_q,
                                                      const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                                                      int64_t max_seqlen_k, double softmax_scale, bool causal,
                                                      const std::optional<at::Tensor>& prefix_lens) {
  check_qkv(q_in, k_in, v_in);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = readable(q_in), k = readable(k_in), v = readable(v_in);
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({q.size(1), q.size(0)}, q.options().dtype(at::kFloat));
  Prepared prep = prepare(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                          prefix_lens);
  AttentionParams& p = prep.p;
  if (p.total_q == 0 || p.batch == 0 || p.max_seqlen_q == 0) return {out, lse};
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.o_row_stride = out.stride(0);
  p.o_head_stride = out.stride(1);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const cudaError_t err = dispatch(q.scalar_type(), p.head_dim, [&](auto dt, auto d) {
    return launch_attention_fwd<decltype(dt)::value, decltype(d)::value>(p, stream);
  });
  TORCH_CHECK(err == cudaSuccess, "attention (cuda): forward kernel failed: ", cudaGetErrorString(err));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(
    const at::Tensor& dout_in, const std::optional<at::Tensor>& dlse_in, const at::Tensor& q_in,
    const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse_in,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    double softmax_scale, bool causal, const std::optional<at::Tensor>& prefix_lens) {
  check_qkv(q_in, k_in, v_in);
  for (const at::Tensor* x : {&dout_in, &out_in}) {
    TORCH_CHECK(x->sizes() == q_in.sizes() && x->scalar_type() == q_in.scalar_type() && x->device() == q_in.device(),
                "attention (cuda): dout and out must be shaped and typed like q ", q_in.sizes(), " ",
                q_in.scalar_type(), " on ", q_in.device(), ", got ", x->sizes(), " ", x->scalar_type(), " on ",
                x->device());
  }
  const int64_t heads = q_in.size(1), total_q = q_in.size(0);
  TORCH_CHECK(lse_in.dim() == 2 && lse_in.size(0) == heads && lse_in.size(1) == total_q &&
                  lse_in.scalar_type() == at::kFloat && lse_in.device() == q_in.device(),
              "attention (cuda): lse must be a float32 tensor of shape (H, Tq) = (", heads, ", ", total_q, ") on ",
              q_in.device(), ", got ", lse_in.sizes(), " ", lse_in.scalar_type(), " on ", lse_in.device());
  if (dlse_in.has_value()) {
    TORCH_CHECK(dlse_in->sizes() == lse_in.sizes() && dlse_in->scalar_type() == at::kFloat &&
                    dlse_in->device() == q_in.device(),
                "attention (cuda): dlse must be shaped and typed like lse (", heads, ", ", total_q, ") float32, got ",
                dlse_in->sizes(), " ", dlse_in->scalar_type(), " on ", dlse_in->device());
  }
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = readable(q_in), k = readable(k_in), v = readable(v_in);
  const at::Tensor out = readable(out_in), dout = readable(dout_in);
  const at::Tensor lse = lse_in.contiguous();
  const at::Tensor dlse = dlse_in.has_value() ? dlse_in->contiguous() : at::Tensor();
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  Prepared prep = prepare(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                          prefix_lens);
  AttentionParams& p = prep.p;
  if (p.total_q == 0 || p.total_k == 0 || p.batch == 0) {  // nothing attends to anything
    return {dq.zero_(), dk.zero_(), dv.zero_()};
  }
  at::Tensor delta = at::empty({heads, total_q}, q.options().dtype(at::kFloat));
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.o_row_stride = out.stride(0);
  p.o_head_stride = out.stride(1);
  p.dout = dout.data_ptr();
  p.do_row_stride = dout.stride(0);
  p.do_head_stride = dout.stride(1);
  p.dlse = dlse.defined() ? dlse.data_ptr<float>() : nullptr;
  p.delta = delta.data_ptr<float>();
  p.dq = dq.data_ptr();
  p.dq_row_stride = dq.stride(0);
  p.dq_head_stride = dq.stride(1);
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.dk_row_stride = dk.stride(0);
  p.dk_head_stride = dk.stride(1);
  TORCH_CHECK(dv.strides() == dk.strides(), "attention (cuda): internal error: dk and dv layouts differ");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const cudaError_t err = dispatch(q.scalar_type(), p.head_dim, [&](auto dt, auto d) {
    return launch_attention_bwd<decltype(dt)::value, decltype(d)::value>(p, stream);
  });
  TORCH_CHECK(err == cudaSuccess, "attention (cuda): backward kernels failed: ", cudaGetErrorString(err));
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(generalist, CUDA, m) {
  m.impl("_attention_fwd_cuda", &attention_fwd_cuda);
  m.impl("_attention_bwd_cuda", &attention_bwd_cuda);
}

}  // namespace generalist::cuda_attention
