// Pieces shared by every decode-attention kernel (kvcomp's fused kernel, the
// KIVI kernel, the fp16 flash-decoding baseline): element loads, the online
// softmax of one warp, uncompressed rows, the per-CTA split partial and the
// flash-decoding merge of the splits.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "attention_params.cuh"
#include "hadamard.cuh"
#include "kvcomp/tail_codes.hpp"

namespace kvcomp {
namespace detail {

__device__ __forceinline__ float load_q(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float load_q(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ void store_out(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store_out(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xFFFFFFFFu, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
  return v;
}

/// Running softmax state of one warp for G query heads (flash attention).
template <int D, int G>
struct SoftmaxAcc {
  static constexpr int kPerLane = (D + 31) / 32;  // D = 80: the last of them only on lanes 0..15
  float m[G];               // running max (log2 domain), warp-uniform
  float l[G];               // this lane's share of the running sum
  float acc[G][kPerLane];   // output channels lane, lane+32, ... (below D)

  __device__ void init() {
#pragma unroll
    for (int g = 0; g < G; ++g) {
      m[g] = -INFINITY;
      l[g] = 0.f;
#pragma unroll
      for (int j = 0; j < kPerLane; ++j) acc[g][j] = 0.f;
    }
  }
  /// Folds this chunk's scores in; returns p (this lane's token) per head.
  /// A score of -inf is a masked token: p = 0. A head that has seen only
  /// masked tokens keeps m = -inf and its sums 0 (it subtracts 0, as
  /// -inf - -inf would be NaN).
  __device__ void update(const float (&s)[G], bool valid, float (&p)[G]) {
#pragma unroll
    for (int g = 0; g < G; ++g) {
      const float sv = valid ? s[g] : -INFINITY;
      const float m_new = fmaxf(m[g], warp_max(sv));
      const float m_sub = m_new == -INFINITY ? 0.f : m_new;
      const float corr = exp2f(m[g] - m_sub);
      p[g] = valid ? exp2f(sv - m_sub) : 0.f;
      l[g] = l[g] * corr + p[g];
#pragma unroll
      for (int j = 0; j < kPerLane; ++j) acc[g][j] *= corr;
      m[g] = m_new;
    }
  }
};

/// One chunk's step of the online softmax of a row whose scores a quad of
/// lanes holds (the mma's score layout): the quad's max of `cmax` and the
/// running max m give the new max, the factor the row's sums so far are
/// scaled by, and what p = exp2(s - sub) subtracts. A row that has seen only
/// masked tokens keeps max = -inf; it subtracts 0 instead (p = 0, factor 0:
/// its sums are 0), as -inf - -inf would be NaN.
struct QuadSoftmaxStep {
  float max, scale, sub;
};
__device__ __forceinline__ QuadSoftmaxStep quad_softmax_step(float m, float cmax) {
  cmax = fmaxf(cmax, __shfl_xor_sync(0xFFFFFFFFu, cmax, 1));
  cmax = fmaxf(cmax, __shfl_xor_sync(0xFFFFFFFFu, cmax, 2));
  const float m_new = fmaxf(m, cmax);
  const float m_sub = m_new == -INFINITY ? 0.f : m_new;
  return {m_new, exp2f(m - m_sub), m_sub};
}

/// One output element d merged over a CTA's warps: row(w) points to warp w's
/// partial row [acc[0..D), max, sum] (max in log2 units, -inf when the warp
/// saw no token); each warp weighs exp2(its max - the max).
struct MergedElement {
  float acc, max, sum;
};
template <int kWarps, typename Row>
__device__ __forceinline__ MergedElement merge_warps(Row&& row, int D, int d) {
  MergedElement e{0.f, -INFINITY, 0.f};
#pragma unroll
  for (int w = 0; w < kWarps; ++w) e.max = fmaxf(e.max, row(w)[D]);
  if (e.max == -INFINITY) return e;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    const float* r = row(w);
    if (r[D] == -INFINITY) continue;
    const float f = exp2f(r[D] - e.max);
    e.acc += r[d] * f;
    e.sum += r[D + 1] * f;
  }
  return e;
}
/// Element d of a split's partial row (acc[D], max, sum): the max and sum go with d = 0.
__device__ __forceinline__ void write_partial(float* out, int D, int d, const MergedElement& e) {
  out[d] = e.acc;
  if (d == 0) {
    out[D] = e.max;
    out[D + 1] = e.sum;
  }
}

/// Four consecutive elements of an uncompressed row as float (16- or 8-byte aligned).
__device__ __forceinline__ float4 load4(const float* p) { return *reinterpret_cast<const float4*>(p); }
__device__ __forceinline__ float4 load4(const __half* p) {
  const uint2 raw = *reinterpret_cast<const uint2*>(p);
  const float2 a = __half22float2(*reinterpret_cast<const __half2*>(&raw.x));
  const float2 b = __half22float2(*reinterpret_cast<const __half2*>(&raw.y));
  return make_float4(a.x, a.y, b.x, b.y);
}
__device__ __forceinline__ float4 load4(const __nv_bfloat16* p) {
  const uint2 raw = *reinterpret_cast<const uint2*>(p);
  const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.x));
  const float2 b = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.y));
  return make_float4(a.x, a.y, b.x, b.y);
}
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

struct AllVisible {
  __device__ bool operator()(int, int) const { return true; }
};

/// The fused kernel's tail rows, row t at p + t row_bytes: D elements of E, or
/// with `codes` (8 or 6 code bits) a Codes8 / Codes6 row (kvcomp/tail_codes.hpp:
/// D codes, then lo and step as E), read as 8-bit codes. One type for all,
/// so that attend_rows is instantiated once; its loops run one branch-free
/// copy per row kind (the kCodes arguments).
template <typename E, int D>
struct TailRows {
  const uint8_t* p;
  int row_bytes;
  int codes;  // 0: rows of E; 8 or 6: code bits
  /// The raw bits of 4 channels: 4 codes (8-bit), or 4 elements of E.
  template <bool kCodes>
  using Raw = std::conditional_t<kCodes, uint32_t, std::conditional_t<sizeof(E) == 2, uint2, uint4>>;
  /// One row, its params read once.
  struct Row {
    const uint8_t* r;
    float lo, step;
    int bits;
    template <bool kCodes>
    __device__ __forceinline__ Raw<kCodes> load(int c) const {  // channels c .. c + 3 (c a multiple of 4)
      if constexpr (kCodes) return format::tail_quad8(r, c, bits);
      else return *reinterpret_cast<const Raw<kCodes>*>(r + c * int(sizeof(E)));
    }
    template <bool kCodes>
    __device__ __forceinline__ float4 decode(const Raw<kCodes>& w) const {
      if constexpr (kCodes) {
        return make_float4(format::tail_value(w & 0xFFu, lo, step), format::tail_value((w >> 8) & 0xFFu, lo, step),
                           format::tail_value((w >> 16) & 0xFFu, lo, step), format::tail_value(w >> 24, lo, step));
      } else {
        return load4(reinterpret_cast<const E*>(&w));
      }
    }
    template <bool kCodes>
    __device__ __forceinline__ uint32_t load1(int c) const {  // channel c's raw bits
      if constexpr (kCodes) return format::tail_code8(r, c, bits);
      else if constexpr (sizeof(E) == 2) return reinterpret_cast<const uint16_t*>(r)[c];
      else return reinterpret_cast<const uint32_t*>(r)[c];
    }
    template <bool kCodes>
    __device__ __forceinline__ float decode1(uint32_t w) const {
      if constexpr (kCodes) return format::tail_value(w, lo, step);
      else if constexpr (sizeof(E) == 2) return to_float(*reinterpret_cast<const E*>(&w));
      else return __uint_as_float(w);
    }
  };
  template <bool kCodes>
  __device__ __forceinline__ Row open(int t) const {
    Row w{p + size_t(t) * row_bytes, 0.f, 0.f, codes};
    if constexpr (kCodes) {
      const E* prm = reinterpret_cast<const E*>(w.r + format::tail_code_bytes(D, codes));
      w.lo = to_float(prm[0]);
      w.step = to_float(prm[1]);
    }
    return w;
  }
};

/// Attends one warp to n <= 32 uncompressed tokens (an uncompressed tail or
/// window): rows k.open(t), v.open(t) (TailRows); lane l scores row l against
/// q_s ([G][D], log2 units), the chunk is folded into the softmax, p.V
/// accumulated. visible(g, t): whether head g sees row t (causal and window
/// masks). The loads are issued in batches (8 units of 4 channels of a row;
/// 4 tokens' V) before their values are used: one at a time, each waited out
/// its latency (a 63-token tail cost ~42 us at 1k x 1, where the blocks took
/// ~26 us).
template <int D, int G, typename Rows, typename Visible = AllVisible>
__device__ void attend_rows(SoftmaxAcc<D, G>& st, const float* q_s, const Rows& k, const Rows& v, int n,
                            Visible visible = {}) {
  const int lane = threadIdx.x % 32;
  float s[G], pr[G];
#pragma unroll
  for (int g = 0; g < G; ++g) s[g] = 0.f;
  auto scores = [&](auto codes_tag) {
    constexpr bool kCodes = decltype(codes_tag)::value;
    const auto row = k.template open<kCodes>(lane);
    constexpr int kBatch = 8;  // units of 4 channels
#pragma unroll 1
    for (int c0 = 0; c0 < D; c0 += 4 * kBatch) {
      typename Rows::template Raw<kCodes> raw[kBatch];
#pragma unroll
      for (int u = 0; u < kBatch; ++u)
        if (D % (4 * kBatch) == 0 || c0 + 4 * u < D) raw[u] = row.template load<kCodes>(c0 + 4 * u);
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        if (D % (4 * kBatch) != 0 && c0 + 4 * u >= D) break;
        const float4 x = row.template decode<kCodes>(raw[u]);
#pragma unroll
        for (int g = 0; g < G; ++g) {
          const float* qg = q_s + g * D + c0 + 4 * u;
          s[g] = fmaf(qg[0], x.x, fmaf(qg[1], x.y, fmaf(qg[2], x.z, fmaf(qg[3], x.w, s[g]))));
        }
      }
    }
  };
  if (lane < n) {
    if (k.codes) scores(std::true_type{});
    else scores(std::false_type{});
#pragma unroll
    for (int g = 0; g < G; ++g)
      if (!visible(g, lane)) s[g] = -INFINITY;
  }
  st.update(s, lane < n, pr);
  constexpr int kPer = SoftmaxAcc<D, G>::kPerLane;
  auto values = [&](auto codes_tag) {
    constexpr bool kCodes = decltype(codes_tag)::value;
    constexpr int kTok = G <= 4 ? 8 : 4;  // tokens whose loads are in flight together (more rows: registers)
#pragma unroll 1
    for (int t0 = 0; t0 < n; t0 += kTok) {
      typename Rows::Row rows[kTok];
      uint32_t raw[kTok][kPer];
#pragma unroll
      for (int i = 0; i < kTok; ++i) {
        rows[i] = v.template open<kCodes>(min(t0 + i, n - 1));  // past n: the last row again, unused
#pragma unroll
        for (int j = 0; j < kPer; ++j)
          if (D % 32 == 0 || lane + 32 * j < D) raw[i][j] = rows[i].template load1<kCodes>(lane + 32 * j);
      }
#pragma unroll
      for (int i = 0; i < kTok; ++i) {
        if (t0 + i >= n) break;  // warp-uniform; the rows loaded past n (copies of row n - 1) are not used
        float pt[G];
#pragma unroll
        for (int g = 0; g < G; ++g) pt[g] = __shfl_sync(0xFFFFFFFFu, pr[g], t0 + i);
#pragma unroll
        for (int j = 0; j < kPer; ++j) {
          if (D % 32 != 0 && lane + 32 * j >= D) break;
          const float x = rows[i].template decode1<kCodes>(raw[i][j]);
#pragma unroll
          for (int g = 0; g < G; ++g) st.acc[g][j] = fmaf(pt[g], x, st.acc[g][j]);
        }
      }
    }
  };
  if (v.codes) values(std::true_type{});
  else values(std::false_type{});
}

/// x[0..N) from 16-byte aligned shared memory, in the widest loads.
template <int N>
__device__ __forceinline__ void load_vec(const float* p, float (&x)[N]) {
  if constexpr (N % 4 == 0) {
#pragma unroll
    for (int i = 0; i < N / 4; ++i) {
      const float4 v = reinterpret_cast<const float4*>(p)[i];
      x[4 * i] = v.x; x[4 * i + 1] = v.y; x[4 * i + 2] = v.z; x[4 * i + 3] = v.w;
    }
  } else if constexpr (N == 2) {
    const float2 v = *reinterpret_cast<const float2*>(p);
    x[0] = v.x; x[1] = v.y;
  } else {
    static_assert(N == 1, "1, 2 or a multiple of 4");
    x[0] = *p;
  }
}

/// A split kernel lets the merge launched after it (src/merge_launch.hpp: a
/// programmatic dependent launch) start its CTAs now; they wait for its end.
__device__ __forceinline__ void allow_dependent_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

/// Waits until the kernel before this one on the stream (when this one was a
/// programmatic dependent launch) has finished and its writes are visible; a
/// no-op otherwise.
__device__ __forceinline__ void wait_for_prior_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

/// Combines the splits: out = sum_s A_s 2^(m_s - M) / sum_s L_s 2^(m_s - M).
/// grid: batch * q_heads CTAs of D threads. A sequence with no tokens gives 0.
/// rotate_back (Config::transform = Hadamard): V was stored as v R, so the
/// merged row is o R; it is multiplied by R once more (R R = I) before output.
template <typename QT, int D>
__global__ void merge_kernel(const float* part, int splits, QT* out, bool rotate_back = false) {
  wait_for_prior_grid();  // the split kernel's partials
  const size_t bh = blockIdx.x;
  const float* base = part + bh * splits * (D + 2);
  float M = -INFINITY;
  for (int s = 0; s < splits; ++s) M = fmaxf(M, base[s * (D + 2) + D]);
  float num = 0.f, den = 0.f;
  if (M != -INFINITY) {
    for (int s = 0; s < splits; ++s) {
      const float m = base[s * (D + 2) + D];
      if (m == -INFINITY) continue;
      const float f = exp2f(m - M);
      num += base[s * (D + 2) + threadIdx.x] * f;
      den += base[s * (D + 2) + D + 1] * f;
    }
  }
  float o = den > 0.f ? num / den : 0.f;
  if constexpr ((D & (D - 1)) == 0) {  // the Hadamard transform needs a power of two (Config checks)
    if (rotate_back) {                   // uniform over the launch
      __shared__ float row[D];
      row[threadIdx.x] = o;
      __syncthreads();
      if (threadIdx.x < 32) hadamard_row_shared<D>(row);
      __syncthreads();
      o = row[threadIdx.x];
    }
  }
  store_out(out + bh * D + threadIdx.x, o);
}

}  // namespace detail
}  // namespace kvcomp
