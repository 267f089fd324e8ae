// Shared by the benchmark binaries: checked CUDA calls, a GPU data generator
// and the measured copy bandwidth (the physical floor's denominator).
#pragma once

#include <benchmark/benchmark.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <string>

#define CK(x)                                                                                              \
  do {                                                                                                     \
    cudaError_t e_ = (x);                                                                                  \
    if (e_ != cudaSuccess) { std::fprintf(stderr, "%s: %s\n", #x, cudaGetErrorString(e_)); std::abort(); } \
  } while (0)

namespace kvcomp_bench {

__device__ inline uint32_t hash32(uint64_t x) {
  x ^= x >> 33; x *= 0xff51afd7ed558ccdULL; x ^= x >> 33; x *= 0xc4ceb9fe1a85ec53ULL; x ^= x >> 33;
  return uint32_t(x);
}
/// Pseudo-normal fp16 values of rows of `d` channels; `outliers`: every 16th
/// channel x10 with an offset of 5 (K-like).
__global__ inline void fill_kernel(__half* x, size_t n, int d, uint64_t seed, bool outliers) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    const float u1 = (hash32(seed * 0x9E3779B97F4A7C15ULL + 2 * i) + 1.f) * 2.3283064e-10f;
    const float u2 = hash32(seed * 0x9E3779B97F4A7C15ULL + 2 * i + 1) * 2.3283064e-10f;
    float v = sqrtf(-2.f * logf(u1)) * cospif(2.f * u2);
    if (outliers && int(i % d) % 16 == 3) v = v * 10.f + 5.f;
    x[i] = __float2half_rn(v);
  }
}

/// Device-to-device copy bandwidth, bytes read + written per second (1 GiB x 10);
/// also recorded in the benchmark context as copy_bw_TBps.
inline double measure_copy_bandwidth() {
  const size_t bytes = size_t(1) << 30;
  void *x, *y;
  CK(cudaMalloc(&x, bytes));
  CK(cudaMalloc(&y, bytes));
  CK(cudaMemset(x, 1, bytes));
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  CK(cudaMemcpy(y, x, bytes, cudaMemcpyDeviceToDevice));
  cudaEventRecord(a);
  for (int i = 0; i < 10; ++i) cudaMemcpyAsync(y, x, bytes, cudaMemcpyDeviceToDevice);
  cudaEventRecord(b);
  cudaEventSynchronize(b);
  float ms = 0;
  cudaEventElapsedTime(&ms, a, b);
  const double bw = 2.0 * bytes * 10 / (ms / 1e3);
  cudaFree(x);
  cudaFree(y);
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  std::printf("measured copy bandwidth: %.2f TB/s (read + write)\n", bw / 1e12);
  benchmark::AddCustomContext("copy_bw_TBps", std::to_string(bw / 1e12));
  return bw;
}

/// True (and a message printed) when there is no CUDA device.
inline bool no_gpu(const char* binary) {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
    std::printf("%s: no CUDA device, nothing to measure\n", binary);
    return true;
  }
  return false;
}

}  // namespace kvcomp_bench
