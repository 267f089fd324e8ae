// Pseudo-random KV-like data generated on the GPU (for data too large to make
// on the host): shared by the soak tests and the benchmarks.
#pragma once

#include <cuda_fp16.h>

#include <cstdint>

namespace kvcomp_test {

__device__ inline uint32_t mix32(uint64_t x) {
  x ^= x >> 33; x *= 0xff51afd7ed558ccdULL; x ^= x >> 33; x *= 0xc4ceb9fe1a85ec53ULL; x ^= x >> 33;
  return uint32_t(x);
}
/// Pseudo-normal fp16 values (Box-Muller over a hash of seed and index) in
/// rows of d channels; `outliers`: every 16th channel x10 + 5, as keys have.
__global__ inline void fill_normal(__half* x, size_t n, int d, uint64_t seed, bool outliers) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    const float u1 = (mix32(seed * 0x9E3779B97F4A7C15ULL + 2 * i) + 1.f) * 2.3283064e-10f;
    const float u2 = mix32(seed * 0x9E3779B97F4A7C15ULL + 2 * i + 1) * 2.3283064e-10f;
    float v = sqrtf(-2.f * logf(u1)) * cospif(2.f * u2);
    if (outliers && int(i % d) % 16 == 3) v = v * 10.f + 5.f;
    x[i] = __float2half_rn(v);
  }
}

}  // namespace kvcomp_test
