// Shared by the benchmark binaries: checked CUDA calls, the GPU data generator
// and the measured copy bandwidth (the physical floor's denominator).
#pragma once

#include <benchmark/benchmark.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <string>

#include "tests/gpu_random.cuh"

#define CK(x)                                                                                              \
  do {                                                                                                     \
    cudaError_t e_ = (x);                                                                                  \
    if (e_ != cudaSuccess) { std::fprintf(stderr, "%s: %s\n", #x, cudaGetErrorString(e_)); std::abort(); } \
  } while (0)

namespace kvcomp_bench {

/// GPU data for the benchmarks: the generator the soak tests use too.
using kvcomp_test::fill_normal;

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
