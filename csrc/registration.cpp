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

  // Varlen attention on CPU (csrc/cpu/attention*.cpp): q (Tq, H, D), k/v (Tk, Hkv, D) fp32/bf16/fp16,
  // cu_seqlens_* int32 (B+1,), prefix_lens int32 (B,) -> (out (Tq, H, D), lse (H, Tq) fp32); the
  // backward takes dlse (H, Tq) fp32 or None and returns (dq, dk, dv). Semantics as in
  // generalist/ops/attention_reference.py.
  m.def("_attention_fwd_cpu(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
        "int max_seqlen_q, int max_seqlen_k, float softmax_scale, bool causal, Tensor? prefix_lens) "
        "-> (Tensor, Tensor)");
  m.def("_attention_bwd_cpu(Tensor dout, Tensor? dlse, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, float softmax_scale, "
        "bool causal, Tensor? prefix_lens) -> (Tensor, Tensor, Tensor)");

  // Decoding against a KV cache on CPU, with the forward kernel above: q (B, Lq, H, D), k_cache/v_cache
  // (B, S, Hkv, D), cache_lens int32 (B,) -> (out (B, Lq, H, D), lse (B, H, Lq) fp32). Semantics as in
  // generalist/ops/attention_decode.py.
  m.def("_attention_decode_cpu(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_lens, float softmax_scale) "
        "-> (Tensor, Tensor)");

  // The same two ops on CUDA (csrc/cuda/attention*): fp16/bf16, head dims 64 and 128, sm_80+.
  // Declared in every build (like the CPU ones); implemented only when CUDA is compiled in.
  m.def("_attention_fwd_cuda(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
        "int max_seqlen_q, int max_seqlen_k, float softmax_scale, bool causal, Tensor? prefix_lens) "
        "-> (Tensor, Tensor)");
  m.def("_attention_bwd_cuda(Tensor dout, Tensor? dlse, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, float softmax_scale, "
        "bool causal, Tensor? prefix_lens) -> (Tensor, Tensor, Tensor)");
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
