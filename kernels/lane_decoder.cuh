// Divergence-free Huffman decoding: each lane of a warp decodes its own
// sub-stream through a shared-memory lookup table, all lanes in lockstep
// (format.hpp describes the streams).
//
// Written for instruction count, which is what bounds the fused kernel:
//  - the table entry carries float(symbol), so no integer conversion;
//  - refill() is branch-free and called once per two symbols (codewords are at
//    most 12 bits, a refill leaves at least 33 bits buffered);
//  - the next stream word is loaded one refill ahead, so its latency (L1 or
//    shared memory) hides behind the decoding of the buffered bits;
//  - ESC (rare) is the only branch.
#pragma once

#include <cstdint>

#include "kvcomp/format.hpp"

namespace kvcomp {
namespace detail {

struct LaneDecoder {
  const uint32_t* words;  // block payload (shared or global memory)
  uint32_t nwords;        // payload words; reads past it give 0 (corrupt data stays in bounds)
  uint32_t next;          // index of `ahead` in words
  uint32_t ahead;         // prefetched word `next`
  uint64_t buf;           // undecoded bits, LSB first
  int avail;              // valid bits in buf

  __device__ __forceinline__ uint32_t load(uint32_t i) const { return i < nwords ? words[i] : 0u; }

  __device__ __forceinline__ void init(const uint32_t* w, uint32_t n, uint32_t start_bit) {
    words = w;
    nwords = n;
    const uint32_t first = start_bit >> 5;
    buf = load(first) >> (start_bit & 31);
    avail = 32 - int(start_bit & 31);
    next = first + 1;
    ahead = load(next);
    refill();
  }
  /// Tops the buffer up to at least 33 bits: enough for two codewords.
  __device__ __forceinline__ void refill() {
    const bool need = avail <= 32;
    buf |= uint64_t(need ? ahead : 0u) << (avail & 63);
    avail += need ? 32 : 0;
    next += need ? 1u : 0u;
    if (need) ahead = load(next);
  }
  /// The 32 raw bits after an ESC codeword, as fp32; leaves >= 33 bits buffered.
  __device__ __forceinline__ float take_raw() {
    refill();
    const float v = __uint_as_float(uint32_t(buf));
    buf >>= 32;
    avail -= 32;
    refill();
    return v;
  }
  /// The next symbol as float(code); 0 for ESC, whose raw value goes to
  /// on_escape(float). At most two calls per refill().
  template <typename OnEscape>
  __device__ __forceinline__ float symbol(const uint32_t* lut, OnEscape&& on_escape) {
    const uint32_t e = lut[uint32_t(buf) & (format::kLutSize - 1)];
    const int len = int(e & format::kLutLengthMask);
    buf >>= len;
    avail -= len;
    if (e & format::kLutEscapeBit) on_escape(take_raw());
    return __uint_as_float(e & format::kLutValueMask);
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
