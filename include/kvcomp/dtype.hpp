// Element types an engine hands us: exact conversion to fp32 on the host, and
// fp32 rounded to nearest (ties to even) into them, as the device's
// __float2half_rn / __float2bfloat16_rn do.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "kvcomp/format.hpp"

namespace kvcomp {

enum class DType : uint8_t { F16 = 0, BF16 = 1, F32 = 2 };

inline size_t dtype_size(DType t) { return t == DType::F32 ? 4 : 2; }
inline const char* dtype_name(DType t) {
  return t == DType::F16 ? "float16" : t == DType::BF16 ? "bfloat16" : "float32";
}

/// Element i of a typed host array, exactly as fp32.
inline float load_as_float(DType t, const void* base, size_t i) {
  if (t == DType::F32) { float f; std::memcpy(&f, static_cast<const char*>(base) + 4 * i, 4); return f; }
  uint16_t h;
  std::memcpy(&h, static_cast<const char*>(base) + 2 * i, 2);
  return t == DType::F16 ? format::half_to_float(h) : format::bits_float(uint32_t(h) << 16);
}

/// fp16 bits of f rounded to nearest, ties to even (overflow gives +-Inf, NaN stays NaN).
inline uint16_t float_to_half_rn(float f) {
  const uint32_t x = format::float_bits(f);
  const uint16_t sign = uint16_t((x >> 16) & 0x8000u);
  const uint32_t a = x & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return uint16_t(sign | 0x7E00u | ((a >> 13) & 0x3FFu));  // NaN, quiet
  if (a >= 0x477FF000u) return uint16_t(sign | 0x7C00u);  // >= 65520: rounds to Inf
  auto round_shift = [](uint32_t m, uint32_t shift) {   // m / 2^shift to nearest, ties to even
    const uint32_t q = m >> shift, rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
    return q + ((rem > half || (rem == half && (q & 1u))) ? 1u : 0u);
  };
  if (a >= 0x38800000u)  // fp16 normal (>= 2^-14): rebias the exponent, round 13 mantissa bits (a carry is exact)
    return uint16_t(sign | round_shift(a - 0x38000000u, 13));
  const uint32_t exp = a >> 23;
  if (exp < 102) return sign;  // below 2^-25 (or fp32 subnormal): rounds to zero
  // fp16 subnormal: |f| / 2^-24 = (mantissa with its implicit bit) / 2^(126 - exp), 14 <= shift <= 24.
  return uint16_t(sign | round_shift((a & 0x7FFFFFu) | 0x800000u, 126 - exp));
}

/// bfloat16 bits of f rounded to nearest, ties to even (NaN stays NaN).
inline uint16_t float_to_bf16_rn(float f) {
  const uint32_t x = format::float_bits(f);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return uint16_t((x >> 16) | 0x40u);
  return uint16_t((x + 0x7FFFu + ((x >> 16) & 1u)) >> 16);
}

/// f rounded to nearest in type t, as fp32 (what a t element holding f holds).
inline float round_to_dtype(DType t, float f) {
  if (t == DType::F16) return format::half_to_float(float_to_half_rn(f));
  if (t == DType::BF16) return format::bits_float(uint32_t(float_to_bf16_rn(f)) << 16);
  return f;
}

}  // namespace kvcomp
