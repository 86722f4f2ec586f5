// Attention forward kernels for bf16, head dims 64 and 128 (attention_kernel.cuh).
#include "attention_kernel.cuh"

GENERALIST_INSTANTIATE_ATTENTION(fwd, generalist::cuda_attention::Dtype::kBFloat16)
