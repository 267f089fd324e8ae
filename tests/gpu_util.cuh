// GPU test helpers: skip without a device, checked CUDA calls, typed buffers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <vector>

#include "kvcomp/dtype.hpp"

#define KVCOMP_REQUIRE_GPU()                                                            \
  do {                                                                                  \
    int n_ = 0;                                                                         \
    if (cudaGetDeviceCount(&n_) != cudaSuccess || n_ == 0) {                            \
      cudaGetLastError();                                                               \
      GTEST_SKIP() << "no CUDA device present: GPU test skipped (run it on a GPU)";     \
    }                                                                                   \
  } while (0)

#define CUDA_OK(x) ASSERT_EQ(cudaSuccess, (x)) << #x << ": " << cudaGetErrorString(cudaGetLastError())
// After a kernel launch (or a library call that launches): no launch error, no fault.
#define CUDA_LAUNCH_OK()                          \
  do {                                            \
    CUDA_OK(cudaGetLastError());                  \
    CUDA_OK(cudaDeviceSynchronize());             \
  } while (0)

namespace kvcomp_test {

/// Raw element bits of `x` in dtype t (values already representable).
inline std::vector<uint8_t> to_dtype_bytes(kvcomp::DType t, const std::vector<float>& x) {
  std::vector<uint8_t> out(x.size() * kvcomp::dtype_size(t));
  for (size_t i = 0; i < x.size(); ++i) {
    if (t == kvcomp::DType::F32) {
      std::memcpy(&out[4 * i], &x[i], 4);
    } else if (t == kvcomp::DType::F16) {
      const uint16_t h = __half_as_ushort(__float2half_rn(x[i]));
      std::memcpy(&out[2 * i], &h, 2);
    } else {
      const uint16_t h = __bfloat16_as_ushort(__float2bfloat16_rn(x[i]));
      std::memcpy(&out[2 * i], &h, 2);
    }
  }
  return out;
}

template <typename T>
struct DevBuf {
  T* ptr = nullptr;
  size_t n = 0;
  explicit DevBuf(size_t count) : n(count) {
    if (cudaMalloc(&ptr, count * sizeof(T) + 16) != cudaSuccess) ptr = nullptr;
  }
  /// x in dtype t, uploaded (bytes: T = uint8_t).
  DevBuf(kvcomp::DType t, const std::vector<float>& x) : DevBuf(x.size() * kvcomp::dtype_size(t)) {
    static_assert(sizeof(T) == 1, "a typed upload fills a byte buffer");
    if (ptr) upload(to_dtype_bytes(t, x));
  }
  ~DevBuf() { if (ptr) cudaFree(ptr); }
  DevBuf(const DevBuf&) = delete;
  DevBuf& operator=(const DevBuf&) = delete;
  void upload(const std::vector<T>& h) { cudaMemcpy(ptr, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice); }
  std::vector<T> download() const {
    std::vector<T> h(n);
    cudaMemcpy(h.data(), ptr, n * sizeof(T), cudaMemcpyDeviceToHost);
    return h;
  }
};

/// x rounded to what dtype t holds.
inline std::vector<float> round_to(kvcomp::DType t, const std::vector<float>& x) {
  const auto bytes = to_dtype_bytes(t, x);
  std::vector<float> r(x.size());
  for (size_t i = 0; i < x.size(); ++i) r[i] = kvcomp::load_as_float(t, bytes.data(), i);
  return r;
}

}  // namespace kvcomp_test
