// Attention backward kernels for fp16, head dims 64 and 128 (attention_kernel.cuh).
#include "attention_kernel.cuh"

GENERALIST_INSTANTIATE_ATTENTION(bwd, generalist::cuda_attention::Dtype::kFloat16)
