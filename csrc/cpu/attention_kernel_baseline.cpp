// The CPU attention kernels for any CPU (4-float vectors: SSE2 on x86-64, NEON on arm64), used
// where attention_kernel_avx2.cpp cannot run.
#include "cpu/attention.h"

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

namespace generalist::cpu_attention::baseline {

#define GENERALIST_VEC_WIDTH 4
#include "cpu/attention_kernel.h"

template void attention_fwd<float>(const AttentionParams&);
template void attention_fwd<c10::BFloat16>(const AttentionParams&);
template void attention_fwd<c10::Half>(const AttentionParams&);
template void attention_bwd<float>(const AttentionParams&);
template void attention_bwd<c10::BFloat16>(const AttentionParams&);
template void attention_bwd<c10::Half>(const AttentionParams&);

}  // namespace generalist::cpu_attention::baseline
