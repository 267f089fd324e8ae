// The Hadamard transform of Config::transform on the device: x -> x R,
// R = H_D / sqrt(D) (symmetric, orthonormal, its own inverse).
//
// One warp transforms one row of D = 32 E values, lane l holding elements
// l E .. l E + E - 1 in registers: butterfly stages h < E pair elements of one
// lane, stages h >= E pair lane l with lane l ^ (h / E) through a shuffle.
// The operations and their order are those of kvcomp::hadamard_row
// (include/kvcomp/transform.hpp), with round-to-nearest intrinsics so nvcc
// cannot contract or reorder them: results are bit-identical to the host's.
//
// Used by the append path (rows rotated into the cache's type before they are
// stored), by the fused attention kernel (q, in shared memory) and by its
// merge kernel (the output, rotated back).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "kvcomp/transform.hpp"

namespace kvcomp {
namespace detail {

/// x R for the warp's row (every lane of the warp must call it).
template <int E>
__device__ __forceinline__ void hadamard_warp(float (&x)[E]) {
  static_assert(E >= 1 && (E & (E - 1)) == 0, "D = 32 E must be a power of two");
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int h = 1; h < E; h <<= 1)  // partners in this lane
#pragma unroll
    for (int j = 0; j < E; ++j)
      if ((j & h) == 0) {
        const float a = x[j], b = x[j + h];
        x[j] = __fadd_rn(a, b);
        x[j + h] = __fsub_rn(a, b);
      }
#pragma unroll
  for (int m = 1; m < 32; m <<= 1) {  // stage h = m E: partner in lane ^ m
    const bool high = (lane & m) != 0;  // this lane holds the x[i + h] of its pairs
#pragma unroll
    for (int j = 0; j < E; ++j) {
      const float other = __shfl_xor_sync(0xFFFFFFFFu, x[j], m);
      x[j] = high ? __fsub_rn(other, x[j]) : __fadd_rn(x[j], other);
    }
  }
  const float s = hadamard_scale(32 * E);
#pragma unroll
  for (int j = 0; j < E; ++j) x[j] = __fmul_rn(x[j], s);
}

/// row[0..D) <- row R, in place; row in shared memory, called by one whole
/// warp. Each lane reads and writes only its own E elements (the exchange is
/// by shuffles): the caller synchronizes with whoever wrote or reads the row.
template <int D>
__device__ __forceinline__ void hadamard_row_shared(float* row) {
  constexpr int E = D / 32;
  const int lane = threadIdx.x % 32;
  float x[E];
#pragma unroll
  for (int j = 0; j < E; ++j) x[j] = row[lane * E + j];
  hadamard_warp<E>(x);
#pragma unroll
  for (int j = 0; j < E; ++j) row[lane * E + j] = x[j];
}

__device__ __forceinline__ float hadamard_load(const float* p) { return *p; }
__device__ __forceinline__ float hadamard_load(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float hadamard_load(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ void hadamard_store(float* p, float v) { *p = v; }
__device__ __forceinline__ void hadamard_store(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void hadamard_store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

constexpr int kHadamardWarps = 8;  // rows per CTA of hadamard_rows_kernel

/// dst[t][h][0..D) = src row (t, h) R, rounded to nearest in Elem, for
/// `tokens` tokens of `heads` heads; src row (t, h) starts at
/// src + t * token_stride + h * head_stride (elements), dst is contiguous.
/// grid: ceil(tokens * heads / kHadamardWarps) CTAs of 32 * kHadamardWarps threads.
template <typename Elem, int D>
__global__ void __launch_bounds__(32 * kHadamardWarps)
    hadamard_rows_kernel(const Elem* src, int64_t token_stride, int64_t head_stride, int64_t tokens, int heads,
                         Elem* dst) {
  constexpr int E = D / 32;
  const int lane = threadIdx.x % 32;
  const int64_t row = int64_t(blockIdx.x) * kHadamardWarps + threadIdx.x / 32;
  if (row >= tokens * heads) return;  // the whole warp: rows are warp-uniform
  const Elem* in = src + (row / heads) * token_stride + (row % heads) * head_stride + lane * E;
  float x[E];
#pragma unroll
  for (int j = 0; j < E; ++j) x[j] = hadamard_load(in + j);
  hadamard_warp<E>(x);
  Elem* out = dst + row * D + lane * E;
#pragma unroll
  for (int j = 0; j < E; ++j) hadamard_store(out + j, x[j]);
}

}  // namespace detail
}  // namespace kvcomp
