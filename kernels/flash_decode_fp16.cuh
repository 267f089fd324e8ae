// Baseline: fused fp16 flash-decoding over an uncompressed cache, with the
// same split structure, GQA sharing and merge as the kvcomp kernel, so the
// two differ only in where K/V come from. Layout: K, V [batch][kv_heads][N][D]
// by default (strides in FlashParams).
#pragma once

#include <cuda_fp16.h>

#include "decode_common.cuh"

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

/// 16-byte asynchronous copy global -> shared (bypasses L1: every byte is read once).
__device__ __forceinline__ void cp_async16(void* smem_dst, const void* gmem_src) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem_src));
}
__device__ __forceinline__ void cp_async_wait_all() {
  asm volatile("cp.async.commit_group;\ncp.async.wait_group 0;\n" ::: "memory");
}

/// Each warp takes 32-token chunks; all loads of a chunk are started at once
/// and one chunk ahead: the V rows go to the warp's shared-memory buffer by
/// cp.async (coalesced 16-byte pieces), lane l's K row to registers (D / 8
/// 16-byte loads). Per chunk c: score K(c); start K(c+1) into the same
/// registers; softmax; wait for V(c) and accumulate it; start V(c+1). So K
/// loads overlap the softmax and V work, V loads the next scoring. (Loading V
/// two bytes per lane per token, serially, gave 1.9 TB/s at 32k x 8.)
template <int D, int G>
__global__ void __launch_bounds__(32 * kAttnWarps) flash_decode_fp16_kernel(const __grid_constant__ FlashParams p) {
  constexpr int kPerLane = D / 32;
  constexpr int kRowVecs = D / 8;                      // 16-byte pieces per row
  constexpr int kVBufHalves = 32 * D;                  // one chunk of V rows, per warp
  constexpr int kMergeFloats = kAttnWarps * G * (D + 2);
  constexpr int kVBufBytes = kAttnWarps * kVBufHalves * 2;
  constexpr int kSharedBytes = kVBufBytes > kMergeFloats * 4 ? kVBufBytes : kMergeFloats * 4;
  __shared__ __align__(16) float q_s[G * D];
  __shared__ __align__(16) unsigned char shared[kSharedBytes];  // V buffers, then the CTA merge
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int split = blockIdx.x, head = blockIdx.y, b = blockIdx.z;
  const int q_heads = p.kv_heads * G;
  for (int i = threadIdx.x; i < G * D; i += blockDim.x)
    q_s[i] = __half2float(p.q[(size_t(b) * q_heads + size_t(head) * G) * D + i]) * p.scale_log2;
  __syncthreads();
  const size_t base = size_t(b) * p.seq_stride + size_t(head) * p.head_stride;
  const __half* K = p.k + base;
  const __half* V = p.v + base;
  __half* v_s = reinterpret_cast<__half*>(shared) + size_t(warp) * kVBufHalves;
  const int chunks = (p.tokens + 31) / 32;
  const int c_begin = split * p.units_per_split, c_end = min(chunks, c_begin + p.units_per_split);
  auto rows_of = [&](int chunk) { return min(32, p.tokens - chunk * 32); };
  auto start_v = [&](int chunk) {  // V rows of `chunk` -> v_s (only the rows that exist)
    const uint4* src = reinterpret_cast<const uint4*>(V + size_t(chunk) * 32 * D);
    for (int i = lane; i < rows_of(chunk) * kRowVecs; i += 32) cp_async16(reinterpret_cast<uint4*>(v_s) + i, src + i);
  };
  uint4 krow[kRowVecs];
  auto start_k = [&](int chunk) {  // K row of this lane's token of `chunk` -> krow
    if (lane < rows_of(chunk)) {
      const uint4* kr = reinterpret_cast<const uint4*>(K + (size_t(chunk) * 32 + lane) * D);
#pragma unroll
      for (int c8 = 0; c8 < kRowVecs; ++c8) krow[c8] = __ldg(kr + c8);
    }
  };
  SoftmaxAcc<D, G> st;
  st.init();
  if (c_begin + warp < c_end) {
    start_v(c_begin + warp);
    start_k(c_begin + warp);
  }
  for (int chunk = c_begin + warp; chunk < c_end; chunk += kAttnWarps) {
    const int n = rows_of(chunk), next = chunk + kAttnWarps;
    const bool valid = lane < n;
    float s[G];
#pragma unroll
    for (int g = 0; g < G; ++g) s[g] = 0.f;
    if (valid) {
#pragma unroll
      for (int c8 = 0; c8 < kRowVecs; ++c8) {
        const __half2* h2 = reinterpret_cast<const __half2*>(&krow[c8]);
#pragma unroll
        for (int k = 0; k < 4; k += 2) {  // 4 channels per q load (LDS.128, a warp broadcast)
          const float2 ka = __half22float2(h2[k]), kb = __half22float2(h2[k + 1]);
#pragma unroll
          for (int g = 0; g < G; ++g) {
            const float4 qg = *reinterpret_cast<const float4*>(q_s + g * D + 8 * c8 + 2 * k);
            s[g] = fmaf(qg.x, ka.x, fmaf(qg.y, ka.y, s[g]));
            s[g] = fmaf(qg.z, kb.x, fmaf(qg.w, kb.y, s[g]));
          }
        }
      }
    }
    if (next < c_end) start_k(next);
    float pr[G];
    st.update(s, valid, pr);
    cp_async_wait_all();
    __syncwarp();
    for (int t = 0; t < n; ++t) {
      float pt[G];
#pragma unroll
      for (int g = 0; g < G; ++g) pt[g] = __shfl_sync(0xFFFFFFFFu, pr[g], t);
      // Lane l reads channels 64 i + 2 l, 64 i + 2 l + 1 as one half2 (acc in write_split_partial's kPairs order).
      const __half2* vr = reinterpret_cast<const __half2*>(v_s + t * D);
#pragma unroll
      for (int i = 0; i < kPerLane / 2; ++i) {
        const float2 v = __half22float2(vr[32 * i + lane]);
#pragma unroll
        for (int g = 0; g < G; ++g) {
          st.acc[g][2 * i] = fmaf(pt[g], v.x, st.acc[g][2 * i]);
          st.acc[g][2 * i + 1] = fmaf(pt[g], v.y, st.acc[g][2 * i + 1]);
        }
      }
    }
    __syncwarp();  // every lane is done with v_s before it is refilled
    if (next < c_end) start_v(next);
  }
  __syncthreads();  // the merge reuses the V buffers
  write_split_partial<D, G, /*kPairs=*/true>(st, reinterpret_cast<float*>(shared),
                            p.part + (size_t(b) * q_heads + size_t(head) * G) * p.splits * (D + 2), p.splits, split);
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
