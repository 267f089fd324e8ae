// Element types an engine hands us, and exact conversion to fp32 on the host.
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

}  // namespace kvcomp
