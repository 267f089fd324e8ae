// The split merge (merge_kernel) as a programmatic dependent launch: its CTAs
// are launched while the split kernel before it on the stream still runs
// (that kernel lets them, allow_dependent_launch()), and each waits in
// griddepcontrol.wait until the split kernel has finished and its partials
// are visible. So the gap between the two launches, a few microseconds at
// short contexts where a call takes ~20-30, is hidden. CUDA graphs capture
// it as a programmatic edge. Hopper and newer (compute capability 9.0): on
// older devices the merge is launched plainly (the wait is then a no-op).
#pragma once

#include <cuda_runtime.h>

#include <atomic>

#include "kernels/decode_common.cuh"

namespace kvcomp {
namespace detail {

void check_cuda(cudaError_t e, const char* what);

/// Whether the current device takes programmatic dependent launches (cached per device).
inline bool device_has_pdl(const char* what) {
  constexpr int kDevices = 64;
  static std::atomic<int> known[kDevices] = {};  // 0: not asked yet, 1: no, 2: yes
  int device = 0;
  check_cuda(cudaGetDevice(&device), what);
  if (device < kDevices && known[device].load(std::memory_order_relaxed) != 0)
    return known[device].load(std::memory_order_relaxed) == 2;
  int major = 0;
  check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), what);
  if (device < kDevices) known[device].store(major >= 9 ? 2 : 1, std::memory_order_relaxed);
  return major >= 9;
}

/// merge_kernel<QT, D> over `rows` output rows (one CTA of D threads each) after the split kernel just launched on s.
template <typename QT, int D>
void launch_merge(const float* part, int splits, QT* out, bool rotate_back, int rows, cudaStream_t s,
                  const char* what) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(unsigned(rows));
  cfg.blockDim = dim3(D);
  cfg.dynamicSmemBytes = 0;
  cfg.stream = s;
  cudaLaunchAttribute attr = {};
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = &attr;
  cfg.numAttrs = device_has_pdl(what) ? 1 : 0;
  check_cuda(cudaLaunchKernelEx(&cfg, merge_kernel<QT, D>, part, splits, out, rotate_back), what);
}

}  // namespace detail
}  // namespace kvcomp
