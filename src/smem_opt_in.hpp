// Dynamic shared memory that takes a kernel's shared memory (static plus
// dynamic) over 48 KiB needs the kernel's opt-in
// (cudaFuncAttributeMaxDynamicSharedMemorySize). The attribute belongs to the
// kernel and the device, so it is set once per (kernel, device) and size, not
// before every launch: a driver call per launch adds up in decode steps
// (several launches a layer).
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <cstddef>
#include <mutex>

namespace kvcomp {
namespace detail {

void check_cuda(cudaError_t e, const char* what);

/// Lets `Kernel` launch with `bytes` of dynamic shared memory on the current
/// device, whatever its static shared memory (the fused kernel's tables: so
/// even a small `bytes` is granted). Per device, the largest size granted so
/// far is remembered; a launch within it costs one cudaGetDevice. Thread-safe.
/// The record is process-wide: a cudaDeviceReset() (which drops the
/// attributes) after kernels ran on that device is not seen, so launches over
/// 48 KiB would fail with a CUDA error (kvcomp::Error) until the process restarts.
template <auto Kernel>
void opt_in_dynamic_smem(size_t bytes, const char* what) {
  constexpr int kDevices = 64;  // devices beyond set the attribute at every launch
  static std::atomic<size_t> granted[kDevices] = {};
  static std::mutex setting;
  int device = 0;
  check_cuda(cudaGetDevice(&device), what);
  if (device >= kDevices) {
    check_cuda(cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)), what);
    return;
  }
  if (granted[device].load(std::memory_order_acquire) >= bytes) return;  // 0: never set
  std::lock_guard<std::mutex> lock(setting);  // one setter at a time: the attribute only grows
  if (granted[device].load(std::memory_order_relaxed) >= bytes) return;
  check_cuda(cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)), what);
  granted[device].store(bytes, std::memory_order_release);
}

}  // namespace detail
}  // namespace kvcomp
