// The open tail held as 8- or 6-bit codes (Config::tail_format = Codes8 or
// Codes6): the single source of truth for the CPU reference and the device
// kernels.
//
// Tokens wait in a tail until their block of T closes (cache.hpp). With
// TailFormat::Input a tail row is the token's vector (one kv head, D values)
// in the input's type; with Codes8 / Codes6 (b = 8 / 6 code bits) it is
//   D codes of b bits, then `lo` and `step`, each one element of the input
//   type (row bytes: D b / 8 + 2 x element size, a multiple of 4: D is a
//   multiple of 16). The codes are a little-endian bit string: code c at
//   bits b c .. b c + b - 1 (Codes8: byte c; Codes6: channels 4u .. 4u + 3
//   in the 3 bytes from 3u).
// With M = 2^b - 4 (252 or 60) the largest code of a finite value, for the
// token's D values x_i (exactly as fp32; non-finite values are ignored for
// the range):
//   lo    = the smallest finite x_i (an input value: exact in the input type)
//   hi    = the largest finite x_i; lo = hi = 0 without a finite value
//   span  = hi - lo; s = span / M, the next float up if M s < span
//           (exact test: fmaf(s, M, -span) < 0); or hi / M - lo / M where
//           span overflows (bf16 and fp32 beyond 2^127)          (fp32, IEEE)
//   step  = s rounded up to the input type (fp32: s itself)
//   inv   = 1 / step, 0 if step is 0                             (fp32, IEEE)
//   d     = (x - lo) x inv; x inv - lo inv where span overflowed (x - lo
//           may too); (x - lo) / step where inv overflowed (step below
//           2^-128: bf16 and fp32 subnormal ranges)              (fp32, IEEE)
//   code  = min(M, max(0, rint(d)))
//           -Inf: M + 1, +Inf: M + 2, NaN: M + 3
//   value = fmaf(code, step, lo) for codes 0..M; -Inf, +Inf, a quiet NaN
// Every finite x is within half a step of its value up to fp32 rounding:
//   |value - x| <= (1/2 + 2^-13) step + 2^-23 |x|
// (the rounding of x - lo, of the product with inv, of s, and of the fma), a
// step being about (hi - lo) / M of the token's vector; non-finite values
// keep their class (a NaN's payload is not kept).
//
// Every appended vector goes through this codec before anything else sees
// it: the tail holds its codes, and the block it closes into is quantized
// from the decoded values (also for tokens that enter a block straight from
// an append, without a stay in the tail), so blocks do not depend on how the
// tokens were split into appends. A block value is then within its group's
// bound (format.hpp) of the decoded value, i.e. within that bound plus the
// tail's half step of the input.
//
// Readers work in 8-bit codes: tail_code8 / tail_quad8 return a stored code
// with Codes6's three non-finite codes moved to Codes8's (61..63 ->
// 253..255), so one decode (tail_value) serves both.
#pragma once

#include "kvcomp/format.hpp"

namespace kvcomp {
namespace format {

/// Codes8's codes, the 8-bit codes readers work in (tail_code8).
constexpr uint32_t kTailMaxCode = 252;  // finite values
constexpr uint32_t kTailNegInf = 253, kTailPosInf = 254, kTailNaN = 255;

/// The largest code of a finite value with `bits` code bits (M above).
KVCOMP_HD uint32_t tail_max_code(int bits) { return (1u << bits) - 4u; }

/// Element types of the tail's params, as DType's values (dtype.hpp).
constexpr int kTailElemF16 = 0, kTailElemBF16 = 1, kTailElemF32 = 2;

KVCOMP_HD size_t tail_elem_bytes(int elem) { return elem == kTailElemF32 ? 4 : 2; }
/// Bytes of a row's codes (D a multiple of 16), where its lo and step start.
KVCOMP_HD size_t tail_code_bytes(int head_dim, int bits) { return size_t(head_dim) * bits / 8; }
/// Bytes of a Codes8 / Codes6 tail row: D codes, then lo and step of `param_bytes` each (tail_elem_bytes).
KVCOMP_HD size_t tail_code_row_bytes(int head_dim, size_t param_bytes, int bits) {
  return tail_code_bytes(head_dim, bits) + 2 * param_bytes;
}

/// An element's bits (its size's low bits) as fp32, exactly.
KVCOMP_HD float tail_elem_to_float(uint32_t bits, int elem) {
  return elem == kTailElemF16 ? half_to_float(uint16_t(bits)) : elem == kTailElemBF16 ? bits_float(bits << 16)
                                                                                    : bits_float(bits);
}

/// The bits of finite x, which the element type holds exactly (an input value).
KVCOMP_HD uint32_t tail_elem_exact(float x, int elem) {
  return elem == kTailElemF16 ? float_to_half_down(x) : elem == kTailElemBF16 ? float_bits(x) >> 16 : float_bits(x);
}

/// Non-negative finite s rounded up to the element type (fp16: at most 65504).
KVCOMP_HD uint32_t tail_elem_up(float s, int elem) {
  if (elem == kTailElemF16) {
    bool inexact = false;
    uint16_t mag = half_magnitude_trunc(s, inexact);
    if (inexact && mag != 0x7BFF) ++mag;  // positive patterns are ordered: a carry is the next value
    return mag;
  }
  if (elem == kTailElemBF16) {
    const uint32_t b = float_bits(s);
    return (b >> 16) + ((b & 0xFFFFu) != 0 ? 1u : 0u);
  }
  return float_bits(s);
}

constexpr uint32_t kTailPlain = 0, kTailWide = 1, kTailTiny = 2;  // TailQuant::how: how d is computed

struct TailQuant {
  uint32_t lo_bits, step_bits;  // as stored (element bits)
  float lo, step, inv;
  uint32_t how;  // kTailPlain, kTailWide (span overflowed), kTailTiny (1 / step overflowed)
};

/// The params of a token's vector from its finite range (lo > hi: none finite).
KVCOMP_HD TailQuant make_tail_quant(float lo, float hi, int elem, int bits) {
  if (!(lo <= hi)) lo = hi = 0.f;
  const float span = hi - lo, m = float(tail_max_code(bits));
  const bool wide = !is_finite_bits(float_bits(span));
  float s = wide ? hi / m - lo / m : span / m;
  // Rounded to nearest, s may be below span / M (by half an ulp; subnormal quotients by up to their
  // whole size, to 0): the next float up then (the fma's sign is exact).
  if (!wide && fmaf(s, m, -span) < 0.f) s = bits_float(float_bits(s) + 1u);
  TailQuant q;
  q.lo_bits = tail_elem_exact(lo, elem);
  q.step_bits = tail_elem_up(s, elem);
  q.lo = tail_elem_to_float(q.lo_bits, elem);
  q.step = tail_elem_to_float(q.step_bits, elem);
  q.inv = q.step > 0.f ? 1.0f / q.step : 0.f;
  q.how = wide ? kTailWide : is_finite_bits(float_bits(q.inv)) ? kTailPlain : kTailTiny;
  return q;
}

/// a x b rounded once, never contracted into an fma with what follows (the
/// host and device must round alike).
KVCOMP_HD float tail_mul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

/// x's stored code (`bits` wide) under q.
KVCOMP_HD uint32_t tail_code(float x, const TailQuant& q, int bits) {
  const uint32_t b = float_bits(x), m = tail_max_code(bits);
  if (!is_finite_bits(b)) return m + ((b & 0x7FFFFFu) != 0 ? 3u : (b >> 31) != 0 ? 1u : 2u);
  const float d = q.how == kTailPlain ? (x - q.lo) * q.inv
                  : q.how == kTailWide ? tail_mul(x, q.inv) - tail_mul(q.lo, q.inv)
                                       : (x - q.lo) / q.step;
  const float r = fminf(float(m), fmaxf(0.f, rintf(d)));
  return uint32_t(r);
}

/// A stored code as an 8-bit one (Codes6's non-finite codes 61..63 -> 253..255).
KVCOMP_HD uint32_t tail_code_to8(uint32_t code, int bits) {
  return bits == 8 || code <= tail_max_code(bits) ? code : code + (kTailNegInf - tail_max_code(bits) - 1u);
}

/// Channel c's code of a row (`bits` wide), as an 8-bit code. Reads two
/// bytes at most, both inside the row (its params follow the codes).
KVCOMP_HD uint32_t tail_code8(const uint8_t* row, int c, int bits) {
  if (bits == 8) return row[c];
  const int bit = 6 * c;
  const uint32_t two = uint32_t(row[bit / 8]) | uint32_t(row[bit / 8 + 1]) << 8;
  return tail_code_to8((two >> (bit % 8)) & 0x3Fu, 6);
}

/// tail_quad8 of a Codes6 row: the 3 bytes from 3c / 4, read as the two
/// aligned words from the one holding the first (both always read: no branch
/// a lane takes alone; the second is inside the row: for the row's last quad
/// 3c / 4 = 3 D / 4 - 3 is 1 mod 4, and that word holds the params' first
/// bytes), each 6-bit field of the 24 bits spread into its own byte, the
/// non-finite ones moved up by 192 (61..63 -> 253..255).
KVCOMP_HD uint32_t tail_quad8_of6(const uint8_t* row, int c) {
  const int at = 3 * c / 4, sh = 8 * (at % 4);
  const uint32_t* w = reinterpret_cast<const uint32_t*>(row + (at - at % 4));
  const uint32_t w0 = w[0], w1 = w[1];
#if defined(__CUDA_ARCH__)
  const uint32_t x = __funnelshift_r(w0, w1, sh);
#else
  const uint32_t x = uint32_t(((uint64_t(w1) << 32) | w0) >> sh);
#endif
  const uint32_t b = (x & 0x3Fu) | ((x << 2) & 0x3F00u) | ((x << 4) & 0x3F0000u) | ((x << 6) & 0x3F000000u);
  const uint32_t special = (b + 0x03030303u) & 0x40404040u;  // bytes 61..63 (no carry: bytes <= 63)
  return b + (special >> 6) * 0xC0u;
}
/// Channels c .. c + 3's codes of a row (c a multiple of 4; the row 4-byte
/// aligned), as four 8-bit codes, channel c in the low byte.
KVCOMP_HD uint32_t tail_quad8(const uint8_t* row, int c, int bits) {
  return bits == 8 ? *reinterpret_cast<const uint32_t*>(row + c) : tail_quad8_of6(row, c);
}

/// Writes channel c's code (`bits` wide) into a row (host: the reference).
inline void tail_put_code(uint8_t* row, int c, uint32_t code, int bits) {
  if (bits == 8) {
    row[c] = uint8_t(code);
    return;
  }
  const int bit = 6 * c;
  const uint32_t mask = 0x3Fu << (bit % 8), v = code << (bit % 8);
  row[bit / 8] = uint8_t((row[bit / 8] & ~mask) | (v & 0xFFu));
  if ((mask >> 8) != 0) row[bit / 8 + 1] = uint8_t((row[bit / 8 + 1] & ~(mask >> 8)) | (v >> 8));
}

/// Branch-free (selects): the fused kernel decodes tail rows with it, and
/// per-element branches kept its loads from being issued together. `code`
/// is an 8-bit code (tail_code_to8).
KVCOMP_HD float tail_value(uint32_t code, float lo, float step) {
  const float v = fmaf(float(code), step, lo);
  const uint32_t special = code == kTailNaN ? 0x7FC00000u : code == kTailNegInf ? 0xFF800000u : 0x7F800000u;
  return code <= kTailMaxCode ? v : bits_float(special);
}

/// x through the codec: the value its code (`bits` wide) under q decodes to.
KVCOMP_HD float tail_round(float x, const TailQuant& q, int bits) {
  return tail_value(tail_code_to8(tail_code(x, q, bits), bits), q.lo, q.step);
}

/// A token's vector x[0..D) as Codes8 / Codes6 holds it: its stored codes
/// (one a byte, unpacked) and its params.
KVCOMP_HD TailQuant tail_encode_row(const float* x, int D, int elem, int bits, uint8_t* codes) {
  float lo = kEmptyLo, hi = kEmptyHi;
  for (int i = 0; i < D; ++i) range_add(x[i], lo, hi);
  const TailQuant q = make_tail_quant(lo, hi, elem, bits);
  for (int i = 0; i < D; ++i) codes[i] = uint8_t(tail_code(x[i], q, bits));
  return q;
}

/// out[0..D) = x[0..D) through the codec (the values a closed block is quantized from).
KVCOMP_HD void tail_round_row(const float* x, int D, int elem, int bits, float* out) {
  float lo = kEmptyLo, hi = kEmptyHi;
  for (int i = 0; i < D; ++i) range_add(x[i], lo, hi);
  const TailQuant q = make_tail_quant(lo, hi, elem, bits);
  for (int i = 0; i < D; ++i) out[i] = tail_round(x[i], q, bits);
}

}  // namespace format
}  // namespace kvcomp
