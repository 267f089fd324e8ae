#include <string>
#include <type_traits>

#include "kernels/append_jobs.cuh"
#include "kernels/decode_jobs.cuh"
#include "kernels/pool_pages.cuh"
#include "kernels/store.cuh"
#include "kvcomp/error.hpp"
#include "launch.hpp"
#include "smem_opt_in.hpp"

namespace kvcomp {
namespace detail {

void check_cuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw Error(std::string(what) + ": " + cudaGetErrorString(e));
}

namespace {

/// One CTA per block, all of its shared memory dynamic: past 48 KiB (T = 128
/// or D = 256) it needs the kernel's opt-in (set once per kernel, device and size).
template <typename Smem, auto Kernel>
size_t store_smem(int T, int D) {
  const size_t bytes = StoreSmem<Smem>::bytes(T, D);
  opt_in_dynamic_smem<Kernel>(bytes, "store kernel shared memory opt-in");
  return bytes;
}

template <typename F>
void by_type(DType t, F&& f) {
  switch (t) {
    case DType::F16: f(__half{}); break;
    case DType::BF16: f(__nv_bfloat16{}); break;
    case DType::F32: f(float{}); break;
  }
}

/// f(std::integral_constant<int, W>) for the store CTA's warp count.
template <typename F>
void by_warps(int warps, F&& f) {
  if (warps == kStoreWarpsFew) f(std::integral_constant<int, kStoreWarpsFew>{});
  else if (warps == kStoreWarps) f(std::integral_constant<int, kStoreWarps>{});
  else throw Error("store kernels: " + std::to_string(warps) + " warps a block is not built");
}

}  // namespace

void launch_histogram(DType t, const StoreJob* jobs, int n_jobs, int T, int D, unsigned long long* hist,
                      cudaStream_t s, const int32_t* ready) {
  if (n_jobs == 0) return;
  by_type(t, [&](auto e) {
    constexpr auto kernel = histogram_kernel<decltype(e)>;
    const size_t smem = store_smem<HistogramSmem, kernel>(T, D);
    kernel<<<2 * n_jobs, kStoreThreads, smem, s>>>(jobs, T, D, hist, ready);
  });
  check_cuda(cudaGetLastError(), "histogram kernel launch");
}

void launch_measure(DType t, int warps, const StoreJob* jobs, int n_jobs, int T, int D, const CodebookTables* books,
                    uint32_t* sizes16, uint16_t* seg_bits, cudaStream_t s) {
  if (n_jobs == 0) return;
  by_warps(warps, [&](auto w) {
    constexpr int W = decltype(w)::value;
    by_type(t, [&](auto e) {
      constexpr auto kernel = measure_kernel<decltype(e), W>;
      const size_t smem = store_smem<MeasureSmem<W>, kernel>(T, D);
      kernel<<<2 * n_jobs, 32 * W, smem, s>>>(jobs, T, D, books, sizes16, seg_bits);
    });
  });
  check_cuda(cudaGetLastError(), "measure kernel launch");
}

void launch_encode(DType t, int warps, const StoreJob* jobs, int n_jobs, int T, int D, const CodebookTables* books,
                   const uint32_t* sizes16, const uint16_t* seg_bits, const uint32_t* pair_at16,
                   const int32_t* entry_ok, uint8_t* pool, format::BlockRef* table, cudaStream_t s) {
  if (n_jobs == 0) return;
  by_warps(warps, [&](auto w) {
    constexpr int W = decltype(w)::value;
    by_type(t, [&](auto e) {
      constexpr auto kernel = encode_kernel<decltype(e), W>;
      const size_t smem = store_smem<EncodeSmem<W>, kernel>(T, D);
      kernel<<<2 * n_jobs, 32 * W, smem, s>>>(jobs, T, D, books, sizes16, seg_bits, pair_at16, entry_ok, pool,
                                              table);
    });
  });
  check_cuda(cudaGetLastError(), "encode kernel launch");
}

void launch_tail_copy(DType t, int codes, const TailCopy* copies, int n, int D, const int32_t* entry_ok,
                      cudaStream_t s) {
  if (n == 0) return;
  by_type(t, [&](auto e) {
    if (codes) tail_code_copy_kernel<decltype(e)><<<n, 256, 0, s>>>(copies, D, codes, entry_ok);
    else tail_copy_kernel<decltype(e)><<<n, 256, 0, s>>>(copies, D, entry_ok);
  });
  check_cuda(cudaGetLastError(), "tail copy kernel launch");
}

void launch_place(const AppendEntry* entries, int n_entries, int layer, const uint32_t* sizes16, uint32_t* pair_at16,
                  int32_t* entry_ok, int32_t* page_base, const PoolState& pool, const SeqState& seqs, cudaStream_t s) {
  if (n_entries == 0) return;
  place_kernel<<<1, kPlaceThreads, 0, s>>>(entries, n_entries, layer, sizes16, pair_at16, entry_ok, page_base, pool,
                                           seqs);
  check_cuda(cudaGetLastError(), "place kernel launch");
}

void launch_release(int slot, const PoolState& pool, const SeqState& seqs, cudaStream_t s) {
  release_kernel<<<1, kReleaseThreads, 0, s>>>(slot, pool, seqs);
  check_cuda(cudaGetLastError(), "release kernel launch");
}

void launch_trim(const AppendEntry* entries, int n_entries, bool every_call, const WindowTrim& w,
                 const PoolState& pool, const SeqState& seqs, cudaStream_t s) {
  if (n_entries == 0) return;
  trim_kernel<<<1, kReleaseThreads, 0, s>>>(entries, n_entries, every_call, w, pool, seqs);
  check_cuda(cudaGetLastError(), "trim kernel launch");
}

void launch_fork(int parent, int child, const PoolState& pool, const SeqState& seqs, cudaStream_t s) {
  fork_kernel<<<1, kReleaseThreads, 0, s>>>(parent, child, pool, seqs);
  check_cuda(cudaGetLastError(), "fork kernel launch");
}

void launch_rollback(const int32_t* slots, const int32_t* counts, int batch, int slot, int n, int max_rollback,
                     int block_tokens, const SeqState& seqs, cudaStream_t s) {
  rollback_kernel<<<(batch + 127) / 128, 128, 0, s>>>(slots, counts, batch, slot, n, max_rollback, block_tokens, seqs);
  check_cuda(cudaGetLastError(), "rollback kernel launch");
}

void launch_layer_units(const PoolState& pool, int layers, unsigned long long* out, cudaStream_t s) {
  layer_units_kernel<<<layers, 256, 0, s>>>(pool, layers, out);
  check_cuda(cudaGetLastError(), "layer units kernel launch");
}

void launch_decode_jobs(const DecodeJobsParams& p, cudaStream_t s) {
  const int n = p.batch * p.g.tails.kv_heads;
  if (n == 0) return;
  decode_jobs_kernel<<<(n + 127) / 128, 128, 0, s>>>(p);
  check_cuda(cudaGetLastError(), "decode jobs kernel launch");
}

void launch_append_jobs(const AppendJobsParams& p, cudaStream_t s) {
  if (p.n_jobs == 0) return;
  append_jobs_kernel<<<(p.n_jobs + 255) / 256, 256, 0, s>>>(p);
  check_cuda(cudaGetLastError(), "append jobs kernel launch");
}

}  // namespace detail
}  // namespace kvcomp
