// Baseline: KIVI-style fixed-width quantized KV cache (no entropy coding) and
// its fused decode-attention kernel, built like the kvcomp kernel (same split,
// GQA sharing, softmax and merge) so the two differ only in the storage.
//
// Quantization (KIVI): groups of 32; K per channel over 32 tokens, V per token
// over 32 channels; per group fp16 scale = (max - min) / (2^bits - 1) and
// fp16 zero = min; code = clamp(rint((x - zero) / scale), 0, 2^bits - 1);
// x' = code * scale + zero. The last `window` + (0..31) tokens stay fp16.
//
// Layout per (sequence b, kv head h), chunk c of 32 tokens, W = D * bits / 32:
//   codes  [b][h][c][w][lane] uint32, both K and V (coalesced per word):
//     K: lane = token; its D codes in channel order, 32/bits per word;
//     V: lane l; codes for t = 0..31, channels l, l+32, ... in that order.
//   k_prm  [b][h][c][D]          half2 (scale, zero) per channel
//   v_prm  [b][h][c][32][D/32]   half2 (scale, zero) per token and 32-channel group
//   tails  [b][h][tail_cap][D]   fp16, the unquantized recent tokens
#pragma once

#include <cuda_fp16.h>

#include <cstdint>

#include "decode_common.cuh"
#include "kivi_params.cuh"

namespace kvcomp {
namespace detail {


template <int BITS>
struct KiviBits {
  static constexpr int kPerWord = 32 / BITS;
  static constexpr uint32_t kMask = (1u << BITS) - 1;
  static constexpr float kMaxCode = float((1 << BITS) - 1);
};

/// float(code) for a code below 2^23: exact, no conversion instruction.
__device__ __forceinline__ float code_to_float(uint32_t code) {
  return __uint_as_float(0x4B000000u | code) - 8388608.f;
}

/// The KIVI group quantizer (host reference: src/kivi_reference.cpp, same arithmetic).
struct KiviGroup {
  float scale, zero;
  __host__ __device__ static KiviGroup make(float lo, float hi, float max_code, __half2& stored) {
    stored = __halves2half2(__float2half_rn((hi - lo) / max_code), __float2half_rn(lo));
    return {__low2float(stored), __high2float(stored)};
  }
  __host__ __device__ uint32_t code(float x, float max_code) const {
    if (!(scale > 0.f)) return 0;
    const float c = rintf((x - zero) / scale);
    return uint32_t(fminf(fmaxf(c, 0.f), max_code));
  }
};

/// One warp per (chunk, head, sequence): quantizes K and V of 32 tokens.
/// k, v: fp16 [batch][kv_heads][tokens][D]. grid (chunks, kv_heads, batch), 32 threads.
template <int D, int BITS>
__global__ void kivi_quantize_kernel(const __half* k, const __half* v, int tokens, KiviParams p) {
  using B = KiviBits<BITS>;
  constexpr int W = D * BITS / 32, kPerLane = D / 32;
  const int lane = threadIdx.x, c = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const size_t seq = size_t(b) * p.kv_heads + h;
  const size_t chunk = seq * p.chunks + c;
  const __half* K = k + (seq * tokens + size_t(c) * 32) * D;
  const __half* V = v + (seq * tokens + size_t(c) * 32) * D;
  uint32_t words[W];
  // K: lane = token; per channel, the group is the 32 lanes.
#pragma unroll
  for (int w = 0; w < W; ++w) words[w] = 0;
  for (int ch = 0; ch < D; ++ch) {
    const float x = __half2float(K[size_t(lane) * D + ch]);
    const float lo = -warp_max(-x), hi = warp_max(x);
    __half2 stored;
    const KiviGroup g = KiviGroup::make(lo, hi, B::kMaxCode, stored);
    if (lane == ch % 32) p.k_prm[chunk * D + ch] = stored;
    words[ch / B::kPerWord] |= g.code(x, B::kMaxCode) << (ch % B::kPerWord * BITS);
  }
#pragma unroll
  for (int w = 0; w < W; ++w) p.k_codes[(chunk * W + w) * 32 + lane] = words[w];
  // V: lane l holds channels l + 32j; the group of (t, j) is the 32 lanes.
#pragma unroll
  for (int w = 0; w < W; ++w) words[w] = 0;
  for (int t = 0; t < 32; ++t) {
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      const float x = __half2float(V[size_t(t) * D + lane + 32 * j]);
      const float lo = -warp_max(-x), hi = warp_max(x);
      __half2 stored;
      const KiviGroup g = KiviGroup::make(lo, hi, B::kMaxCode, stored);
      if (lane == 0) p.v_prm[(chunk * 32 + t) * kPerLane + j] = stored;
      const int i = t * kPerLane + j;
      words[i / B::kPerWord] |= g.code(x, B::kMaxCode) << (i % B::kPerWord * BITS);
    }
  }
#pragma unroll
  for (int w = 0; w < W; ++w) p.v_codes[(chunk * W + w) * 32 + lane] = words[w];
}

/// Shared memory: q [G][D] floats, then per warp q x K scale [D][G] and V
/// (scale, zero) [32][D/32] as float2; the CTA merge reuses the warp area.
template <int D, int G>
struct KiviSmem {
  static constexpr size_t kQ = size_t(G) * D * sizeof(float);
  static constexpr size_t kWarp = size_t(D) * G * sizeof(float) + size_t(32) * (D / 32) * sizeof(float2);
  static constexpr size_t kWarps = kAttnWarps * kWarp;
  static constexpr size_t kMerge = size_t(kAttnWarps) * G * (D + 2) * sizeof(float);
  static constexpr size_t kBytes = kQ + (kWarps > kMerge ? kWarps : kMerge);
  static_assert(kBytes <= 48 * 1024, "launches need no shared-memory opt-in");
};

/// grid (splits, kv_heads, batch); units are 32-token chunks, quantized ones
/// first, then the fp16 tail. Same partial/merge protocol as the kvcomp kernel.
template <int D, int G, int BITS>
__global__ void __launch_bounds__(32 * kAttnWarps)
    kivi_attention_kernel(const __grid_constant__ KiviParams p, const __half* q_in, float* part, int units_per_split,
                          int splits, float scale_log2) {
  using B = KiviBits<BITS>;
  using Smem = KiviSmem<D, G>;
  constexpr int W = D * BITS / 32, kPerLane = D / 32;
  extern __shared__ __align__(16) uint8_t smem[];
  float* q_s = reinterpret_cast<float*>(smem);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* qscale = reinterpret_cast<float*>(smem + Smem::kQ + warp * Smem::kWarp);  // [D][G]
  float2* vprm = reinterpret_cast<float2*>(qscale + D * G);                         // [32][D/32]
  const int split = blockIdx.x, head = blockIdx.y, b = blockIdx.z;
  const int q_heads = p.kv_heads * G;
  const __half* q = q_in + (size_t(b) * q_heads + size_t(head) * G) * D;
  for (int i = threadIdx.x; i < G * D; i += blockDim.x) q_s[i] = __half2float(q[i]) * scale_log2;
  __syncthreads();

  const size_t seq = size_t(b) * p.kv_heads + head;
  const int units = p.chunks + (p.tail + 31) / 32;
  const int u_begin = split * units_per_split, u_end = min(units, u_begin + units_per_split);
  SoftmaxAcc<D, G> st;
  st.init();
  for (int u = u_begin + warp; u < u_end; u += kAttnWarps) {
    if (u < p.chunks) {
      const size_t chunk = seq * p.chunks + u;
      uint32_t kw[W], vw[W];
#pragma unroll
      for (int w = 0; w < W; ++w) {
        kw[w] = __ldg(p.k_codes + (chunk * W + w) * 32 + lane);
        vw[w] = __ldg(p.v_codes + (chunk * W + w) * 32 + lane);
      }
      // Scores = sum_c q_c (code_c scale_c + zero_c) = qzero + sum_c (q_c scale_c) code_c.
      float qzero[G];
#pragma unroll
      for (int g = 0; g < G; ++g) qzero[g] = 0.f;
#pragma unroll
      for (int j = 0; j < kPerLane; ++j) {
        const int c = lane + 32 * j;
        const float2 sz = __half22float2(p.k_prm[chunk * D + c]);
#pragma unroll
        for (int g = 0; g < G; ++g) {
          qscale[c * G + g] = q_s[g * D + c] * sz.x;
          qzero[g] = fmaf(q_s[g * D + c], sz.y, qzero[g]);
        }
        vprm[lane * kPerLane + j] = __half22float2(p.v_prm[(chunk * 32 + lane) * kPerLane + j]);
      }
#pragma unroll
      for (int g = 0; g < G; ++g) qzero[g] = warp_sum(qzero[g]);
      __syncwarp();
      float s[G];
#pragma unroll
      for (int g = 0; g < G; ++g) s[g] = qzero[g];
#pragma unroll
      for (int c = 0; c < D; c += 2) {
        const float c0 = code_to_float((kw[c / B::kPerWord] >> (c % B::kPerWord * BITS)) & B::kMask);
        const float c1 = code_to_float((kw[(c + 1) / B::kPerWord] >> ((c + 1) % B::kPerWord * BITS)) & B::kMask);
        float qs[2 * G];
        load_vec<2 * G>(qscale + c * G, qs);
#pragma unroll
        for (int g = 0; g < G; ++g) s[g] = fmaf(qs[G + g], c1, fmaf(qs[g], c0, s[g]));
      }
      float pr[G];
      st.update(s, true, pr);
#pragma unroll
      for (int t = 0; t < 32; ++t) {
        float pt[G];
#pragma unroll
        for (int g = 0; g < G; ++g) pt[g] = __shfl_sync(0xFFFFFFFFu, pr[g], t);
#pragma unroll
        for (int j = 0; j < kPerLane; ++j) {
          const int i = t * kPerLane + j;
          const float2 sz = vprm[i];
          const float x = fmaf(code_to_float((vw[i / B::kPerWord] >> (i % B::kPerWord * BITS)) & B::kMask), sz.x, sz.y);
#pragma unroll
          for (int g = 0; g < G; ++g) st.acc[g][j] = fmaf(pt[g], x, st.acc[g][j]);
        }
      }
      __syncwarp();
    } else {  // the fp16 window
      const int first = (u - p.chunks) * 32;
      const __half* kt = p.k_tail + (seq * p.tail_cap + first) * D;
      const __half* vt = p.v_tail + (seq * p.tail_cap + first) * D;
      attend_rows<D, G>(st, q_s, kt, vt, min(32, p.tail - first));
    }
  }
  __syncthreads();
  write_split_partial<D, G>(st, reinterpret_cast<float*>(smem + Smem::kQ),
                            part + (size_t(b) * q_heads + size_t(head) * G) * splits * (D + 2), splits, split);
}

}  // namespace detail
}  // namespace kvcomp
