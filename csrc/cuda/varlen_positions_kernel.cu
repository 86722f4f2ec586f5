// Device code for generalist::_varlen_positions. No torch headers here, so `make check-cuda`
// compiles it with nvcc alone in seconds; the host side is varlen_positions.cpp.
#include <cstdint>
#include <cuda_runtime.h>

namespace generalist {

// One thread per token: binary search for the last sequence whose start is <= the token.
__global__ void varlen_positions_kernel(const int32_t* __restrict__ cu_seqlens, int64_t n_seq,
                                        int64_t total, int32_t* __restrict__ seq_idx,
                                        int32_t* __restrict__ pos) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= total) return;
  int64_t lo = 0, hi = n_seq;  // invariant: cu_seqlens[lo] <= t < cu_seqlens[hi]
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (cu_seqlens[mid] <= t) lo = mid; else hi = mid;
  }
  seq_idx[t] = static_cast<int32_t>(lo);
  pos[t] = static_cast<int32_t>(t - cu_seqlens[lo]);
}

cudaError_t launch_varlen_positions(const int32_t* cu_seqlens, int64_t n_seq, int64_t total,
                                    int32_t* seq_idx, int32_t* pos, cudaStream_t stream) {
  if (total == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  varlen_positions_kernel<<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(
      cu_seqlens, n_seq, total, seq_idx, pos);
  return cudaGetLastError();
}

}  // namespace generalist
