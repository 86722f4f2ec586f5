// The CPU attention kernels compiled for AVX2 + FMA (8-float vectors). attention.cpp calls them
// only on CPUs that have both; nothing else in the extension is compiled for AVX2.
#include "cpu/attention.h"

#if GENERALIST_ATTENTION_AVX2

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

namespace generalist::cpu_attention::avx2 {

#define GENERALIST_VEC_WIDTH 8
#include "cpu/attention_kernel.h"

template void attention_fwd<float>(const AttentionParams&);
template void attention_fwd<c10::BFloat16>(const AttentionParams&);
template void attention_fwd<c10::Half>(const AttentionParams&);
template void attention_bwd<float>(const AttentionParams&);
template void attention_bwd<c10::BFloat16>(const AttentionParams&);
template void attention_bwd<c10::Half>(const AttentionParams&);

}  // namespace generalist::cpu_attention::avx2

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#endif  // GENERALIST_ATTENTION_AVX2
