// The fused kernel's uncompressed tail: the tokens of each (sequence, kv
// head)'s block in progress (up to T - 1, more with max_rollback), held in a
// ring of rows (TailLayout): D elements of the input type, or Codes8 / Codes6
// rows (kvcomp/tail_codes.hpp). A CTA that has the tail spreads its 32-token
// chunks over its warps after their blocks; each warp folds its chunks into
// its partial rows ([R][D + 2]: acc, max, sum).
//
// fp16 and bf16 rows, and code rows with fp16 or bf16 params, go on tensor
// cores (attend_tail_mma), as a block's codes do: a chunk is ~70 loads and
// ~100 mmas a lane, about a quarter of a block's time, so the split plan can
// put the tail after a split's blocks rather than give it a unit of its own
// that would add a block to the busiest warps (tail_rides,
// attention_params.cuh; bench/RESULTS.md: 32831 x 8 373 -> 359 us). fp32
// rows and code rows with fp32 params take the CUDA-core path
// (attend_tail_rows), about a block's time a chunk.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "decode_common.cuh"
#include "mma_ops.cuh"

namespace kvcomp {
namespace detail {

constexpr int32_t kTailF16 = 0, kTailBF16 = 1;  // AttendParams::tail_dtype, as DType

/// Where one (sequence, kv head)'s uncompressed tail is (AttendParams' tail fields).
struct TailArgs {
  const void* k_tail;
  const void* v_tail;
  int tail_rows, row_bytes, codes, dtype, sinks;  // codes: 0 (rows of the input type), 8 or 6 code bits
  int ring;     // slot * kv_heads + head: its ring of tail_rows rows
  int t_begin;  // the tail's first token (closed blocks x T)
  int tokens;   // tokens in it
  int first;    // this warp's first chunk (tokens from t_begin, a multiple of 32)
  int stride;   // tokens between this warp's chunks (32 x the CTA's warps)
};

/// A partial row's two parts under their joint max mx: the weights of the
/// warp's blocks (the row's max so far, at rg[D]) and of the tail (its max
/// m_tail).
struct TailFold {
  float fw, ft, mx;
  __device__ static TailFold of(const float* rg, int D, float m_tail) {
    const float mw = rg[D], mx = fmaxf(mw, m_tail);
    return {mw == -INFINITY ? 0.f : exp2f(mw - mx), m_tail == -INFINITY ? 0.f : exp2f(m_tail - mx), mx};
  }
};

/// Attends one warp to its chunks of the tail (TailArgs) on CUDA cores and
/// folds them into the first kRows rows of the warp's partial `rows`
/// (row_bounds: each row's visible tokens [lo, hi), plus the sinks); the
/// rows past the CTA's real ones are padding, not merged (attend_tail picks
/// kRows). Out of line: the tail's loads in flight want registers that,
/// inlined, the block loop paid for in spills (D 128: the kernel's spills
/// 220/224 -> 128/116 B out of line).
template <int D, int kR, int kRows>
__device__ __noinline__ void attend_tail_rows(const TailArgs a, const float* q_s, float* rows, const int2* row_bounds) {
  static_assert(kRows <= kR, "rows of the CTA");
  const int lane = threadIdx.x % 32;
  SoftmaxAcc<D, kRows> st;
  st.init();
  int row_lo[kRows], row_hi[kRows];
#pragma unroll
  for (int g = 0; g < kRows; ++g) {
    row_lo[g] = row_bounds[g].x;
    row_hi[g] = row_bounds[g].y;
  }
  const size_t base = size_t(a.ring) * a.tail_rows * a.row_bytes;  // bytes
  // The tail is held in the K/V input's type, or as code rows with params of that type.
  auto attend_in = [&](auto type_tag) {
    using E = decltype(type_tag);
    const uint8_t* kt = static_cast<const uint8_t*>(a.k_tail) + base;
    const uint8_t* vt = static_cast<const uint8_t*>(a.v_tail) + base;
    for (int first = a.first; first < a.tokens; first += a.stride) {
      const int t0 = a.t_begin + first;
      auto visible = [&](int g, int i) {
        const int t = t0 + i;
        return t < row_hi[g] && (t >= row_lo[g] || t < a.sinks);
      };
      // Token t is in ring row t % tail_rows; 32 rows from a multiple of 32 never wrap (T, rows: multiples of 32).
      const size_t at = size_t(t0 % a.tail_rows) * a.row_bytes;
      attend_rows<D, kRows>(st, q_s, TailRows<E, D>{kt + at, a.row_bytes, a.codes},
                            TailRows<E, D>{vt + at, a.row_bytes, a.codes}, min(32, a.tokens - first), visible);
    }
  };
  if (a.dtype == kTailF16) attend_in(__half{});
  else if (a.dtype == kTailBF16) attend_in(__nv_bfloat16{});
  else attend_in(float{});
#pragma unroll
  for (int g = 0; g < kRows; ++g) {
    float* rg = rows + g * (D + 2);
    const float lt = warp_sum(st.l[g]);
    const TailFold f = TailFold::of(rg, D, st.m[g]);
    const float lw = rg[D + 1];
    __syncwarp();
#pragma unroll
    for (int j = 0; j < SoftmaxAcc<D, kRows>::kPerLane; ++j)
      if (D % 32 == 0 || lane + 32 * j < D) rg[lane + 32 * j] = rg[lane + 32 * j] * f.fw + st.acc[g][j] * f.ft;
    if (lane == 0) { rg[D] = f.mx; rg[D + 1] = lw * f.fw + lt * f.ft; }
  }
}

/// fp16 or bf16 operands of an mma: two floats packed (round to nearest),
/// an element back to float, the mma itself.
template <typename E>
struct MmaType;
template <>
struct MmaType<__half> {
  __device__ static uint32_t pack(float lo, float hi) { return pack_half2(lo, hi); }
  __device__ static float low(uint32_t w) { return __half2float(__ushort_as_half(uint16_t(w))); }
  __device__ static float high(uint32_t w) { return __half2float(__ushort_as_half(uint16_t(w >> 16))); }
  __device__ static void mma(float (&d)[4], uint4 a, uint32_t b0, uint32_t b1) { mma_16816(d, a, b0, b1); }
};
template <>
struct MmaType<__nv_bfloat16> {
  __device__ static uint32_t pack(float lo, float hi) { return pack_bf162(lo, hi); }
  __device__ static float low(uint32_t w) { return __uint_as_float(w << 16); }
  __device__ static float high(uint32_t w) { return __uint_as_float(w & 0xFFFF0000u); }
  __device__ static void mma(float (&d)[4], uint4 a, uint32_t b0, uint32_t b1) { mma_16816_bf16(d, a, b0, b1); }
};

/// x as hi + lo in E (two registers of two elements each): the mma's products
/// of hi and lo keep ~2^-22 (fp16) or ~2^-17 (bf16) of x's precision.
template <typename E>
__device__ __forceinline__ void split_pair(float x0, float x1, uint32_t& hi, uint32_t& lo) {
  hi = MmaType<E>::pack(x0, x1);
  lo = MmaType<E>::pack(x0 - MmaType<E>::low(hi), x1 - MmaType<E>::high(hi));
}

/// 4 codes of a row (channels c .. c + 3, 8-bit codes: tail_quad8) as fp16
/// integers, two to a register in the layout of 4 fp16 elements: exact
/// (0x6400 | code is 1024 + code). Codes above 252 (-Inf, +Inf, NaN: any
/// flagged by special_codes) need codes_as_half_special.
__device__ __forceinline__ uint2 codes_as_half(uint32_t w) {
  const __half2 k1024 = __half2half2(__ushort_as_half(0x6400));
  const uint32_t a = __byte_perm(w, 0x64u, 0x4140), b = __byte_perm(w, 0x64u, 0x4342);
  const __half2 ha = __hsub2(*reinterpret_cast<const __half2*>(&a), k1024);
  const __half2 hb = __hsub2(*reinterpret_cast<const __half2*>(&b), k1024);
  return make_uint2(*reinterpret_cast<const uint32_t*>(&ha), *reinterpret_cast<const uint32_t*>(&hb));
}
/// Non-zero where a byte of w is above 252 (byte >= 128 and its low 7 bits + 3 >= 128).
__device__ __forceinline__ uint32_t special_codes(uint32_t w) {
  return w & ((w & 0x7F7F7F7Fu) + 0x03030303u) & 0x80808080u;
}
/// codes_as_half with the non-finite codes as fp16 -Inf, +Inf and NaN, so
/// they stay non-finite through the mma. Not always the same class as the
/// CUDA-core path's fp32 arithmetic gives: q's and p's lo parts are often 0
/// and 0 x Inf is NaN, so an infinite K or V value can come out NaN (and a
/// score of -Inf, which fp32 would mask, NaN), as for fp16 rows on tensor
/// cores.
__device__ __forceinline__ uint2 codes_as_half_special(uint32_t w) {
  uint32_t h[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t c = (w >> (8 * i)) & 0xFFu;
    h[i] = c == format::kTailNaN      ? 0x7E00u
           : c == format::kTailPosInf ? 0x7C00u
           : c == format::kTailNegInf ? 0xFC00u
                                      : uint32_t(__half_as_ushort(__uint2half_rn(c)));
  }
  return make_uint2(h[0] | h[1] << 16, h[2] | h[3] << 16);
}
/// A code row's lo and step (fp16 or bf16 params, `dtype`), from their 4 bytes.
__device__ __forceinline__ float2 code_params(uint32_t w, int dtype) {
  if (dtype == kTailBF16) return make_float2(__uint_as_float(w << 16), __uint_as_float(w & 0xFFFF0000u));
  return make_float2(__half2float(__ushort_as_half(uint16_t(w))), __half2float(__ushort_as_half(uint16_t(w >> 16))));
}

/// The tail's chunks of one warp on tensor cores, all kTiles x 8 rows of the
/// CTA, folded into `rows` as attend_tail_rows. Rows of E = fp16 or bf16, or
/// (kCodes, E = fp16: the mma's type) Codes8 / Codes6 rows with fp16 or bf16
/// params (read as 8-bit codes: tail_quad8).
/// Operands as for a block (attention.cuh), with the channels of each 16
/// permuted so that a lane's share is 4 adjacent elements of a row (8 bytes,
/// or 4 codes):
/// lane 4 r + q holds channels 4q .. 4q + 3 of 16, which serve as the mma's
/// k (or m) indices 2q, 2q + 1, 2q + 8, 2q + 9.
///   K: S^T = A B, A = q (rows 0..7 hi, 8..15 lo: split_pair), B = the rows
///      as loaded (token r, channels 4q .. 4q + 3);
///   V: O^T = A B, A = V^T (16 channels x 16 tokens: the loaded 8x8 pieces
///      transposed by movmatrix), B = p (hi and lo, two mmas).
/// Code rows are their codes as fp16 integers (exact), each token's params
/// applied as a block's are (attention.cuh), per token instead of per channel:
///   K: s_t = step_t (q . codes_t) + lo_t sum(q);
///   V: o = sum_t (p_t step_t) codes_t + sum_t p_t lo_t, B = p x step scaled
///      by a power of two that brings the largest step seen so far to [0.5, 1)
///      (fp16 keeps p x step's precision; the scale only ever shrinks, so
///      rescaling o between chunks cannot overflow).
template <typename E, int D, int kTiles, bool kCodes>
__device__ __noinline__ void attend_tail_mma(const TailArgs a, const float* q_s, float* rows, const int2* row_bounds) {
  using M = MmaType<E>;
  static_assert(!kCodes || std::is_same<E, __half>::value, "codes go through fp16 mmas");
  constexpr int kK16 = D / 16;
  static_assert(D % 16 == 0, "head_dim a multiple of 16");
  // k16 steps (K) and m16 tiles (V) whose loads are in flight together: the
  // accumulators of V (kTiles D / 4 registers) stay live throughout.
  constexpr int kKBatch = kTiles * kK16 <= 6 ? kK16 : 2;
  constexpr int kMBatch = kK16 < 4 ? kK16 : 4;
  constexpr int kElem = int(sizeof(E));  // bytes a channel (rows of E)
  const int code_bytes = int(format::tail_code_bytes(D, a.codes));  // where a code row's params start
  const int lane = threadIdx.x % 32, row = lane / 4, quad = lane % 4;

  // q's scale: fp16 operands hold q / 2^e where q would overflow them (bf16 has fp32's range).
  float q_inv = 1.f, s_scale = 1.f;
  if constexpr (std::is_same<E, __half>::value) {
    float amax = 0.f;
#pragma unroll
    for (int t = 0; t < kTiles; ++t)
#pragma unroll
      for (int k16 = 0; k16 < kK16; ++k16) {
        const float4 x = *reinterpret_cast<const float4*>(q_s + (8 * t + row) * D + 16 * k16 + 4 * quad);
        amax = fmaxf(amax, fmaxf(fmaxf(fabsf(x.x), fabsf(x.y)), fmaxf(fabsf(x.z), fabsf(x.w))));
      }
    amax = warp_max(amax);
    if (amax > 16384.f) {  // uniform
      const float e = ceilf(log2f(amax / 16384.f));
      s_scale = exp2f(e);
      q_inv = exp2f(-e);
    }
  }
  // A fragment of q for tile t, channels 16 k16 + 4 quad .. + 3 of row 8 t + `row`.
  auto q_operand = [&](int t, int k16) {
    const float4 x = *reinterpret_cast<const float4*>(q_s + (8 * t + row) * D + 16 * k16 + 4 * quad);
    uint4 f;
    split_pair<E>(x.x * q_inv, x.y * q_inv, f.x, f.y);
    split_pair<E>(x.z * q_inv, x.w * q_inv, f.z, f.w);
    return f;
  };
  // Code rows: sum(q) of row 8 t + `row` (its quad sums its channels), for K's lo_t term.
  float q_sum[kTiles];
  if constexpr (kCodes) {
#pragma unroll
    for (int t = 0; t < kTiles; ++t) {
      float s = 0.f;
#pragma unroll
      for (int k16 = 0; k16 < kK16; ++k16) {
        const float4 x = *reinterpret_cast<const float4*>(q_s + (8 * t + row) * D + 16 * k16 + 4 * quad);
        s += (x.x + x.y) + (x.z + x.w);
      }
      s += __shfl_xor_sync(0xFFFFFFFFu, s, 1);
      q_sum[t] = s + __shfl_xor_sync(0xFFFFFFFFu, s, 2);
    }
  }

  // Softmax state of row 8 t + `row` (quad-uniform max; this lane's share of the sum) and O^T:
  // o[t][m16] = channels of 16 m16 (see v_channel) x rows 8 t + 2 quad, + 1. Code rows: o in units
  // of v_scale, and p_lo = this lane's share of sum_t p_t lo_t of row 8 t + `row`.
  float m[kTiles], l[kTiles], p_lo[kTiles], o[kTiles][kK16][4];
  float v_scale = 0.f;  // code rows: 0 until the first chunk
#pragma unroll
  for (int t = 0; t < kTiles; ++t) {
    m[t] = -INFINITY;
    l[t] = p_lo[t] = 0.f;
#pragma unroll
    for (int i = 0; i < kK16; ++i) o[t][i][0] = o[t][i][1] = o[t][i][2] = o[t][i][3] = 0.f;
  }
  const size_t base = size_t(a.ring) * a.tail_rows * a.row_bytes;  // bytes
  for (int first = a.first; first < a.tokens; first += a.stride) {
    const int n = min(32, a.tokens - first);
    const size_t at = base + size_t((a.t_begin + first) % a.tail_rows) * a.row_bytes;  // see attend_tail_rows
    const uint8_t* kc = static_cast<const uint8_t*>(a.k_tail) + at;
    const uint8_t* vc = static_cast<const uint8_t*>(a.v_tail) + at;
    // The chunk's rows into L2 (a lane a row): K's later batches and V then wait on L2, not DRAM.
    if (lane < n)
      for (int off = 0; off < a.row_bytes; off += 128) {
        asm volatile("prefetch.global.L2 [%0];" ::"l"(kc + size_t(lane) * a.row_bytes + off));
        asm volatile("prefetch.global.L2 [%0];" ::"l"(vc + size_t(lane) * a.row_bytes + off));
      }
    // Code rows: the params of this lane's score tokens 8 n8 + 2 quad + i (rows past n: row n - 1's).
    uint32_t k_prm[4][2], v_prm[4][2];
    if constexpr (kCodes) {
#pragma unroll
      for (int n8 = 0; n8 < 4; ++n8)
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const size_t r = size_t(min(8 * n8 + 2 * quad + i, n - 1)) * a.row_bytes + code_bytes;
          k_prm[n8][i] = *reinterpret_cast<const uint32_t*>(kc + r);
          v_prm[n8][i] = *reinterpret_cast<const uint32_t*>(vc + r);
        }
    }

    // K: scores of tokens 8 n8 + 2 quad + {0, 1} (rows past n read row n - 1; masked below).
    float sc[kTiles][4][4];
#pragma unroll
    for (int t = 0; t < kTiles; ++t)
#pragma unroll
      for (int n8 = 0; n8 < 4; ++n8) sc[t][n8][0] = sc[t][n8][1] = sc[t][n8][2] = sc[t][n8][3] = 0.f;
#pragma unroll 1
    for (int kb = 0; kb < kK16; kb += kKBatch) {
      uint2 kw[kKBatch][4];
      auto k_row = [&](int n8) { return kc + size_t(min(8 * n8 + row, n - 1)) * a.row_bytes; };
      auto k_channel = [&](int i) { return 16 * (kb + i) + 4 * quad; };
      if constexpr (kCodes) {
        uint32_t raw[kKBatch][4], special = 0;
        // One (warp-uniform) branch on the code width a batch, so that the batch's loads issue together.
        auto load_batch = [&](auto six) {
#pragma unroll
          for (int i = 0; i < kKBatch; ++i)
#pragma unroll
            for (int n8 = 0; n8 < 4; ++n8)
              if (kK16 % kKBatch == 0 || kb + i < kK16)
                raw[i][n8] = six ? format::tail_quad8_of6(k_row(n8), k_channel(i))
                                 : *reinterpret_cast<const uint32_t*>(k_row(n8) + k_channel(i));
        };
        if (a.codes == 6) load_batch(std::true_type{});
        else load_batch(std::false_type{});
#pragma unroll
        for (int i = 0; i < kKBatch; ++i)
#pragma unroll
          for (int n8 = 0; n8 < 4; ++n8)
            if (kK16 % kKBatch == 0 || kb + i < kK16) special |= special_codes(raw[i][n8]);
        const bool slow = __any_sync(0xFFFFFFFFu, special != 0);  // non-finite values (rare)
#pragma unroll
        for (int i = 0; i < kKBatch; ++i)
#pragma unroll
          for (int n8 = 0; n8 < 4; ++n8)
            if (kK16 % kKBatch == 0 || kb + i < kK16)
              kw[i][n8] = slow ? codes_as_half_special(raw[i][n8]) : codes_as_half(raw[i][n8]);
      } else {
#pragma unroll
        for (int i = 0; i < kKBatch; ++i)
#pragma unroll
          for (int n8 = 0; n8 < 4; ++n8)
            if (kK16 % kKBatch == 0 || kb + i < kK16)
              kw[i][n8] = *reinterpret_cast<const uint2*>(k_row(n8) + k_channel(i) * kElem);
      }
#pragma unroll
      for (int i = 0; i < kKBatch; ++i) {
        if (kK16 % kKBatch != 0 && kb + i >= kK16) break;
#pragma unroll
        for (int t = 0; t < kTiles; ++t) {
          const uint4 qa = q_operand(t, kb + i);
#pragma unroll
          for (int n8 = 0; n8 < 4; ++n8) M::mma(sc[t][n8], qa, kw[i][n8].x, kw[i][n8].y);
        }
      }
    }

    // Code rows: V's scale for this chunk and those before it (o rescaled below with the softmax's corr).
    float v_rescale = 1.f;
    if constexpr (kCodes) {
      float smax = 0.f;
#pragma unroll
      for (int n8 = 0; n8 < 4; ++n8)
#pragma unroll
        for (int i = 0; i < 2; ++i) smax = fmaxf(smax, code_params(v_prm[n8][i], a.dtype).y);
      smax = fmaxf(smax, __shfl_xor_sync(0xFFFFFFFFu, smax, 1));
      smax = fmaxf(smax, __shfl_xor_sync(0xFFFFFFFFu, smax, 2));  // the quads hold the chunk's 32 tokens
      int e = 0;
      frexpf(smax, &e);
      // Exact powers of two; at most 2^126 (bf16 steps go down to 2^-133), so 1 / v_scale stays finite.
      const float chunk_scale = smax > 0.f ? ldexpf(1.f, -max(e, -126)) : 1.f;
      const float next = v_scale == 0.f ? chunk_scale : fminf(v_scale, chunk_scale);
      if (v_scale != 0.f) v_rescale = next / v_scale;
      v_scale = next;
    }

    // Online softmax of each row over the chunk (masked: past n, causal, window), then p as V's B
    // operands: tokens 16 k16 + 2 quad + {0, 1} (+ 8) of row 8 t + `row`, hi and lo (code rows: p x step
    // x v_scale).
    const int t0 = a.t_begin + first;
    uint32_t pb[kTiles][2][2], pl[kTiles][2][2];
    float corr_a[kTiles], corr_b[kTiles];
#pragma unroll
    for (int t = 0; t < kTiles; ++t) {
      const int2 mine = row_bounds[8 * t + row];
      float s[4][2];
      float cmax = -INFINITY;
#pragma unroll
      for (int n8 = 0; n8 < 4; ++n8)
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const int c = 8 * n8 + 2 * quad + i, tok = t0 + c;
          const bool seen = c < n && tok < mine.y && (tok >= mine.x || tok < a.sinks);
          float x = (sc[t][n8][i] + sc[t][n8][i + 2]) * s_scale;
          if constexpr (kCodes) {
            const float2 kp = code_params(k_prm[n8][i], a.dtype);
            // A step of 0 has only code 0 for finite values; 1 keeps a non-finite code non-finite.
            x = fmaf(kp.y == 0.f ? 1.f : kp.y, x, kp.x * q_sum[t]);
          }
          s[n8][i] = seen ? x : -INFINITY;
          cmax = fmaxf(cmax, s[n8][i]);
        }
      const QuadSoftmaxStep step = quad_softmax_step(m[t], cmax);
      const float m_sub = step.sub, corr = step.scale;
      m[t] = step.max;
      l[t] *= corr;
      p_lo[t] *= corr;
      // o[t] holds rows 8 t + 2 quad and + 1, whose quads are lanes 8 quad and 8 quad + 4.
      corr_a[t] = __shfl_sync(0xFFFFFFFFu, corr, 8 * quad) * v_rescale;
      corr_b[t] = __shfl_sync(0xFFFFFFFFu, corr, 8 * quad + 4) * v_rescale;
#pragma unroll
      for (int n8 = 0; n8 < 4; ++n8) {
        float p0 = exp2f(s[n8][0] - m_sub), p1 = exp2f(s[n8][1] - m_sub);
        l[t] += p0 + p1;
        if constexpr (kCodes) {
          const float2 v0 = code_params(v_prm[n8][0], a.dtype), v1 = code_params(v_prm[n8][1], a.dtype);
          p_lo[t] = fmaf(p0, v0.x, fmaf(p1, v1.x, p_lo[t]));
          p0 *= (v0.y == 0.f ? 1.f : v0.y) * v_scale;  // as K's step of 0
          p1 *= (v1.y == 0.f ? 1.f : v1.y) * v_scale;
        }
        split_pair<E>(p0, p1, pb[t][n8 / 2][n8 % 2], pl[t][n8 / 2][n8 % 2]);
      }
    }
#pragma unroll
    for (int t = 0; t < kTiles; ++t)
#pragma unroll
      for (int i = 0; i < kK16; ++i) {
        o[t][i][0] *= corr_a[t];
        o[t][i][1] *= corr_b[t];
        o[t][i][2] *= corr_a[t];
        o[t][i][3] *= corr_b[t];
      }

    // V: tokens 16 k16 + r and + 8 of this lane, channels 16 m16 + 4 quad .. + 3; rows past n are
    // zeros (0 x a stale row's Inf or NaN would be NaN).
#pragma unroll 1
    for (int k16 = 0; k16 < 2; ++k16) {
      const int ta = 16 * k16 + row, tb = ta + 8;
      const uint8_t* ra = vc + size_t(min(ta, n - 1)) * a.row_bytes;
      const uint8_t* rb = vc + size_t(min(tb, n - 1)) * a.row_bytes;
#pragma unroll
      for (int mb = 0; mb < kK16; mb += kMBatch) {
        uint2 va[kMBatch], vb[kMBatch];
        if constexpr (kCodes) {
          uint32_t raw_a[kMBatch], raw_b[kMBatch], special = 0;
          auto load_batch = [&](auto six) {  // as K's: one branch on the code width a batch
#pragma unroll
            for (int i = 0; i < kMBatch; ++i)
              if (kK16 % kMBatch == 0 || mb + i < kK16) {
                const int c = 16 * (mb + i) + 4 * quad;
                raw_a[i] = six ? format::tail_quad8_of6(ra, c) : *reinterpret_cast<const uint32_t*>(ra + c);
                raw_b[i] = six ? format::tail_quad8_of6(rb, c) : *reinterpret_cast<const uint32_t*>(rb + c);
              }
          };
          if (a.codes == 6) load_batch(std::true_type{});
          else load_batch(std::false_type{});
#pragma unroll
          for (int i = 0; i < kMBatch; ++i)
            if (kK16 % kMBatch == 0 || mb + i < kK16) {
              if (ta >= n) raw_a[i] = 0u;  // rows past n: zeros (see above)
              if (tb >= n) raw_b[i] = 0u;
              special |= special_codes(raw_a[i]) | special_codes(raw_b[i]);
            }
          const bool slow = __any_sync(0xFFFFFFFFu, special != 0);  // non-finite values (rare)
#pragma unroll
          for (int i = 0; i < kMBatch; ++i)
            if (kK16 % kMBatch == 0 || mb + i < kK16) {
              va[i] = slow ? codes_as_half_special(raw_a[i]) : codes_as_half(raw_a[i]);
              vb[i] = slow ? codes_as_half_special(raw_b[i]) : codes_as_half(raw_b[i]);
            }
        } else {
#pragma unroll
          for (int i = 0; i < kMBatch; ++i)
            if (kK16 % kMBatch == 0 || mb + i < kK16) {
              va[i] = *reinterpret_cast<const uint2*>(ra + (16 * (mb + i) + 4 * quad) * sizeof(E));
              vb[i] = *reinterpret_cast<const uint2*>(rb + (16 * (mb + i) + 4 * quad) * sizeof(E));
              if (ta >= n) va[i] = make_uint2(0u, 0u);
              if (tb >= n) vb[i] = make_uint2(0u, 0u);
            }
        }
#pragma unroll
        for (int i = 0; i < kMBatch; ++i) {
          if (kK16 % kMBatch != 0 && mb + i >= kK16) break;
          // A rows 0..7: channels 4 (r / 2) + r % 2 of the 16 (the loads' .x), rows 8..15: + 2 (.y).
          const uint4 av = make_uint4(transpose_8x8(va[i].x), transpose_8x8(va[i].y), transpose_8x8(vb[i].x),
                                      transpose_8x8(vb[i].y));
#pragma unroll
          for (int t = 0; t < kTiles; ++t) {
            M::mma(o[t][mb + i], av, pb[t][k16][0], pb[t][k16][1]);
            M::mma(o[t][mb + i], av, pl[t][k16][0], pl[t][k16][1]);
          }
        }
      }
    }
  }

  // Fold into the partial: row 8 t + `row`'s max and sum on its quad, then each lane's o elements
  // (rows 8 t + 2 quad + (j & 1), channel 16 i + 4 (r / 2) + r % 2 + 2 (j >> 1)); code rows: o / v_scale
  // + the row's sum_t p_t lo_t.
  const float o_unit = kCodes && v_scale != 0.f ? 1.f / v_scale : 1.f;  // a power of two: exact
#pragma unroll
  for (int t = 0; t < kTiles; ++t) {
    l[t] += __shfl_xor_sync(0xFFFFFFFFu, l[t], 1);
    l[t] += __shfl_xor_sync(0xFFFFFFFFu, l[t], 2);
    float lo_a = 0.f, lo_b = 0.f;
    if constexpr (kCodes) {
      p_lo[t] += __shfl_xor_sync(0xFFFFFFFFu, p_lo[t], 1);
      p_lo[t] += __shfl_xor_sync(0xFFFFFFFFu, p_lo[t], 2);
      lo_a = __shfl_sync(0xFFFFFFFFu, p_lo[t], 8 * quad);
      lo_b = __shfl_sync(0xFFFFFFFFu, p_lo[t], 8 * quad + 4);
    }
    float* rg = rows + (8 * t + row) * (D + 2);
    const TailFold f = TailFold::of(rg, D, m[t]);
    const float lw = rg[D + 1];
    const float fw_a = __shfl_sync(0xFFFFFFFFu, f.fw, 8 * quad), ft_a = __shfl_sync(0xFFFFFFFFu, f.ft, 8 * quad);
    const float fw_b = __shfl_sync(0xFFFFFFFFu, f.fw, 8 * quad + 4);
    const float ft_b = __shfl_sync(0xFFFFFFFFu, f.ft, 8 * quad + 4);
    __syncwarp();  // every quad has read its row's max and sum
    if (quad == 0) {
      rg[D] = f.mx;
      rg[D + 1] = lw * f.fw + l[t] * f.ft;
    }
    const int ch = 4 * (row / 2) + row % 2;
#pragma unroll
    for (int i = 0; i < kK16; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        float* at = rows + (8 * t + 2 * quad + (j & 1)) * (D + 2) + 16 * i + ch + 2 * (j >> 1);
        const float oj = kCodes ? fmaf(o[t][i][j], o_unit, (j & 1) ? lo_b : lo_a) : o[t][i][j];
        *at = *at * ((j & 1) ? fw_b : fw_a) + oj * ((j & 1) ? ft_b : ft_a);
      }
  }
}

/// Attends a warp to its chunks of the tail for the CTA's `group` real rows
/// (of kR): fp16 and bf16 rows, and code rows with their params, on tensor
/// cores; fp32 rows and code rows with fp32 params on CUDA cores, rounded up
/// to 4, 8 or kR rows (their work is per row, and padding rows, G = 4 in a
/// tile of 8, would double it). tail_cost_quarters (attention_params.cuh)
/// prices the two paths.
template <int D, int kR>
__device__ __forceinline__ void attend_tail(const TailArgs& a, int group, const float* q_s, float* rows,
                                            const int2* row_bounds) {
  const bool narrow = a.dtype == kTailF16 || a.dtype == kTailBF16;
  if (a.codes && narrow) attend_tail_mma<__half, D, kR / 8, true>(a, q_s, rows, row_bounds);
  else if (!a.codes && a.dtype == kTailF16) attend_tail_mma<__half, D, kR / 8, false>(a, q_s, rows, row_bounds);
  else if (!a.codes && a.dtype == kTailBF16)
    attend_tail_mma<__nv_bfloat16, D, kR / 8, false>(a, q_s, rows, row_bounds);
  else if (group <= 4) attend_tail_rows<D, kR, 4>(a, q_s, rows, row_bounds);
  else if (kR > 8 && group <= 8) attend_tail_rows<D, kR, 8>(a, q_s, rows, row_bounds);
  else attend_tail_rows<D, kR, kR>(a, q_s, rows, row_bounds);
}

}  // namespace detail
}  // namespace kvcomp
