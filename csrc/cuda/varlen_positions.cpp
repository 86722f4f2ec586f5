// Host side of generalist::_varlen_positions on CUDA: checks, then the launch in
// varlen_positions_kernel.cu. Value checks on cu_seqlens (which need a device sync) are done by
// the Python op before it gets here.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>
#include <torch/types.h>

namespace generalist {

cudaError_t launch_varlen_positions(const int32_t* cu_seqlens, int64_t n_seq, int64_t total,
                                    int32_t* seq_idx, int32_t* pos, cudaStream_t stream);

std::tuple<at::Tensor, at::Tensor> varlen_positions_cuda(const at::Tensor& cu_seqlens, int64_t total) {
  TORCH_CHECK(cu_seqlens.is_cuda(), "cu_seqlens must be a CUDA tensor");
  TORCH_CHECK(cu_seqlens.dim() == 1 && cu_seqlens.numel() >= 1,
              "cu_seqlens must be a 1-D tensor with at least one entry, got shape ", cu_seqlens.sizes());
  TORCH_CHECK(cu_seqlens.scalar_type() == at::kInt, "cu_seqlens must be int32, got ", cu_seqlens.scalar_type());
  TORCH_CHECK(total >= 0, "total must be >= 0, got ", total);
  const c10::cuda::CUDAGuard guard(cu_seqlens.device());
  const at::Tensor cu = cu_seqlens.contiguous();
  at::Tensor seq_idx = at::empty({total}, cu.options());
  at::Tensor pos = at::empty({total}, cu.options());
  const cudaError_t err = launch_varlen_positions(
      cu.data_ptr<int32_t>(), cu.numel() - 1, total, seq_idx.data_ptr<int32_t>(),
      pos.data_ptr<int32_t>(), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "varlen_positions kernel failed: ", cudaGetErrorString(err));
  return {seq_idx, pos};
}

TORCH_LIBRARY_IMPL(generalist, CUDA, m) { m.impl("_varlen_positions", &varlen_positions_cuda); }

}  // namespace generalist
