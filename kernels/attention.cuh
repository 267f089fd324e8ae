// Fused decode attention straight from compressed blocks.
//
// grid (splits, kv_heads, batch); each CTA takes a range of `units` (token
// blocks, plus the uncompressed tail as the last unit) of one sequence and one
// KV head, for all G query heads of that head (GQA: one decode, G uses).
// Each warp streams whole blocks; its decoders read the pool through L1 and
// load each stream word one refill ahead (measured faster on the H100 than
// cp.async staging through shared memory, which halves the warps per SM).
// Per 32-token chunk:
//   K: lane l decodes token row l (D symbols) and dots the codes with q x step
//      (dequantization folded into q);
//   online softmax over the chunk (warp max, per-lane partial sums);
//   V: lane l decodes channels l, l+32, ... of each token and accumulates
//      (p_t step_t) code into registers, p_t min_t once per chunk.
// (Decoding K of chunk k in lockstep with V of chunk k - 1, for two
// independent chains per lane, was measured 5% slower: more registers, fewer warps.)
// Decoded K/V live only in registers. Partial (max, sum, acc) per CTA go to a
// workspace; merge_kernel combines the splits (flash-decoding).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "kvcomp/codebook.hpp"
#include "kvcomp/format.hpp"
#include "attention_params.cuh"
#include "hadamard.cuh"
#include "lane_decoder.cuh"

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
  static constexpr int kPerLane = D / 32;
  float m[G];               // running max (log2 domain), warp-uniform
  float l[G];               // this lane's share of the running sum
  float acc[G][kPerLane];   // output channels lane, lane+32, ...

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
  __device__ void update(const float (&s)[G], bool valid, float (&p)[G]) {
#pragma unroll
    for (int g = 0; g < G; ++g) {
      const float sv = valid ? s[g] : -INFINITY;
      const float m_new = fmaxf(m[g], warp_max(sv));
      const float corr = exp2f(m[g] - m_new);
      p[g] = valid ? exp2f(sv - m_new) : 0.f;
      l[g] = l[g] * corr + p[g];
#pragma unroll
      for (int j = 0; j < kPerLane; ++j) acc[g][j] *= corr;
      m[g] = m_new;
    }
  }
};

/// Merges the warps of a CTA (merge: kAttnWarps * G * (D + 2) floats of
/// shared memory) and writes this split's partial (acc, max, sum) for the G
/// query heads at part[g][split] (rows of D + 2 floats). acc[g][j] holds
/// channel lane + 32 j, or with kPairs channel 64 (j / 2) + 2 lane + j % 2
/// (a lane that reads V as half2 pairs).
/// Only the first g_real heads are written (a kernel padded to G heads for a
/// group of g_real, e.g. 3 of 4: the padded rows have no output).
template <int D, int G, bool kPairs = false>
__device__ void write_split_partial(const SoftmaxAcc<D, G>& st, float* merge, float* part, int splits, int split,
                                    int g_real = G) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int g = 0; g < G; ++g) {
    float* row = merge + (size_t(warp) * G + g) * (D + 2);
#pragma unroll
    for (int j = 0; j < D / 32; ++j) row[kPairs ? 64 * (j / 2) + 2 * lane + j % 2 : lane + 32 * j] = st.acc[g][j];
    const float lsum = warp_sum(st.l[g]);
    if (lane == 0) { row[D] = st.m[g]; row[D + 1] = lsum; }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < g_real * D; i += blockDim.x) {
    const int g = i / D, d = i % D;
    float M = -INFINITY;
    for (int w = 0; w < kAttnWarps; ++w) M = fmaxf(M, merge[(size_t(w) * G + g) * (D + 2) + D]);
    float A = 0.f, L = 0.f;
    if (M != -INFINITY) {
      for (int w = 0; w < kAttnWarps; ++w) {
        const float* row = merge + (size_t(w) * G + g) * (D + 2);
        if (row[D] == -INFINITY) continue;
        const float f = exp2f(row[D] - M);
        A += row[d] * f;
        L += row[D + 1] * f;
      }
    }
    float* out = part + (size_t(g) * splits + split) * (D + 2);
    out[d] = A;
    if (d == 0) { out[D] = M; out[D + 1] = L; }
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

/// Attends one warp to n <= 32 uncompressed tokens (an uncompressed tail or
/// window): rows k[t * D ..], v[t * D ..]; lane l scores row l against q_s
/// ([G][D], log2 units), the chunk is folded into the softmax, p.V accumulated.
template <int D, int G, typename E>
__device__ void attend_rows(SoftmaxAcc<D, G>& st, const float* q_s, const E* k, const E* v, int n) {
  const int lane = threadIdx.x % 32;
  float s[G], pr[G];
#pragma unroll
  for (int g = 0; g < G; ++g) s[g] = 0.f;
  if (lane < n) {
    for (int c = 0; c < D; c += 4) {
      const float4 x = load4(k + size_t(lane) * D + c);
#pragma unroll
      for (int g = 0; g < G; ++g) {
        const float* qg = q_s + g * D + c;
        s[g] = fmaf(qg[0], x.x, fmaf(qg[1], x.y, fmaf(qg[2], x.z, fmaf(qg[3], x.w, s[g]))));
      }
    }
  }
  st.update(s, lane < n, pr);
  for (int t = 0; t < n; ++t) {
    float pt[G];
#pragma unroll
    for (int g = 0; g < G; ++g) pt[g] = __shfl_sync(0xFFFFFFFFu, pr[g], t);
#pragma unroll
    for (int j = 0; j < D / 32; ++j) {
      const float x = to_float(v[size_t(t) * D + lane + 32 * j]);
#pragma unroll
      for (int g = 0; g < G; ++g) st.acc[g][j] = fmaf(pt[g], x, st.acc[g][j]);
    }
  }
}

/// Shared-memory layout of the fused kernel: the two decode tables are a
/// static array; the dynamic part holds q and, per warp, the parameters of
/// the block it decodes (reused by the CTA merge at the end).
template <int D, int G>
struct AttnSmem {
  static constexpr size_t kLuts = 2 * format::kLutSize * sizeof(uint32_t);  // static
  static constexpr size_t kQ = size_t(G) * D * sizeof(float);
  // Per warp: K (min, step) per channel, q x K step per channel; V (min, step)
  // per token, p x V step and p per token of a chunk.
  static constexpr size_t kWarp = size_t(D) * sizeof(float2) + size_t(D) * G * sizeof(float) +
                                  size_t(kMaxTokensPerBlock) * sizeof(float2) + size_t(64) * G * sizeof(float);
  static constexpr size_t kMerge = size_t(kAttnWarps) * G * (D + 2) * sizeof(float);
  /// Dynamic shared memory.
  static constexpr size_t kBytes = kQ + (kAttnWarps * kWarp > kMerge ? kAttnWarps * kWarp : kMerge);
  static_assert(kLuts + kBytes <= 48 * 1024, "launches need no shared-memory opt-in");
};

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

/// Registers capped for 4 CTAs (16 warps) per SM up to G = 4, 2 for G = 8:
/// measured faster than more registers and fewer warps (the lookups' latency
/// needs warps to hide it) and than 5 or 6 CTAs (spills).
template <int G>
constexpr int attention_min_ctas() { return G <= 4 ? 4 : 2; }

constexpr int32_t kTailF16 = 0, kTailBF16 = 1;  // AttendParams::tail_dtype, as DType
constexpr int32_t kTransformHadamard = 1;        // AttendParams::transform, as Transform

template <typename QT, int D, int G>
__global__ void __launch_bounds__(32 * kAttnWarps, attention_min_ctas<G>()) fused_attention_kernel(const __grid_constant__ AttendParams p) {
  using Acc = SoftmaxAcc<D, G>;
  using Smem = AttnSmem<D, G>;
  constexpr int kPerLane = D / 32;
  static_assert(kPerLane % 2 == 0, "symbols are decoded in pairs");
  static_assert(max_overread(kMaxTokensPerBlock, D) <= kDecodeOverread, "decoders may read past the pool");
  extern __shared__ __align__(16) uint8_t smem[];
  __shared__ __align__(16) uint32_t luts[2 * format::kLutSize];
  const uint32_t* lut_k = luts;
  const uint32_t* lut_v = luts + format::kLutSize;
  float* q_s = reinterpret_cast<float*>(smem);  // [G][D], scaled to log2 units

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int split = blockIdx.x, head = blockIdx.y, b = blockIdx.z;
  const int T = p.tokens_per_block, cpb = T / 32;  // chunks per block
  const AttendSeq seq = p.seqs[b];
  const int nblocks = seq.tokens / T, tail = seq.tokens % T;
  const int units = nblocks + (tail > 0);
  const int u_begin = split * p.units_per_split;
  const int u_end = min(units, u_begin + p.units_per_split);
  // G is the group padded to 1, 2, 4 or 8; p.group query heads are real (rows g >= p.group hold q = 0 and are
  // never written out).
  const int group = p.group, q_heads = p.kv_heads * group;

  if (nblocks > 0 && u_begin < u_end) {
    const uint4* src_k = reinterpret_cast<const uint4*>(p.books[2 * head].lut);
    const uint4* src_v = reinterpret_cast<const uint4*>(p.books[2 * head + 1].lut);
    constexpr int kLutVec = format::kLutSize * sizeof(uint32_t) / sizeof(uint4);
    for (int i = threadIdx.x; i < kLutVec; i += blockDim.x) {
      reinterpret_cast<uint4*>(luts)[i] = src_k[i];
      reinterpret_cast<uint4*>(luts + format::kLutSize)[i] = src_v[i];
    }
  }
  const QT* q = static_cast<const QT*>(p.q) + (size_t(b) * q_heads + size_t(head) * group) * D;
  const int q_real = group * D;
  if (p.transform == kTransformHadamard) {
    // K/V are stored rotated (x R): q.k = (q R).(k R), so rotate q (fp32, one warp per row), then scale.
    for (int i = threadIdx.x; i < G * D; i += blockDim.x) q_s[i] = i < q_real ? load_q(q + i) : 0.f;
    __syncthreads();
    for (int g = warp; g < G; g += kAttnWarps) hadamard_row_shared<D>(q_s + g * D);
    __syncthreads();
    for (int i = threadIdx.x; i < G * D; i += blockDim.x) q_s[i] *= p.scale_log2;
  } else {
    for (int i = threadIdx.x; i < G * D; i += blockDim.x) q_s[i] = i < q_real ? load_q(q + i) * p.scale_log2 : 0.f;
  }
  __syncthreads();

  uint8_t* my_area = smem + Smem::kQ + warp * Smem::kWarp;
  float2* prm_k = reinterpret_cast<float2*>(my_area);           // [D] K (min, step)
  float* qstep = reinterpret_cast<float*>(prm_k + D);           // [D][G] q x K step
  float2* prm_v = reinterpret_cast<float2*>(qstep + D * G);     // [T] V (min, step)
  float* pstep = reinterpret_cast<float*>(prm_v + kMaxTokensPerBlock);  // [32][G] p x V step
  float* pprob = pstep + 32 * G;                                 // [32][G] p (for escapes)

  const uint32_t k_pay = uint32_t(format::payload_offset(Kind::Key, T, D));
  const uint32_t v_pay = uint32_t(format::payload_offset(Kind::Value, T, D));
  // A corrupt block table must not make us read outside the pool: a pair that
  // does not fit in it, or is too small for its headers, is read as an empty
  // pair at the pool's start (wrong numbers, but in bounds).
  auto block_ref = [&](int u) {
    const format::BlockRef r = p.table[(size_t(seq.slot) * p.max_blocks + u) * p.kv_heads + head];
    const bool fits = uint64_t(r.offset16) + r.k_size16 + r.v_size16 <= p.pool_units16 &&
                      r.k_size16 * 16u >= k_pay && r.v_size16 * 16u >= v_pay;
    return fits ? r : format::BlockRef{0, uint16_t((k_pay + 15) / 16), uint16_t((v_pay + 15) / 16)};
  };

  // This warp's compressed blocks: u_begin + warp + i * kAttnWarps.
  const int u_first = u_begin + warp, u_stop = min(u_end, nblocks);

  Acc st;
  st.init();
  LaneDecoder kd, vd;
  float qmin[G], s[G], pr[G];

  // A block's K side. Scores are sum_c q_c (min_c + code_c step_c) = qmin +
  // sum_c (q_c step_c) code_c: per block qstep and qmin, per symbol one FMA per head.
  auto k_begin_block = [&](const uint8_t* kb, uint32_t k_bytes) {
    const uint32_t* kp = reinterpret_cast<const uint32_t*>(kb + format::params_offset());
#pragma unroll
    for (int g = 0; g < G; ++g) qmin[g] = 0.f;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      const int c = lane + 32 * j;
      const uint32_t w = kp[c];
      const float2 mp = make_float2(format::half_to_float(uint16_t(w)), format::half_to_float(uint16_t(w >> 16)));
      prm_k[c] = mp;
#pragma unroll
      for (int g = 0; g < G; ++g) {
        qstep[c * G + g] = q_s[g * D + c] * mp.y;
        qmin[g] = fmaf(q_s[g * D + c], mp.x, qmin[g]);
      }
    }
#pragma unroll
    for (int g = 0; g < G; ++g) qmin[g] = warp_sum(qmin[g]);
    kd.init(reinterpret_cast<const uint32_t*>(kb + k_pay), (k_bytes - k_pay) / 4,
            lane_stream_start(reinterpret_cast<const uint16_t*>(kb + format::lane_bits_offset(Kind::Key, T, D)), lane));
  };
  // A block's V side: (min, step) per token.
  auto v_begin_block = [&](const uint8_t* vb, uint32_t v_bytes) {
    const uint32_t* vp = reinterpret_cast<const uint32_t*>(vb + format::params_offset());
    for (int t = lane; t < T; t += 32) {
      const uint32_t w = vp[t];
      prm_v[t] = make_float2(format::half_to_float(uint16_t(w)), format::half_to_float(uint16_t(w >> 16)));
    }
    vd.init(reinterpret_cast<const uint32_t*>(vb + v_pay), (v_bytes - v_pay) / 4,
            lane_stream_start(reinterpret_cast<const uint16_t*>(vb + format::lane_bits_offset(Kind::Value, T, D)), lane));
  };
  // K of one chunk: this lane's token row, channels in pairs.
  auto k_chunk = [&] {
#pragma unroll
    for (int g = 0; g < G; ++g) s[g] = qmin[g];
#pragma unroll 2
    for (int c = 0; c < D; c += 2) {
      // An escaped value adds q_c (raw - min_c) on top of its code-0 term.
      auto k_escape = [&](int ch) {
        return [&, ch](float raw) {
#pragma unroll
          for (int g = 0; g < G; ++g) s[g] = fmaf(q_s[g * D + ch], raw - prm_k[ch].x, s[g]);
        };
      };
      float c0, c1;
      kd.pair(lut_k, k_escape(c), k_escape(c + 1), c0, c1);
      float qs[2 * G];
      load_vec<2 * G>(qstep + c * G, qs);
#pragma unroll
      for (int g = 0; g < G; ++g) s[g] = fmaf(qs[G + g], c1, fmaf(qs[g], c0, s[g]));
    }
  };
  // V of one chunk with the p of its softmax update: acc += (p_t step_t) code,
  // plus p_t min_t, which is the same for every channel (one warp sum per head).
  auto v_chunk = [&](int chunk) {
    {
      const float2 mp = prm_v[chunk * 32 + lane];
#pragma unroll
      for (int g = 0; g < G; ++g) {
        pstep[lane * G + g] = pr[g] * mp.y;
        pprob[lane * G + g] = pr[g];
        const float pmin = warp_sum(pr[g] * mp.x);
#pragma unroll
        for (int j = 0; j < kPerLane; ++j) st.acc[g][j] += pmin;
      }
    }
    __syncwarp();
    for (int t = 0; t < 32; ++t) {
      float ps[G];
      load_vec<G>(pstep + t * G, ps);
#pragma unroll
      for (int j = 0; j < kPerLane; j += 2) {
        // An escaped value adds p_t (raw - min_t) on top of its code-0 term.
        auto v_escape = [&](int jv) {
          return [&, jv](float raw) {
            const float vmin = prm_v[chunk * 32 + t].x;
#pragma unroll
            for (int g = 0; g < G; ++g) st.acc[g][jv] = fmaf(pprob[t * G + g], raw - vmin, st.acc[g][jv]);
          };
        };
        float c0, c1;
        vd.pair(lut_v, v_escape(j), v_escape(j + 1), c0, c1);
#pragma unroll
        for (int g = 0; g < G; ++g) {
          st.acc[g][j] = fmaf(ps[g], c0, st.acc[g][j]);
          st.acc[g][j + 1] = fmaf(ps[g], c1, st.acc[g][j + 1]);
        }
      }
    }
    __syncwarp();
  };

  for (int u = u_first; u < u_stop; u += kAttnWarps) {
    const format::BlockRef r = block_ref(u);
    const uint8_t* kb = p.pool + size_t(r.offset16) * 16;
    k_begin_block(kb, r.k_size16 * 16u);
    v_begin_block(kb + r.k_size16 * 16u, r.v_size16 * 16u);
    __syncwarp();
    for (int chunk = 0; chunk < cpb; ++chunk) {
      k_chunk();
      st.update(s, true, pr);
      v_chunk(chunk);
    }
  }

  // The uncompressed tail, if this warp owns it.
  if (tail > 0 && nblocks >= u_begin && nblocks < u_end && (nblocks - u_begin) % kAttnWarps == warp) {
    const size_t base = (size_t(seq.slot) * p.kv_heads + head) * size_t(T) * D;
    auto attend_tail = [&](auto type_tag) {  // the tail is held in the K/V input's type
      using E = decltype(type_tag);
      const E* kt = static_cast<const E*>(p.k_tail) + base;
      const E* vt = static_cast<const E*>(p.v_tail) + base;
      for (int first = 0; first < tail; first += 32)
        attend_rows<D, G>(st, q_s, kt + size_t(first) * D, vt + size_t(first) * D, min(32, tail - first));
    };
    if (p.tail_dtype == kTailF16) attend_tail(__half{});
    else if (p.tail_dtype == kTailBF16) attend_tail(__nv_bfloat16{});
    else attend_tail(float{});
  }
  __syncthreads();

  write_split_partial<D, G>(st, reinterpret_cast<float*>(smem + Smem::kQ),
                            p.part + (size_t(b) * q_heads + size_t(head) * group) * p.splits * (D + 2), p.splits, split,
                            group);
}

/// Combines the splits: out = sum_s A_s 2^(m_s - M) / sum_s L_s 2^(m_s - M).
/// grid: batch * q_heads CTAs of D threads. A sequence with no tokens gives 0.
/// rotate_back (Config::transform = Hadamard): V was stored as v R, so the
/// merged row is o R; it is multiplied by R once more (R R = I) before output.
template <typename QT, int D>
__global__ void merge_kernel(const float* part, int splits, QT* out, bool rotate_back = false) {
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
  if (rotate_back) {  // uniform over the launch
    __shared__ float row[D];
    row[threadIdx.x] = o;
    __syncthreads();
    if (threadIdx.x < 32) hadamard_row_shared<D>(row);
    __syncthreads();
    o = row[threadIdx.x];
  }
  store_out(out + bh * D + threadIdx.x, o);
}

}  // namespace detail
}  // namespace kvcomp
