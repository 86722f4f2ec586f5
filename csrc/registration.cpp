// The one place that declares the generalist:: ops implemented in C++ and CUDA.
// Implementations register per device with TORCH_LIBRARY_IMPL next to their code
// (csrc/cpu/, csrc/cuda/). Public ops with autograd live in Python (generalist/ops/) and call
// these kernels; these schemas are private (leading underscore) and have no autograd.
#include <pybind11/pybind11.h>
#include <torch/library.h>

TORCH_LIBRARY(generalist, m) {
  // cu_seqlens int32 (B+1,), total == cu_seqlens[-1] -> (seq_idx_T int32, pos_T int32):
  // for every token of a packed varlen stream, its sequence and its position in that sequence.
  m.def("_varlen_positions(Tensor cu_seqlens, int total) -> (Tensor, Tensor)");
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "generalist compiled kernels; importing this module registers them with torch.library";
  m.def("cuda_built", []() {
#ifdef GENERALIST_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "Whether the CUDA kernels were compiled into this build.");
}
