// CPU kernel for generalist::_varlen_positions (schema in csrc/registration.cpp).
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

namespace generalist {

std::tuple<at::Tensor, at::Tensor> varlen_positions_cpu(const at::Tensor& cu_seqlens, int64_t total) {
  TORCH_CHECK(cu_seqlens.dim() == 1 && cu_seqlens.numel() >= 1,
              "cu_seqlens must be a 1-D tensor with at least one entry, got shape ", cu_seqlens.sizes());
  TORCH_CHECK(cu_seqlens.scalar_type() == at::kInt, "cu_seqlens must be int32, got ", cu_seqlens.scalar_type());
  const at::Tensor cu = cu_seqlens.contiguous();
  const int32_t* cu_ptr = cu.data_ptr<int32_t>();
  const int64_t n_seq = cu.numel() - 1;
  TORCH_CHECK(cu_ptr[0] == 0, "cu_seqlens must start at 0, got ", cu_ptr[0]);
  TORCH_CHECK(cu_ptr[n_seq] == total, "cu_seqlens[-1] (", cu_ptr[n_seq], ") must equal total (", total, ")");
  for (int64_t b = 0; b < n_seq; ++b) {
    TORCH_CHECK(cu_ptr[b + 1] >= cu_ptr[b], "cu_seqlens must be non-decreasing, but entry ", b + 1,
                " (", cu_ptr[b + 1], ") < entry ", b, " (", cu_ptr[b], ")");
  }
  auto opts = cu.options();
  at::Tensor seq_idx = at::empty({total}, opts);
  at::Tensor pos = at::empty({total}, opts);
  int32_t* seq_ptr = seq_idx.data_ptr<int32_t>();
  int32_t* pos_ptr = pos.data_ptr<int32_t>();
  at::parallel_for(0, n_seq, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      for (int32_t t = cu_ptr[b]; t < cu_ptr[b + 1]; ++t) {
        seq_ptr[t] = static_cast<int32_t>(b);
        pos_ptr[t] = t - cu_ptr[b];
      }
    }
  });
  return {seq_idx, pos};
}

TORCH_LIBRARY_IMPL(generalist, CPU, m) { m.impl("_varlen_positions", &varlen_positions_cpu); }

}  // namespace generalist
