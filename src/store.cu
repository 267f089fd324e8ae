#include <cub/device/device_scan.cuh>

#include <string>

#include "kernels/store.cuh"
#include "kvcomp/error.hpp"
#include "launch.hpp"

namespace kvcomp {
namespace detail {

void check_cuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw Error(std::string(what) + ": " + cudaGetErrorString(e));
}

namespace {

int store_grid(int n_jobs) { return (2 * n_jobs + kStoreWarps - 1) / kStoreWarps; }

template <typename F>
void by_type(DType t, F&& f) {
  switch (t) {
    case DType::F16: f(__half{}); break;
    case DType::BF16: f(__nv_bfloat16{}); break;
    case DType::F32: f(float{}); break;
  }
}

}  // namespace

void launch_histogram(DType t, const StoreJob* jobs, int n_jobs, int T, int D, unsigned long long* hist,
                      cudaStream_t s) {
  if (n_jobs == 0) return;
  by_type(t, [&](auto e) {
    histogram_kernel<decltype(e)><<<store_grid(n_jobs), 32 * kStoreWarps, 0, s>>>(jobs, n_jobs, T, D, hist);
  });
  check_cuda(cudaGetLastError(), "histogram kernel launch");
}

void launch_measure(DType t, const StoreJob* jobs, int n_jobs, int T, int D, const CodebookTables* books,
                    uint32_t* sizes16, cudaStream_t s) {
  if (n_jobs == 0) return;
  by_type(t, [&](auto e) {
    measure_kernel<decltype(e)><<<store_grid(n_jobs), 32 * kStoreWarps, 0, s>>>(jobs, n_jobs, T, D, books, sizes16);
  });
  check_cuda(cudaGetLastError(), "measure kernel launch");
}

size_t scan_workspace_bytes(int n) {
  size_t bytes = 0;
  check_cuda(cub::DeviceScan::ExclusiveSum(nullptr, bytes, static_cast<const uint32_t*>(nullptr),
                                           static_cast<uint32_t*>(nullptr), n),
             "scan workspace query");
  return bytes;
}

void launch_scan(const uint32_t* in, uint32_t* out, int n, void* scratch, size_t scratch_bytes, cudaStream_t s) {
  check_cuda(cub::DeviceScan::ExclusiveSum(scratch, scratch_bytes, in, out, n, s), "offset scan");
}

void launch_encode(DType t, const StoreJob* jobs, int n_jobs, int T, int D, const CodebookTables* books,
                   const uint32_t* sizes16, const uint32_t* offsets16, const int64_t* extent_base16, uint8_t* pool,
                   format::BlockRef* table, cudaStream_t s) {
  if (n_jobs == 0) return;
  by_type(t, [&](auto e) {
    encode_kernel<decltype(e)><<<store_grid(n_jobs), 32 * kStoreWarps, 0, s>>>(
        jobs, n_jobs, T, D, books, sizes16, offsets16, extent_base16, pool, table);
  });
  check_cuda(cudaGetLastError(), "encode kernel launch");
}

void launch_tail_copy(DType t, const TailCopy* copies, int n, int D, cudaStream_t s) {
  if (n == 0) return;
  by_type(t, [&](auto e) { tail_copy_kernel<decltype(e)><<<n, 256, 0, s>>>(copies, D); });
  check_cuda(cudaGetLastError(), "tail copy kernel launch");
}

}  // namespace detail
}  // namespace kvcomp
