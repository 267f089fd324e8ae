// RAII owners of the Cache's device and pinned host memory. An allocation
// failure throws kvcomp::Error naming what was being allocated (and how many
// bytes) after freeing what the buffer held, so a failed constructor or
// append leaves nothing allocated behind it; the destructor frees the rest.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <string>

#include "kvcomp/error.hpp"
#include "launch.hpp"

namespace kvcomp {
namespace detail {

/// `count` elements of T in device memory (cudaMalloc), or none.
template <typename T>
struct DeviceBuffer {
  T* ptr = nullptr;
  size_t count = 0;
  DeviceBuffer() = default;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() { if (ptr) cudaFree(ptr); }
  void allocate(size_t n, const char* what) {
    if (ptr) { cudaFree(ptr); ptr = nullptr; count = 0; }
    if (n == 0) return;
    const cudaError_t e = cudaMalloc(&ptr, n * sizeof(T));
    if (e != cudaSuccess) {
      cudaGetLastError();
      ptr = nullptr;
      throw Error(std::string("cannot allocate ") + what + " (" + std::to_string((long long)(n * sizeof(T))) +
                  " bytes): " + cudaGetErrorString(e));
    }
    count = n;
  }
  /// Grows (never shrinks) to at least n elements; contents are not kept.
  void reserve(size_t n, const char* what) {
    if (n > count) allocate(std::max(n, count * 2), what);
  }
};

/// Page-locked host staging memory (cudaMallocHost), at least 4096 bytes once used.
struct PinnedBuffer {
  void* ptr = nullptr;
  size_t bytes = 0;
  ~PinnedBuffer() { if (ptr) cudaFreeHost(ptr); }
  void reserve(size_t n) {
    if (n <= bytes) return;
    if (ptr) cudaFreeHost(ptr);
    ptr = nullptr;
    bytes = 0;
    check_cuda(cudaMallocHost(&ptr, std::max(n, size_t(4096))), "pinned staging allocation");
    bytes = std::max(n, size_t(4096));
  }
};

}  // namespace detail
}  // namespace kvcomp
