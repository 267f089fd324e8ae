// The launch functions: where host code (cache.cpp, tests, benchmarks) meets
// the device kernels in kernels/. Each checks its launch and throws
// kvcomp::Error on a CUDA error.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "kernels/attention_params.cuh"
#include "kernels/store_job.cuh"
#include "kvcomp/codebook.hpp"
#include "kvcomp/dtype.hpp"

namespace kvcomp {
namespace detail {

void check_cuda(cudaError_t e, const char* what);

// Store path. `jobs` and every pointer are device memory.
/// ready (device, may be null): a nonzero *ready skips the launch's work (the books are built).
void launch_histogram(DType t, const StoreJob* jobs, int n_jobs, int T, int D, unsigned long long* hist,
                      cudaStream_t s, const int32_t* ready = nullptr);
/// seg_bits: 2 n_jobs kMaxStoreSegments scratch, written by measure and read by encode; both
/// launches of one store take the same `warps` (kStoreWarps or kStoreWarpsFew: store_warps()).
void launch_measure(DType t, int warps, const StoreJob* jobs, int n_jobs, int T, int D, const CodebookTables* books,
                    uint32_t* sizes16, uint16_t* seg_bits, cudaStream_t s);
void launch_encode(DType t, int warps, const StoreJob* jobs, int n_jobs, int T, int D, const CodebookTables* books,
                   const uint32_t* sizes16, const uint16_t* seg_bits, const uint32_t* pair_at16,
                   const int32_t* entry_ok, uint8_t* pool, format::BlockRef* table, cudaStream_t s);
/// codes: 8 or 6, Codes8 / Codes6 tail rows (Config::tail_format); 0: rows of the input type.
void launch_tail_copy(DType t, int codes, const TailCopy* copies, int n, int D, const int32_t* entry_ok,
                      cudaStream_t s);
/// Plan-based decode: jobs, copies and entries of one append (kernels/decode_jobs.cuh).
void launch_decode_jobs(const DecodeJobsParams& p, cudaStream_t s);
/// Eager append: its jobs from its entries (kernels/append_jobs.cuh).
void launch_append_jobs(const AppendJobsParams& p, cudaStream_t s);

/// Config::transform = Hadamard (kernels/hadamard.cuh): dst[t][h] = src row
/// (t, h) R rounded to nearest in `type`, for `tokens` tokens of `heads`
/// heads; src row (t, h) starts at src + t * token_stride + h * head_stride
/// (elements), dst is contiguous [tokens][heads][D]. D in {64, 128, 256}.
void launch_hadamard_rows(DType type, int D, const void* src, int64_t token_stride, int64_t head_stride, int64_t tokens,
                          int heads, void* dst, cudaStream_t s);

// Fused attention (q/out in F16 or BF16; D in {64, 80, 96, 128, 256}; G in 1..kMaxGroup; rows padded to tiles of 8 or 16).
/// CTAs of the fused kernel (rows of `tile_rows`, `warps` warps a CTA) that
/// fit on one multiprocessor, for split planning; 0 where the shape has no
/// CTAs of that size (fused_cta_warps).
int attention_ctas_per_sm(int D, int G, int tile_rows, int warps);
/// Rows of (query, query head) pairs of a KV head one CTA holds: 16 (two mma row tiles sharing each
/// decoded block) when a sequence has more than 8 and D <= 128, else 8.
int attention_tile_rows(int D, int rows);
void launch_attention(DType q_type, int D, int G, const AttendParams& p, cudaStream_t s);

}  // namespace detail
}  // namespace kvcomp
