// Divergence-free Huffman decoding: each lane of a warp decodes its own
// sub-stream through a shared-memory lookup table, all lanes in lockstep
// (format.hpp describes the streams).
//
// Written for instruction count, which is what bounds the fused kernel:
//  - the table entry carries float(symbol), so no integer conversion;
//  - symbols are decoded in pairs: one refill per pair (codewords are at most
//    10 bits, a refill leaves at least 33 bits buffered) and one ESC test per
//    pair (rare: the pair is then decoded again, raw bits included);
//  - refill() is predicated, not branched, and loads the next stream word one
//    refill ahead, so its latency (L1 or shared memory) hides behind decoding;
//  - reads are not clamped word by word: buffers holding blocks are followed
//    by kDecodeOverread readable bytes instead.
#pragma once

#include <cstdint>

#include "attention_params.cuh"
#include "kvcomp/format.hpp"

namespace kvcomp {
namespace detail {

struct LaneDecoder {
  const uint32_t* ptr;  // where `ahead` came from
  uint32_t ahead;       // the next stream word, loaded one refill ahead
  uint64_t buf;         // undecoded bits, LSB first
  int avail;            // valid bits in buf

  /// words: the block payload (shared or global memory), n of them.
  __device__ __forceinline__ void init(const uint32_t* words, uint32_t n, uint32_t start_bit) {
    const uint32_t first = min(start_bit >> 5, n);  // a corrupt lane table cannot send us far
    const uint32_t shift = first == (start_bit >> 5) ? (start_bit & 31) : 0;
    buf = words[first] >> shift;
    avail = 32 - int(shift);
    ptr = words + first + 1;
    ahead = *ptr;
    refill();
  }
  /// Tops the buffer up to at least 33 bits (enough for two codewords) with
  /// the prefetched word, and prefetches the next one. All predicated: lanes
  /// that need no word issue no load, and nothing branches.
  __device__ __forceinline__ void refill() {
    asm volatile(
        "{\n"
        " .reg .pred p;\n"
        " .reg .b64 t;\n"
        " setp.le.s32 p, %2, 32;\n"
        " @p cvt.u64.u32 t, %3;\n"
        " @p shl.b64 t, t, %2;\n"
        " @p or.b64 %0, %0, t;\n"
        " @p add.s32 %2, %2, 32;\n"
        " @p add.u64 %1, %1, 4;\n"
        " @p ld.u32 %3, [%1];\n"
        "}\n"
        : "+l"(buf), "+l"(ptr), "+r"(avail), "+r"(ahead));
  }
  __device__ __forceinline__ uint32_t lookup(const uint32_t* lut) const {
    return lut[uint32_t(buf) & (format::kLutSize - 1)];
  }
  __device__ __forceinline__ void consume(uint32_t e) {
    const int len = int(e & format::kLutLengthMask);
    buf >>= len;
    avail -= len;
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
  /// The next two symbols as float(code) (0 for ESC, whose raw value goes to
  /// esc0 / esc1). Fast path: two lookups, one test; if either was ESC (rare),
  /// the pair is decoded again from the saved state, raw bits included.
  template <typename E0, typename E1>
  __device__ __forceinline__ void pair(const uint32_t* lut, E0&& esc0, E1&& esc1, float& c0, float& c1) {
    refill();
    const uint64_t buf0 = buf;
    const int avail0 = avail;
    uint32_t e0 = lookup(lut);
    consume(e0);
    uint32_t e1 = lookup(lut);
    consume(e1);
    if ((e0 | e1) & format::kLutEscapeBit) {
      buf = buf0;
      avail = avail0;
      e0 = lookup(lut);
      consume(e0);
      if (e0 & format::kLutEscapeBit) esc0(take_raw());
      e1 = lookup(lut);
      consume(e1);
      if (e1 & format::kLutEscapeBit) esc1(take_raw());
    }
    c0 = __uint_as_float(e0 & format::kLutValueMask);
    c1 = __uint_as_float(e1 & format::kLutValueMask);
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
