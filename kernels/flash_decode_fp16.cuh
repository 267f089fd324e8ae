// Baseline: fused fp16 flash-decoding over an uncompressed cache, with the
// same split structure, GQA sharing and merge as the kvcomp kernel, so the
// two differ only in where K/V come from. Layout: K, V [batch][kv_heads][N][D]
// by default (strides in FlashParams).
#pragma once

#include <cuda_fp16.h>

#include "attention.cuh"

namespace kvcomp {
namespace detail {

struct FlashParams {
  const __half* k;
  const __half* v;
  const __half* q;   // [batch][q_heads][D]
  __half* out;
  float* part;       // [batch][q_heads][splits][D + 2]
  int32_t tokens;    // N, the same for every sequence
  int32_t kv_heads;
  int32_t units_per_split;  // 32-token chunks per CTA
  int32_t splits;
  float scale_log2;
  int64_t seq_stride;   // elements between sequences (0: all share one)
  int64_t head_stride;  // elements between kv heads
};

template <int D, int G>
__global__ void __launch_bounds__(32 * kAttnWarps) flash_decode_fp16_kernel(const __grid_constant__ FlashParams p) {
  constexpr int kPerLane = D / 32;
  __shared__ __align__(16) float q_s[G * D];
  __shared__ float merge[kAttnWarps * G * (D + 2)];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int split = blockIdx.x, head = blockIdx.y, b = blockIdx.z;
  const int q_heads = p.kv_heads * G;
  for (int i = threadIdx.x; i < G * D; i += blockDim.x)
    q_s[i] = __half2float(p.q[(size_t(b) * q_heads + size_t(head) * G) * D + i]) * p.scale_log2;
  __syncthreads();
  const size_t base = size_t(b) * p.seq_stride + size_t(head) * p.head_stride;
  const __half* K = p.k + base;
  const __half* V = p.v + base;
  const int chunks = (p.tokens + 31) / 32;
  const int c_begin = split * p.units_per_split, c_end = min(chunks, c_begin + p.units_per_split);
  SoftmaxAcc<D, G> st;
  st.init();
  for (int chunk = c_begin + warp; chunk < c_end; chunk += kAttnWarps) {
    const int row = chunk * 32 + lane;
    const bool valid = row < p.tokens;
    float s[G];
#pragma unroll
    for (int g = 0; g < G; ++g) s[g] = 0.f;
    if (valid) {
      const uint4* kr = reinterpret_cast<const uint4*>(K + size_t(row) * D);
#pragma unroll 4
      for (int c8 = 0; c8 < D / 8; ++c8) {
        const uint4 raw = __ldg(kr + c8);
        const __half2* h2 = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const float2 kv = __half22float2(h2[k]);
#pragma unroll
          for (int g = 0; g < G; ++g) {
            const float* qg = q_s + g * D + 8 * c8 + 2 * k;
            s[g] = fmaf(qg[0], kv.x, fmaf(qg[1], kv.y, s[g]));
          }
        }
      }
    }
    float pr[G];
    st.update(s, valid, pr);
    const int n = min(32, p.tokens - chunk * 32);
    for (int t = 0; t < n; ++t) {
      float pt[G];
#pragma unroll
      for (int g = 0; g < G; ++g) pt[g] = __shfl_sync(0xFFFFFFFFu, pr[g], t);
      const __half* vr = V + size_t(chunk * 32 + t) * D;
#pragma unroll
      for (int j = 0; j < kPerLane; ++j) {
        const float v = __half2float(vr[lane + 32 * j]);
#pragma unroll
        for (int g = 0; g < G; ++g) st.acc[g][j] = fmaf(pt[g], v, st.acc[g][j]);
      }
    }
  }
  write_split_partial<D, G>(st, merge, p.part + (size_t(b) * q_heads + size_t(head) * G) * p.splits * (D + 2),
                            p.splits, split);
}

/// cuBLAS baseline's softmax: scores [rows][N] fp32 (already scaled) -> P fp16.
__global__ void softmax_rows_kernel(const float* scores, __half* probs, int n) {
  const float* s = scores + size_t(blockIdx.x) * n;
  __half* pr = probs + size_t(blockIdx.x) * n;
  __shared__ float red[32];
  float m = -INFINITY;
  for (int i = threadIdx.x; i < n; i += blockDim.x) m = fmaxf(m, s[i]);
  m = warp_max(m);
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = m;
  __syncthreads();
  m = -INFINITY;
  for (int w = 0; w < int(blockDim.x / 32); ++w) m = fmaxf(m, red[w]);
  __syncthreads();
  float sum = 0.f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) sum += __expf(s[i] - m);
  sum = warp_sum(sum);
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = sum;
  __syncthreads();
  sum = 0.f;
  for (int w = 0; w < int(blockDim.x / 32); ++w) sum += red[w];
  const float inv = 1.f / sum;
  for (int i = threadIdx.x; i < n; i += blockDim.x) pr[i] = __float2half_rn(__expf(s[i] - m) * inv);
}

}  // namespace detail
}  // namespace kvcomp
