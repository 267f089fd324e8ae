// Divergence-free Huffman decoding: each lane of a warp decodes its own
// sub-stream through a shared-memory lookup table, one symbol per step, all
// lanes in lockstep (format.hpp describes the streams).
#pragma once

#include <cstdint>

#include "kvcomp/format.hpp"

namespace kvcomp {
namespace detail {

struct LaneDecoder {
  const uint32_t* words;  // block payload (shared or global memory)
  uint32_t nwords;        // payload words; reads past it return 0 (corrupt data stays in bounds)
  uint32_t next;          // next word to load
  uint64_t buf;           // undecoded bits, LSB first
  int avail;              // valid bits in buf

  __device__ __forceinline__ uint32_t load(uint32_t i) const { return i < nwords ? words[i] : 0u; }

  __device__ __forceinline__ void init(const uint32_t* w, uint32_t n, uint32_t start_bit) {
    words = w;
    nwords = n;
    next = start_bit >> 5;
    buf = load(next++) >> (start_bit & 31);
    avail = 32 - int(start_bit & 31);
    refill();
  }
  // Keeps at least 33 bits buffered: enough for a codeword or 32 raw bits.
  __device__ __forceinline__ void refill() {
    if (avail <= 32) {
      buf |= uint64_t(load(next++)) << avail;
      avail += 32;
    }
  }
  /// Next value: dequantized with (min, step), or the raw fp32 after ESC.
  __device__ __forceinline__ float decode(const uint16_t* lut, float min, float step) {
    const uint16_t e = lut[uint32_t(buf) & (format::kLutSize - 1)];
    const int len = format::lut_length(e), sym = format::lut_symbol(e);
    buf >>= len;
    avail -= len;
    float v;
    if (sym == format::kEscape) {
      refill();
      v = __uint_as_float(uint32_t(buf));
      buf >>= 32;
      avail -= 32;
    } else {
      v = fmaf(float(sym), step, min);
    }
    refill();
    return v;
  }
};

/// This lane's stream start (bits) from the block's lane table: a warp scan.
__device__ __forceinline__ uint32_t lane_stream_start(const uint16_t* lane_bits, int lane) {
  const uint32_t bits = lane_bits[lane];
  uint32_t incl = bits;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const uint32_t v = __shfl_up_sync(0xFFFFFFFFu, incl, o);
    if (lane >= o) incl += v;
  }
  return incl - bits;
}

}  // namespace detail
}  // namespace kvcomp
