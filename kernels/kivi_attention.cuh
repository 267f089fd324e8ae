// Baseline: KIVI-style fixed-width quantized KV cache (no entropy coding) and
// its fused decode-attention kernel, built like the kvcomp kernel (split-K
// over 32-token chunks, GQA rows sharing every decoded chunk, q.K^T and p.V on
// tensor cores, online softmax, flash-decoding merge) so that the two differ
// only in the storage.
//
// Quantization (KIVI): groups of 32; K per channel over 32 tokens, V per token
// over 32 channels; per group fp16 scale = (max - min) / (2^bits - 1) and
// fp16 zero = min; code = clamp(rint((x - zero) / scale), 0, 2^bits - 1);
// x' = code * scale + zero. The last `window` + (0..31) tokens stay fp16.
//
// ---------------------------------------------------------------------------
// Device layout. Per (sequence b, kv head h) `chunks` records of 32 tokens,
// records[b][h][c][kWords] (uint32 words), one record = one contiguous copy:
//   [0, 32 LW)          K codes      LW = D * bits / 32 words per lane
//   [32 LW, 64 LW)      V codes
//   [64 LW, 64 LW + D)  K params     fp16x2 words
//   [.., + D / 2)       V scales     fp16x2 words
//   [.., + D / 2)       V zeros      fp16x2 words
// Codes: word j (0 <= j < LW) of lane L (0..31) is word ((j / 4) * 32 + L) * 4 + j % 4
// of its array (each lane loads its words as 16-byte vectors, a warp 512
// contiguous bytes at a time). Lane L = 4 r + q (r = L / 4, q = L % 4: the
// mma fragment coordinates groupID and threadID_in_group). A word holds two
// fp16 halves of 16 bits; in each half, byte s (0, 1) holds S = 8 / bits codes,
// code number cl (0..S-1) at bits [bits * cl, bits * cl + bits) of that byte:
// code (e, s, cl) of the word sits at bit 16 e + 8 s + bits cl. So
// (w >> 8 s) & (((1 << bits) - 1) * 0x00010001 << bits cl) leaves two codes
// in the low mantissa bits of an fp16 pair: the pair as subnormal fp16s,
// code x 2^(bits cl - 24) each, straight as an mma operand (one AND per
// operand register, plus one shift per word).
//   K code of token t (0..31 in the chunk), channel c:
//     r = t % 8, n8 = t / 8; k16 = c / 16, h = (c % 16) / 8, q = (c % 8) / 2, e = c % 2;
//     word j = k16 * (bits / 2) + n8 / S, s = h, cl = n8 % S.
//   V code of token t, channel c:
//     m16 = c / 16, r = c % 8, s = (c % 16) / 8; k = t / 16, wp = (t % 16) / 8, q = (t % 8) / 2,
//     e = t % 2; MG = D * bits / 128; word j = 2 (k MG + m16 / S) + wp, cl = m16 % S.
// Params, each word an fp16x2 of two consecutive channels / tokens (low half first):
//   K params [k16][q][4]: (scale_c0, scale_c0+1), (scale_c0+8, scale_c0+9),
//     (zero_c0, zero_c0+1), (zero_c0+8, zero_c0+9), c0 = 16 k16 + 2 q.
//   V scales [k][q][g][hh] (g: 32-channel group, k, hh in 0..1):
//     (scale_{t0,g}, scale_{t0+1,g}), t0 = 16 k + 8 hh + 2 q.
//   V zeros  [g][q][k][hh]: (zero_{t0,g}, zero_{t0+1,g}), same t0.
// tails [b][h][tail_cap][D] fp16: the unquantized recent tokens.
// scale_max[2]: the largest K and V scale (fp16 range guards, below).
//
// ---------------------------------------------------------------------------
// Attention. grid (splits, kv_heads, batch), 4 warps a CTA, 4 CTAs an SM
// (<= 128 registers, no spills; ~38-42 KB of shared memory a CTA at D = 128);
// units (32 tokens) of a sequence are the fp16 tail's (first) and then the
// chunks; a CTA takes a range of units, its warps every 4th. A warp streams
// its chunk records through its own shared-memory ring (cp.async, KiviSmem::
// kStages deep: 2 or 3 records, kStages - 1 in flight while it computes one)
// and computes on tensor cores (mma.m16n8k16, fp16 operands, fp32
// accumulation), mma rows = the G <= 8 query heads of the kv head (padded
// rows have q = 0):
//   K: S^T[h][t] = sum_c (q_hc scale_c) code_tc + sum_c q_hc zero_c.
//      A = q x scale, fp16 hi in mma rows 0..7 and its rounding rest (lo) in
//      rows 8..15: q and scale are fp16, so hi = q * scale (HMUL2, rounded)
//      and lo = fma(q, scale, -hi) (HFMA2) are exact and hi + lo is the exact
//      product. B = the codes (subnormal fp16, one AND each). The two halves
//      of the accumulator are summed; n8 tile's code unit 2^(bits cl - 24) and
//      the softmax scale fold into one multiplier. The zero term: one mma per
//      k16 with A = q (rows 0..7), B = the zero pairs (every column the same).
//      If |q| max x scale max could overflow fp16, A is built in fp32 and
//      pre-divided by a power of two instead (q of the CTA, scale of the cache).
//   Online softmax of the chunk per head (a quad of lanes holds one head's 32
//   scores), p split into fp16 hi + lo at p 2^14 and used as p 2^kp (kp <= 14
//   from the V scale max: p 2^kp x scale < 16384; formed in fp32 when kp < 8,
//   where an fp16 rounding rest of p 2^kp would be subnormal); the shift is
//   folded into the running max (the merge sees a consistent (max, sum, acc)).
//   V: O^T[c][h] += codes (A: 16 channels x 16 tokens, subnormal fp16) x
//      (p_ht scale_t,g) (B, fp16 hi + lo, two mmas; p split hi + lo once per
//      chunk, p x scale via HMUL2/HFMA2 per 32-channel group g); code units
//      2^(bits cl - 24) are per 16-channel tile, undone at the end; each tile's
//      mmas of a chunk go to a fresh accumulator added to O in fp32. The zero
//      term sum_t p_ht zero_{t,g}: one mma per 16 tokens with A = the zeros
//      (row = group g), B = p (hi, lo).
//   The fp16 tail goes through the same mmas with A = q, B = K rows (K) and
//   A = V rows, B = p (V), tokens past the tail masked.
// Partial (max, sum, acc) per CTA go to the workspace; merge_kernel combines
// the splits. One kernel serves G = 1..8 (rows padded to 8).
#pragma once

#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "decode_common.cuh"
#include "kivi_params.cuh"
#include "mma_ops.cuh"

namespace kvcomp {
namespace detail {

template <int BITS>
struct KiviBits {
  static constexpr uint32_t kMask = (1u << BITS) - 1;
  static constexpr float kMaxCode = float((1 << BITS) - 1);
};

/// The KIVI group quantizer (host reference: kivi_reference in src/kivi.cu, same arithmetic).
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

/// Where things are in a chunk record (see the layout above).
template <int D, int BITS>
struct KiviLayout {
  static_assert(BITS == 2 || BITS == 4, "2- or 4-bit codes");
  static_assert(D == 64 || D == 128, "head_dim 64 or 128");
  static constexpr int kSlots = 8 / BITS;              // codes per byte (S)
  static constexpr int kLaneWords = D * BITS / 32;     // code words per lane, K or V (LW)
  static constexpr int kCodeWords = 32 * kLaneWords;   // per chunk, K or V
  static constexpr int kKCodes = 0;
  static constexpr int kVCodes = kCodeWords;
  static constexpr int kKPrm = 2 * kCodeWords;
  static constexpr int kVScales = kKPrm + D;
  static constexpr int kVZeros = kVScales + D / 2;
  static constexpr int kWords = kVZeros + D / 2;
  static constexpr int kK16 = D / 16, kM16 = D / 16, kGroups = D / 32;
  static constexpr int kMG = D * BITS / 128;           // V: 16-channel tiles / S
  static_assert(kLaneWords % 4 == 0 && kWords % 128 == 0, "16-byte vectors per lane");
};

/// Codes as subnormal fp16: a code pair masked into the low mantissa bits is
/// the operand (value code 2^(bits cl - 24)); tensor cores take subnormal fp16
/// inputs (KiviGpu tests it on every code).
constexpr float kKiviCodeUnit = 1.f / 16777216.f;  // 2^-24
/// q x scale and p x scale stay below this (fp16 max 65504; the rounding of
/// hi and the lo rests keep far from it).
constexpr float kKiviAmax = 16384.f;

/// One warp per (chunk, head, sequence): quantizes K and V of 32 tokens and
/// writes the chunk's record; the largest scales go to scale_max (atomics).
/// k, v: fp16 [batch][kv_heads][tokens][D]. grid (chunks, kv_heads, batch), 32 threads.
template <int D, int BITS>
__global__ void __launch_bounds__(32) kivi_quantize_kernel(const __half* k, const __half* v, int tokens, KiviParams p) {
  using B = KiviBits<BITS>;
  using L = KiviLayout<D, BITS>;
  constexpr int S = L::kSlots, kPerLane = D / 32;
  __shared__ uint8_t kc[32][D], vc[32][D];  // codes [token][channel]
  __shared__ __half ks[D], kz[D];           // K scale, zero per channel
  __shared__ __half vs[32][kPerLane], vz[32][kPerLane];  // V scale, zero per token and group
  const int lane = threadIdx.x, c = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const size_t seq = size_t(b) * p.kv_heads + h;
  const __half* K = k + (seq * tokens + size_t(c) * 32) * D;
  const __half* V = v + (seq * tokens + size_t(c) * 32) * D;
  float kmax = 0.f, vmax = 0.f;
  // K: lane = token; per channel, the group is the 32 lanes.
  for (int ch = 0; ch < D; ++ch) {
    const float x = __half2float(K[size_t(lane) * D + ch]);
    const float lo = -warp_max(-x), hi = warp_max(x);
    __half2 stored;
    const KiviGroup g = KiviGroup::make(lo, hi, B::kMaxCode, stored);
    if (lane == 0) { ks[ch] = __low2half(stored); kz[ch] = __high2half(stored); }
    kmax = fmaxf(kmax, g.scale);
    kc[lane][ch] = uint8_t(g.code(x, B::kMaxCode));
  }
  // V: lane l holds channels l + 32 j; the group of (t, j) is the 32 lanes.
  for (int t = 0; t < 32; ++t) {
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      const float x = __half2float(V[size_t(t) * D + lane + 32 * j]);
      const float lo = -warp_max(-x), hi = warp_max(x);
      __half2 stored;
      const KiviGroup g = KiviGroup::make(lo, hi, B::kMaxCode, stored);
      if (lane == 0) { vs[t][j] = __low2half(stored); vz[t][j] = __high2half(stored); }
      vmax = fmaxf(vmax, g.scale);
      vc[t][lane + 32 * j] = uint8_t(g.code(x, B::kMaxCode));
    }
  }
  __syncwarp();
  uint32_t* rec = p.records + (seq * p.chunks + c) * L::kWords;
  const int r = lane / 4, q = lane % 4;
  // Codes: this lane's words, 4 at a time (one 16-byte store).
  for (int j4 = 0; j4 < L::kLaneWords; j4 += 4) {
    uint32_t kw[4] = {0, 0, 0, 0}, vw[4] = {0, 0, 0, 0};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int j = j4 + i;
      for (int e = 0; e < 2; ++e)
        for (int s = 0; s < 2; ++s)
          for (int cl = 0; cl < S; ++cl) {
            const int bit = 16 * e + 8 * s + BITS * cl;
            // K: word j = k16 (bits / 2) + n8 / S; s = h; cl = n8 % S.
            const int k16 = j / (BITS / 2), n8 = (j % (BITS / 2)) * S + cl;
            kw[i] |= uint32_t(kc[8 * n8 + r][16 * k16 + 8 * s + 2 * q + e]) << bit;
            // V: word j = 2 (k MG + m16 / S) + wp; s = row half; cl = m16 % S.
            const int wp = j % 2, kk = j / (2 * L::kMG), m16 = ((j / 2) % L::kMG) * S + cl;
            vw[i] |= uint32_t(vc[16 * kk + 8 * wp + 2 * q + e][16 * m16 + 8 * s + r]) << bit;
          }
    }
    const int at = ((j4 / 4) * 32 + lane) * 4;
    *reinterpret_cast<uint4*>(rec + L::kKCodes + at) = make_uint4(kw[0], kw[1], kw[2], kw[3]);
    *reinterpret_cast<uint4*>(rec + L::kVCodes + at) = make_uint4(vw[0], vw[1], vw[2], vw[3]);
  }
  auto pair = [](__half lo, __half hi) {
    return uint32_t(__half_as_ushort(lo)) | (uint32_t(__half_as_ushort(hi)) << 16);
  };
  // K params [k16][q][4]: scale pairs at c0, c0 + 8, zero pairs at c0, c0 + 8.
  for (int i = lane; i < D; i += 32) {
    const int k16 = i / 16, qq = (i / 4) % 4, w = i % 4;
    const int c0 = 16 * k16 + 2 * qq + 8 * (w & 1);
    const __half* a = w < 2 ? ks : kz;
    rec[L::kKPrm + i] = pair(a[c0], a[c0 + 1]);
  }
  // V scales [k][q][g][hh] and zeros [g][q][k][hh]: token pairs t0 = 16 k + 8 hh + 2 q.
  for (int i = lane; i < D / 2; i += 32) {
    {
      const int kk = i / (D / 4), rem = i % (D / 4), qq = rem / (D / 16), g = (rem % (D / 16)) / 2, hh = rem % 2;
      const int t0 = 16 * kk + 8 * hh + 2 * qq;
      rec[L::kVScales + i] = pair(vs[t0][g], vs[t0 + 1][g]);
    }
    {
      const int g = i / 16, qq = (i / 4) % 4, kk = (i / 2) % 2, hh = i % 2;
      const int t0 = 16 * kk + 8 * hh + 2 * qq;
      rec[L::kVZeros + i] = pair(vz[t0][g], vz[t0 + 1][g]);
    }
  }
  // Scales are >= 0 (or NaN): their bits order as ints.
  kmax = warp_max(kmax);
  vmax = warp_max(vmax);
  if (lane == 0) {
    if (kmax > 0.f) atomicMax(reinterpret_cast<int*>(p.scale_max), __float_as_int(kmax));
    if (vmax > 0.f) atomicMax(reinterpret_cast<int*>(p.scale_max + 1), __float_as_int(vmax));
  }
}

namespace kivi {

__device__ __forceinline__ uint32_t h2u(__half2 h) { return *reinterpret_cast<const uint32_t*>(&h); }
__device__ __forceinline__ __half2 u2h(uint32_t u) { return *reinterpret_cast<const __half2*>(&u); }
__device__ __forceinline__ uint32_t get(const uint4& v, int i) { return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w; }

/// Two codes (bits 16 e + bits cl, e = 0, 1, of w) as an fp16 pair operand of value code x 2^(BITS cl) x kKiviCodeUnit.
template <int BITS>
__device__ __forceinline__ uint32_t code_pair(uint32_t w, int cl) {
  return w & ((((1u << BITS) - 1) * 0x00010001u) << (BITS * cl));
}

/// The A operand registers (hi, lo) of q x scale for a pair of channels: exact
/// (hi + lo = q scale) in the fast path; kWide: fp32 product times inv (a power of two).
template <bool kWide>
__device__ __forceinline__ void q_times_scale(uint32_t q2, uint32_t s2, float inv, uint32_t& hi, uint32_t& lo) {
  if constexpr (!kWide) {
    const __half2 h = __hmul2_rn(u2h(q2), u2h(s2));
    hi = h2u(h);
    lo = h2u(__hfma2(u2h(q2), u2h(s2), __hneg2(h)));
  } else {
    const float2 qf = __half22float2(u2h(q2)), sf = __half22float2(u2h(s2));
    const float x0 = qf.x * sf.x * inv, x1 = qf.y * sf.y * inv;
    const __half2 h = __floats2half2_rn(x0, x1);
    const float2 hf = __half22float2(h);
    hi = h2u(h);
    lo = h2u(__floats2half2_rn(x0 - hf.x, x1 - hf.y));
  }
}

/// The 8x8 fp16 matrix whose row r, columns 2 q and 2 q + 1 lane 4 r + q holds, transposed:
/// afterwards the lane holds its rows 2 q and 2 q + 1 of column r.
__device__ __forceinline__ uint32_t transpose8x8(uint32_t x) {
  uint32_t y;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
  return y;
}

}  // namespace kivi

/// Shared memory: per warp kStages chunk records (the pipeline), reused at
/// the end for the warp's partial [8][D + 2] floats (three stages where 4
/// CTAs of them fit in 48 KB, else two); then q as A fragments.
template <int D, int BITS>
struct KiviSmem {
  static constexpr size_t kStage = size_t(KiviLayout<D, BITS>::kWords) * sizeof(uint32_t);
  static constexpr int kStages = kAttnWarps * 3 * kStage <= 48 * 1024 ? 3 : 2;
  static constexpr size_t kPartial = size_t(8) * (D + 2) * sizeof(float);
  static constexpr size_t kWarp = kStages * kStage > kPartial ? kStages * kStage : kPartial;
  static constexpr size_t kQ = kAttnWarps * kWarp;  // then q's A fragments [D / 16][32] uint2
  static constexpr size_t kBytes = kQ + size_t(D / 16) * 32 * 8;
  static_assert(kWarp % 16 == 0, "16-byte aligned stages");
  static_assert(kBytes <= 48 * 1024, "launches need no shared-memory opt-in");
};

/// CTAs per SM the kernel is built for (registers capped to 128 a thread).
constexpr int kKiviMinCtas = 4;

/// grid (splits, kv_heads, batch), 32 kAttnWarps threads; group = q heads per
/// kv head (1..8). units: the fp16 tail's ceil(tail / 32) first, then the
/// chunks; split s takes [s units_per_split, + units_per_split).
template <int D, int BITS>
__global__ void __launch_bounds__(32 * kAttnWarps, kKiviMinCtas)
    kivi_attention_kernel(const __grid_constant__ KiviParams p, const __half* q_in, float* part, int group,
                          int units_per_split, int splits, float scale_log2) {
  using L = KiviLayout<D, BITS>;
  using Smem = KiviSmem<D, BITS>;
  using kivi::code_pair;
  using kivi::get;
  using kivi::h2u;
  using kivi::u2h;
  constexpr int kK16 = L::kK16, kM16 = L::kM16, kGroups = L::kGroups, S = L::kSlots, kMG = L::kMG;
  constexpr int kStages = Smem::kStages, kLW = L::kLaneWords;
  extern __shared__ __align__(16) uint8_t smem[];
  allow_dependent_launch();  // the merge is a dependent launch, as kvcomp's
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int r = lane / 4, qd = lane % 4;  // mma fragment coordinates: this lane's head (K) is r
  const int split = blockIdx.x, head = blockIdx.y, b = blockIdx.z;
  const int q_heads = p.kv_heads * group;
  const size_t seq = size_t(b) * p.kv_heads + head;
  const int ntail = (p.tail + 31) / 32, units = p.chunks + ntail;
  const int u_begin = split * units_per_split, u_end = min(units, u_begin + units_per_split);
  uint8_t* area = smem + warp * Smem::kWarp;

  // This warp's units are u0, u0 + 4, ... (u0 = u_begin + warp); its tail units' rows start on
  // their way to L2 now (the tail is read without the record pipeline).
  const int u0 = u_begin + warp;
  for (int u = u0; u < min(u_end, ntail); u += kAttnWarps) {
    const size_t row0 = (seq * p.tail_cap + 32 * u) * D;
    const int bytes = min(32, p.tail - 32 * u) * D * int(sizeof(__half));
    for (int off = lane * 128; off < bytes; off += 32 * 128) {
      asm volatile("prefetch.global.L2 [%0];" ::"l"(reinterpret_cast<const uint8_t*>(p.k_tail + row0) + off));
      asm volatile("prefetch.global.L2 [%0];" ::"l"(reinterpret_cast<const uint8_t*>(p.v_tail + row0) + off));
    }
  }

  // q of head r (0 for padded rows), channels 16 k16 + 2 qd (+1) and + 8: the A rows of the zero
  // term and the tail, and the q of q x scale; in shared memory [k16][lane] (registers are full).
  uint2* q_sm = reinterpret_cast<uint2*>(smem + Smem::kQ);
  float qmax = 0.f;
  {
    const __half* qrow = q_in + (size_t(b) * q_heads + size_t(head) * group + min(r, group - 1)) * D;
#pragma unroll
    for (int k16 = 0; k16 < kK16; ++k16) {
      uint32_t w[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const __half* at = qrow + 16 * k16 + 8 * h + 2 * qd;  // two loads: q need only be 2-byte aligned
        w[h] = r < group ? uint32_t(__half_as_ushort(at[0])) | (uint32_t(__half_as_ushort(at[1])) << 16) : 0u;
        const float2 f = __half22float2(u2h(w[h]));
        qmax = fmaxf(qmax, fmaxf(fabsf(f.x), fabsf(f.y)));
      }
      if (warp == 0) q_sm[k16 * 32 + lane] = make_uint2(w[0], w[1]);
    }
  }
  qmax = warp_max(qmax);
  __syncthreads();  // q_sm
  // fp16 range guards (warp-uniform): q x K scale and p 2^kp x V scale below kKiviAmax.
  const float kbound = qmax * p.scale_max[0], vsmax = p.scale_max[1];
  const float ke = kbound > kKiviAmax ? fminf(ceilf(log2f(kbound / kKiviAmax)), 100.f) : 0.f;
  const bool wide = ke > 0.f;
  const float kwide = exp2f(ke), kwide_inv = exp2f(-ke);
  const float pshift = vsmax > 0.f ? fminf(fmaxf(floorf(log2f(kKiviAmax / vsmax)), 0.f), 14.f) : 14.f;
  // p is split into fp16 hi + lo at 2^14 (so lo stays a normal fp16 for every p that matters);
  // B = p 2^pshift x scale is formed from it: by HMUL2 of p 2^pshift (exact: a power of two) when
  // pshift >= 8, else (V scales over ~64: p 2^pshift's rounding rest would be subnormal, and its lost
  // bits weigh scale x) in fp32 from hi + lo. tshift = 2^(pshift - 14) converts 2^14 units.
  const float tshift = exp2f(pshift - 14.f);
  const bool vwide = pshift < 8.f;
  const __half2 tshift2 = __float2half2_rn(tshift);  // exact: 2^-14 .. 1
  // Scores: (hi + lo accumulators) x kmul[n8] + zero term; the code unit of n8 tile: 2^(BITS (n8 % S)).
  float kmul[4];
#pragma unroll
  for (int n8 = 0; n8 < 4; ++n8) kmul[n8] = scale_log2 * kwide / (kKiviCodeUnit * float(1 << (BITS * (n8 % S))));

  // Softmax state of head r (m quad-uniform, l this lane's share, relative to 2^(m - pshift)).
  // o in scaled units: sum p 2^pshift x value, times the code unit; in plain units (the tail's):
  // sum p 2^14 x value. zacc: sum p 2^14 zero.
  // O^T accumulates on tensor cores: o[m16] = channels 16 m16 + r (+ 8) x heads 2 qd, 2 qd + 1,
  // in code units 2^(BITS (m16 % S)) kKiviCodeUnit while o_scaled (chunks), else plain (the tail).
  // zacc: the V zero term, rows = 32-channel groups (lanes 4 g + qd hold group g, heads 2 qd, + 1).
  float o[kM16][4], zacc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int i = 0; i < kM16; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m = -INFINITY, l = 0.f;
  bool o_scaled = true;
  auto o_unit = [](int m16) { return kKiviCodeUnit * float(1 << (BITS * (m16 % S))); };
  auto rescale_o = [&](bool to_scaled) {
#pragma unroll
    for (int i = 0; i < kM16; ++i) {
      const float f = to_scaled ? o_unit(i) * tshift : 1.f / (o_unit(i) * tshift);
#pragma unroll
      for (int j = 0; j < 4; ++j) o[i][j] *= f;
    }
    o_scaled = to_scaled;
  };

  // Online softmax of the unit (s: head r, tokens 8 n8 + 2 qd + {0, 1}); p 2^pshift as fp16 hi + lo
  // pairs ph/pl[n8] (the B operands of V: tokens 16 k + 2 qd (+1) = n8 2k, + 8 = n8 2k + 1).
  auto softmax = [&](float (&s)[4][2], uint32_t (&ph)[4], uint32_t (&pl)[4]) {
    float cmax = fmaxf(fmaxf(fmaxf(s[0][0], s[0][1]), fmaxf(s[1][0], s[1][1])),
                       fmaxf(fmaxf(s[2][0], s[2][1]), fmaxf(s[3][0], s[3][1])));
    cmax = fmaxf(cmax, __shfl_xor_sync(0xFFFFFFFFu, cmax, 1));
    cmax = fmaxf(cmax, __shfl_xor_sync(0xFFFFFFFFu, cmax, 2));
    const float m_new = fmaxf(m, cmax);
    const float m_ref = m_new == -INFINITY ? 0.f : m_new;  // no NaN from -inf - -inf
    const float corr = exp2f(m - m_ref);
    m = m_new;
    const float m_sub = m_ref - 14.f;  // p 2^14
    float psum = 0.f;
#pragma unroll
    for (int n8 = 0; n8 < 4; ++n8) {
      const float p0 = exp2f(s[n8][0] - m_sub), p1 = exp2f(s[n8][1] - m_sub);
      psum += p0 + p1;
      const __half2 h = __floats2half2_rn(p0, p1);
      const float2 back = __half22float2(h);
      ph[n8] = h2u(h);
      pl[n8] = h2u(__floats2half2_rn(p0 - back.x, p1 - back.y));
    }
    l = fmaf(l, corr, psum * tshift);
    if (__any_sync(0xFFFFFFFFu, corr != 1.f)) {
      // o holds heads 2 qd and 2 qd + 1, whose quads are lanes 8 qd and 8 qd + 4.
      const float ca = __shfl_sync(0xFFFFFFFFu, corr, 8 * qd), cb = __shfl_sync(0xFFFFFFFFu, corr, 8 * qd + 4);
#pragma unroll
      for (int i = 0; i < kM16; ++i) {
        o[i][0] *= ca;
        o[i][1] *= cb;
        o[i][2] *= ca;
        o[i][3] *= cb;
      }
      zacc[0] *= ca;
      zacc[1] *= cb;
    }
  };

  // A quantized chunk from its record in shared memory.
  auto chunk = [&](const uint32_t* rec, auto wide_tag) {
    constexpr bool kWide = decltype(wide_tag)::value;
    if (!o_scaled) rescale_o(true);
    // K: per k16, A = q x scale (hi rows 0..7, lo rows 8..15); per n8, B = codes of tokens
    // 8 n8 + r, channels 16 k16 + 2 qd (+1) (b0) and + 8 (b1).
    uint4 kw[kLW / 4];
#pragma unroll
    for (int x = 0; x < kLW / 4; ++x) kw[x] = *reinterpret_cast<const uint4*>(rec + L::kKCodes + (x * 32 + lane) * 4);
    float sc[4][4], zk[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int n = 0; n < 4; ++n) sc[n][0] = sc[n][1] = sc[n][2] = sc[n][3] = 0.f;
#pragma unroll
    for (int k16 = 0; k16 < kK16; ++k16) {
      const uint4 kp = *reinterpret_cast<const uint4*>(rec + L::kKPrm + (k16 * 4 + qd) * 4);
      const uint2 qa = q_sm[k16 * 32 + lane];
      uint32_t a0, a1, a2, a3;
      kivi::q_times_scale<kWide>(qa.x, kp.x, kwide_inv, a0, a1);
      kivi::q_times_scale<kWide>(qa.y, kp.y, kwide_inv, a2, a3);
      mma_16816(zk, qa.x, 0u, qa.y, 0u, kp.z, kp.w);  // sum_c q_rc zero_c in every column
#pragma unroll
      for (int n8 = 0; n8 < 4; ++n8) {
        const int j = k16 * (BITS / 2) + n8 / S, cl = n8 % S;
        const uint32_t w = get(kw[j / 4], j % 4);
        mma_16816(sc[n8], a0, a1, a2, a3, code_pair<BITS>(w, cl), code_pair<BITS>(w >> 8, cl));
      }
    }
    const float qz = zk[0] * scale_log2;
    float s[4][2];
#pragma unroll
    for (int n8 = 0; n8 < 4; ++n8)
#pragma unroll
      for (int e = 0; e < 2; ++e) s[n8][e] = fmaf(sc[n8][e] + sc[n8][e + 2], kmul[n8], qz);
    uint32_t ph[4], pl[4];
    softmax(s, ph, pl);

    // V zero term: A = zeros of group r (rows 0..kGroups-1), tokens 16 k + 2 qd (+1), + 8.
    uint4 vz = make_uint4(0u, 0u, 0u, 0u);
    if (r < kGroups) vz = *reinterpret_cast<const uint4*>(rec + L::kVZeros + (r * 4 + qd) * 4);
    float zt[4] = {0.f, 0.f, 0.f, 0.f};  // a fresh accumulator, as o's tiles below
    mma_16816(zt, vz.x, 0u, vz.y, 0u, ph[0], ph[1]);
    mma_16816(zt, vz.x, 0u, vz.y, 0u, pl[0], pl[1]);
    mma_16816(zt, vz.z, 0u, vz.w, 0u, ph[2], ph[3]);
    mma_16816(zt, vz.z, 0u, vz.w, 0u, pl[2], pl[3]);
#pragma unroll
    for (int j = 0; j < 4; ++j) zacc[j] += zt[j];
    // V: per 32-channel group g and 16 tokens k, B = p 2^pshift x scale_{t,g} (hi, lo); per
    // 16-channel tile m16 of the group, A = its codes. Each tile's 4 mmas of the chunk go to a fresh
    // accumulator, added to o by one FADD each: a long chain of tensor-core accumulations into o
    // itself lost ~1e-3 of the output at 20k tokens a warp (the code and zero terms cancel).
    uint4 vw[kLW / 4];
#pragma unroll
    for (int x = 0; x < kLW / 4; ++x) vw[x] = *reinterpret_cast<const uint4*>(rec + L::kVCodes + (x * 32 + lane) * 4);
    uint4 sv[2][D / 64];  // [k] word 2 g + hh: scales of tokens 16 k + 8 hh + 2 qd (+1), group g
#pragma unroll
    for (int k = 0; k < 2; ++k)
#pragma unroll
      for (int x = 0; x < D / 64; ++x)
        sv[k][x] = *reinterpret_cast<const uint4*>(rec + L::kVScales + (k * 4 + qd) * (D / 16) + 4 * x);
    // p 2^pshift as hi + lo (HMUL2 by a power of two: exact) or, vwide, as fp32.
    auto v_tiles = [&](auto vwide_tag) {
      constexpr bool kVWide = decltype(vwide_tag)::value;
      uint32_t pp[4], pr[4];
      float2 pf[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        if constexpr (!kVWide) {
          pp[i] = h2u(__hmul2(u2h(ph[i]), tshift2));
          pr[i] = h2u(__hmul2(u2h(pl[i]), tshift2));
        } else {
          const float2 a = __half22float2(u2h(ph[i])), c = __half22float2(u2h(pl[i]));
          pf[i] = make_float2((a.x + c.x) * tshift, (a.y + c.y) * tshift);
        }
      }
#pragma unroll
      for (int g = 0; g < kGroups; ++g) {
        uint32_t bh[2][2], bl[2][2];  // [k][token half]: p 2^pshift x scale, hi and lo
#pragma unroll
        for (int k = 0; k < 2; ++k)
#pragma unroll
          for (int hh = 0; hh < 2; ++hh) {
            const __half2 sc2 = u2h(get(sv[k][g / 2], (2 * g + hh) % 4));
            if constexpr (!kVWide) {
              const __half2 p2 = u2h(pp[2 * k + hh]), r2 = u2h(pr[2 * k + hh]);
              const __half2 h = __hmul2_rn(p2, sc2);
              bh[k][hh] = h2u(h);
              bl[k][hh] = h2u(__hfma2(r2, sc2, __hfma2(p2, sc2, __hneg2(h))));
            } else {
              const float2 sf = __half22float2(sc2), x = pf[2 * k + hh];
              const float x0 = x.x * sf.x, x1 = x.y * sf.y;
              const __half2 h = __floats2half2_rn(x0, x1);
              const float2 hf = __half22float2(h);
              bh[k][hh] = h2u(h);
              bl[k][hh] = h2u(__floats2half2_rn(x0 - hf.x, x1 - hf.y));
            }
          }
#pragma unroll
        for (int mm = 0; mm < 2; ++mm) {
          const int m16 = 2 * g + mm, cl = m16 % S;
          float t[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
          for (int k = 0; k < 2; ++k) {
            const int j0 = 2 * (k * kMG + m16 / S);
            const uint32_t w0 = get(vw[j0 / 4], j0 % 4), w1 = get(vw[(j0 + 1) / 4], (j0 + 1) % 4);
            const uint32_t a0 = code_pair<BITS>(w0, cl), a1 = code_pair<BITS>(w0 >> 8, cl);
            const uint32_t a2 = code_pair<BITS>(w1, cl), a3 = code_pair<BITS>(w1 >> 8, cl);
            mma_16816(t, a0, a1, a2, a3, bh[k][0], bh[k][1]);
            mma_16816(t, a0, a1, a2, a3, bl[k][0], bl[k][1]);
          }
#pragma unroll
          for (int j = 0; j < 4; ++j) o[m16][j] += t[j];
        }
      }
    };
    if (vwide) v_tiles(std::true_type{});
    else v_tiles(std::false_type{});
  };

  // A unit of the fp16 tail (tokens 32 u ..), straight from global memory, in halves (of the
  // channels for K, of the tokens for V) so that a half's loads are in flight together without
  // taking the registers of all. V's A fragments: 8x8 tiles of V rows (token r, channels 2 qd,
  // + 1) transposed in registers (movmatrix) to (channel r, tokens 2 qd, + 1).
  auto tail_unit = [&](int u) {
    if (o_scaled) rescale_o(false);
    const int first = 32 * u, n = min(32, p.tail - first);
    const __half* kt = p.k_tail + (seq * p.tail_cap + first) * D;
    const __half* vt = p.v_tail + (seq * p.tail_cap + first) * D;
    auto row_pair = [&](const __half* rows, int t, int c) {  // (x[t][c], x[t][c + 1]), 0 past the tail
      return t < n ? *reinterpret_cast<const uint32_t*>(rows + size_t(t) * D + c) : 0u;
    };
    float sc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i) sc[i][0] = sc[i][1] = sc[i][2] = sc[i][3] = 0.f;
#pragma unroll 1
    for (int half = 0; half < 2; ++half) {
      uint32_t kb[kK16 / 2][4][2];
#pragma unroll
      for (int i = 0; i < kK16 / 2; ++i)
#pragma unroll
        for (int n8 = 0; n8 < 4; ++n8)
#pragma unroll
          for (int h = 0; h < 2; ++h) kb[i][n8][h] = row_pair(kt, 8 * n8 + r, 16 * (half * kK16 / 2 + i) + 8 * h + 2 * qd);
#pragma unroll
      for (int i = 0; i < kK16 / 2; ++i) {
        const uint2 qa = q_sm[(half * kK16 / 2 + i) * 32 + lane];
#pragma unroll
        for (int n8 = 0; n8 < 4; ++n8) mma_16816(sc[n8], qa.x, 0u, qa.y, 0u, kb[i][n8][0], kb[i][n8][1]);
      }
    }
    float s[4][2];
#pragma unroll
    for (int n8 = 0; n8 < 4; ++n8)
#pragma unroll
      for (int e = 0; e < 2; ++e) s[n8][e] = 8 * n8 + 2 * qd + e < n ? sc[n8][e] * scale_log2 : -INFINITY;
    uint32_t ph[4], pl[4];
    softmax(s, ph, pl);
#pragma unroll 1
    for (int k = 0; k < 2; ++k) {
      // Tile (m16, reg): rows of tokens 16 k + 8 (reg >> 1) + r, channels 16 m16 + 8 (reg & 1) + 2 qd.
      uint32_t va[kM16][4];
#pragma unroll
      for (int m16 = 0; m16 < kM16; ++m16)
#pragma unroll
        for (int reg = 0; reg < 4; ++reg) va[m16][reg] = row_pair(vt, 16 * k + 8 * (reg >> 1) + r, 16 * m16 + 8 * (reg & 1) + 2 * qd);
      const uint32_t b0 = k ? ph[2] : ph[0], b1 = k ? ph[3] : ph[1], l0 = k ? pl[2] : pl[0], l1 = k ? pl[3] : pl[1];
#pragma unroll
      for (int m16 = 0; m16 < kM16; ++m16) {
        const uint32_t a0 = kivi::transpose8x8(va[m16][0]), a1 = kivi::transpose8x8(va[m16][1]);
        const uint32_t a2 = kivi::transpose8x8(va[m16][2]), a3 = kivi::transpose8x8(va[m16][3]);
        mma_16816(o[m16], a0, a1, a2, a3, b0, b1);
        mma_16816(o[m16], a0, a1, a2, a3, l0, l1);
      }
    }
  };

  // The warp's units u0, u0 + 4, ...; chunk records go through kStages buffers.
  const uint32_t* recs = p.records + seq * size_t(p.chunks) * L::kWords;
  auto stage = [&](int i) { return reinterpret_cast<uint32_t*>(area + (i % kStages) * Smem::kStage); };
  auto issue = [&](int i) {
    const int u = u0 + i * kAttnWarps;
    if (u < u_end && u >= ntail) {
      const uint4* src = reinterpret_cast<const uint4*>(recs + size_t(u - ntail) * L::kWords);
      const uint32_t dst = uint32_t(__cvta_generic_to_shared(stage(i)));
#pragma unroll
      for (int x = 0; x < L::kWords / 128; ++x) cp_async16(dst + 16 * (lane + 32 * x), src + lane + 32 * x);
    }
    cp_async_commit();  // one group per unit, empty or not: wait_group counts them
  };
#pragma unroll
  for (int i = 0; i < kStages - 1; ++i) issue(i);
  for (int i = 0; u0 + i * kAttnWarps < u_end; ++i) {
    const int u = u0 + i * kAttnWarps;
    issue(i + kStages - 1);  // into the buffer unit i - 1 used (the __syncwarp below ended its reads)
    if (u < ntail) {
      tail_unit(u);
    } else {
      cp_async_wait<kStages - 1>();  // unit i's group is complete (this lane's copies)
      __syncwarp();                         // and every lane's
      if (wide) chunk(stage(i), std::true_type{});
      else chunk(stage(i), std::false_type{});
    }
    __syncwarp();
  }
  cp_async_wait<0>();
  __syncwarp();

  // The warp's partial for heads 0..7 into its area: [8][D + 2] (acc, max, sum), acc in plain units
  // with the V zero term added (group g = m16 / 2 of lane 4 g + qd).
  l += __shfl_xor_sync(0xFFFFFFFFu, l, 1);
  l += __shfl_xor_sync(0xFFFFFFFFu, l, 2);
  float* rows = reinterpret_cast<float*>(area);
#pragma unroll
  for (int g = 0; g < kGroups; ++g) {
    const float za = __shfl_sync(0xFFFFFFFFu, zacc[0], 4 * g + qd) * tshift;
    const float zb = __shfl_sync(0xFFFFFFFFu, zacc[1], 4 * g + qd) * tshift;
#pragma unroll
    for (int mm = 0; mm < 2; ++mm) {
      const int m16 = 2 * g + mm;
      const float f = o_scaled ? 1.f / o_unit(m16) : tshift;
#pragma unroll
      for (int j = 0; j < 4; ++j)
        rows[(2 * qd + (j & 1)) * (D + 2) + 16 * m16 + r + 8 * (j >> 1)] = o[m16][j] * f + ((j & 1) ? zb : za);
    }
  }
  if (qd == 0) {
    rows[r * (D + 2) + D] = m == -INFINITY ? -INFINITY : m - pshift;
    rows[r * (D + 2) + D + 1] = l;
  }
  __syncthreads();

  // Merge the warps' partials: this split's (acc, max, sum) per real head.
  for (int i = threadIdx.x; i < group * D; i += blockDim.x) {
    const int g = i / D, d = i % D;
    auto warp_row = [&](int w) { return reinterpret_cast<const float*>(smem + w * Smem::kWarp) + g * (D + 2); };
    write_partial(part + ((size_t(b) * q_heads + size_t(head) * group + g) * splits + split) * (D + 2), D, d,
                  merge_warps<kAttnWarps>(warp_row, D, d));
  }
}

}  // namespace detail
}  // namespace kvcomp
