// The open tail held as 8-bit codes (Config::tail_format = TailFormat::Codes8):
// the single source of truth for the CPU reference and the device kernels.
//
// Tokens wait in a tail until their block of T closes (cache.hpp). With
// TailFormat::Input a tail row is the token's vector (one kv head, D values)
// in the input's type; with Codes8 it is
//   D codes (uint8), then `lo` and `step`, each one element of the input type
// (row bytes: D + 2 x element size, a multiple of 4). For the token's D values
// x_i (exactly as fp32; non-finite values are ignored for the range):
//   lo    = the smallest finite x_i (an input value: exact in the input type)
//   hi    = the largest finite x_i; lo = hi = 0 without a finite value
//   span  = hi - lo; s = span / 252, the next float up if 252 s < span
//           (exact test: fmaf(s, 252, -span) < 0); or hi / 252 - lo / 252
//           where span overflows (bf16 and fp32 beyond 2^127)  (fp32, IEEE)
//   step  = s rounded up to the input type (fp32: s itself)
//   inv   = 1 / step, 0 if step is 0                           (fp32, IEEE)
//   d     = (x - lo) x inv; x inv - lo inv where span overflowed (x - lo
//           may too); (x - lo) / step where inv overflowed (step below
//           2^-128: bf16 and fp32 subnormal ranges)            (fp32, IEEE)
//   code  = min(252, max(0, rint(d)))
//           -Inf: 253, +Inf: 254, NaN: 255
//   value = fmaf(code, step, lo) for codes 0..252; -Inf, +Inf, a quiet NaN
// Every finite x is within half a step of its value up to fp32 rounding:
//   |value - x| <= (1/2 + 2^-13) step + 2^-23 |x|
// (the rounding of x - lo, of the product with inv, of s, and of the fma), a
// step being about (hi - lo) / 252 of the token's vector; non-finite values
// keep their class (a NaN's payload is not kept).
//
// Every appended vector goes through this codec before anything else sees
// it: the tail holds its codes, and the block it closes into is quantized
// from the decoded values (also for tokens that enter a block straight from
// an append, without a stay in the tail), so blocks do not depend on how the
// tokens were split into appends. A block value is then within its group's
// bound (format.hpp) of the decoded value, i.e. within that bound plus the
// tail's half step of the input.
#pragma once

#include "kvcomp/format.hpp"

namespace kvcomp {
namespace format {

constexpr uint32_t kTailMaxCode = 252;  // finite values
constexpr uint32_t kTailNegInf = 253, kTailPosInf = 254, kTailNaN = 255;

/// Element types of the tail's params, as DType's values (dtype.hpp).
constexpr int kTailElemF16 = 0, kTailElemBF16 = 1, kTailElemF32 = 2;

KVCOMP_HD size_t tail_elem_bytes(int elem) { return elem == kTailElemF32 ? 4 : 2; }
/// Bytes of a Codes8 tail row: D codes, then lo and step of `param_bytes` each (tail_elem_bytes).
KVCOMP_HD size_t tail_code_row_bytes(int head_dim, size_t param_bytes) { return size_t(head_dim) + 2 * param_bytes; }

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
KVCOMP_HD TailQuant make_tail_quant(float lo, float hi, int elem) {
  if (!(lo <= hi)) lo = hi = 0.f;
  const float span = hi - lo;
  const bool wide = !is_finite_bits(float_bits(span));
  float s = wide ? hi / float(kTailMaxCode) - lo / float(kTailMaxCode) : span / float(kTailMaxCode);
  // Rounded to nearest, s may be below span / 252 (by half an ulp; subnormal quotients by up to their
  // whole size, to 0): the next float up then (the fma's sign is exact).
  if (!wide && fmaf(s, float(kTailMaxCode), -span) < 0.f) s = bits_float(float_bits(s) + 1u);
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

KVCOMP_HD uint32_t tail_code(float x, const TailQuant& q) {
  const uint32_t b = float_bits(x);
  if (!is_finite_bits(b)) return (b & 0x7FFFFFu) != 0 ? kTailNaN : (b >> 31) != 0 ? kTailNegInf : kTailPosInf;
  const float d = q.how == kTailPlain ? (x - q.lo) * q.inv
                  : q.how == kTailWide ? tail_mul(x, q.inv) - tail_mul(q.lo, q.inv)
                                       : (x - q.lo) / q.step;
  const float r = fminf(float(kTailMaxCode), fmaxf(0.f, rintf(d)));
  return uint32_t(r);
}

/// Branch-free (selects): the fused kernel decodes tail rows with it, and
/// per-element branches kept its loads from being issued together.
KVCOMP_HD float tail_value(uint32_t code, float lo, float step) {
  const float v = fmaf(float(code), step, lo);
  const uint32_t special = code == kTailNaN ? 0x7FC00000u : code == kTailNegInf ? 0xFF800000u : 0x7F800000u;
  return code <= kTailMaxCode ? v : bits_float(special);
}

/// A token's vector x[0..D) as Codes8 holds it: codes[D] and its params.
KVCOMP_HD TailQuant tail_encode_row(const float* x, int D, int elem, uint8_t* codes) {
  float lo = kEmptyLo, hi = kEmptyHi;
  for (int i = 0; i < D; ++i) range_add(x[i], lo, hi);
  const TailQuant q = make_tail_quant(lo, hi, elem);
  for (int i = 0; i < D; ++i) codes[i] = uint8_t(tail_code(x[i], q));
  return q;
}

/// out[0..D) = x[0..D) through the codec (the values a closed block is quantized from).
KVCOMP_HD void tail_round_row(const float* x, int D, int elem, float* out) {
  float lo = kEmptyLo, hi = kEmptyHi;
  for (int i = 0; i < D; ++i) range_add(x[i], lo, hi);
  const TailQuant q = make_tail_quant(lo, hi, elem);
  for (int i = 0; i < D; ++i) out[i] = tail_value(tail_code(x[i], q), q.lo, q.step);
}

}  // namespace format
}  // namespace kvcomp
