// Divergence-free pair decoding (format v3): each lane of a warp decodes its
// own sub-stream through a shared-memory lookup table, all lanes in lockstep,
// one lookup per PAIR of values (format.hpp, "Entropy coding").
//
// Written for instruction count, which is what bounds the fused kernel:
//  - a table entry is the pair as fp16x2 subnormals (code x 2^-22, the
//    caller scales the mma results back) plus the escape flag in bits the
//    codes leave zero: one AND makes it a tensor-core operand, no
//    integer-to-float conversion; the bits the pair takes sit in the top
//    four bits, so one LEA.HI adds them to the stream position;
//  - bits are read from a 64-bit window of two words (a group, two pairs of
//    one mma fragment, needs at most 22 bits and starts below bit 34); the
//    window advances at most one word per group (predicated moves) from a
//    two-word queue, which is topped up every second group from words loaded
//    two groups before (their latency hides behind decoding: PairDecoder);
//  - the window keeps two consumed bits below the next one (the next stream
//    bit is window bit pos + 2), so that one shift and one AND give a table
//    index already scaled to the entry's byte offset;
//  - no slow-path test per group in the fused kernel's first pass
//    (group_unchecked(): the entries' flags are OR-ed, one warp vote a chunk);
//    a chunk where a lane met a slow entry (PAIR_ESC, or a codeword too long
//    to carry its low bits in the table; rare at the bounds we use) is
//    decoded again by group(), which tests every group: the whole warp then
//    decodes a slow group from its start by a plain bit reader, out of line,
//    which also adds the escaped raw values' contributions (the caller learns
//    of it through a callback). The per-group test and its branch cost ~12%
//    of the kernel's time (32k x 8: 412 vs 480 us);
//  - reads are not clamped word by word: buffers holding blocks are followed
//    by kDecodeOverread readable bytes instead.
#pragma once

#include <cuda_fp16.h>

#include <cstdint>

#include "attention_params.cuh"
#include "kvcomp/format.hpp"

namespace kvcomp {
namespace detail {

/// Where a group's escaped raw values go (the fused kernel adds their exact
/// contribution on top of the code-0 term the tensor cores saw). Value i of
/// the group (0..3, fragment register order) has coefficient/parameter index
/// v_i = v_base + v_step (i / 2) + i % 2 and accumulator acc + acc_step (i / 2);
/// for each head g < group:
///   acc_i[g * acc_stride] += coef[g * coef_stride + v_i] * (raw - min(params[v_i])).
/// K: acc = score corrections of the token, coef = q, params = channel params (v = channel);
/// V: acc = output corrections of the channel, coef = p, params = token params (v = token), or,
/// where V's groups are channels (format::groups_are_channels), channel params: then
/// `channel` >= 0 and min(params[channel + 8 (i / 2)]) (the value's own channel) replaces min(params[v_i]).
struct EscapeSink {
  float* acc;
  int acc_step;
  int acc_stride;
  const float* coef;
  int coef_stride;
  const uint32_t* params;
  int v_base;
  int v_step;
  int group;
  int channel;  // -1, or V's channel of values 0 and 1 (2 and 3: + 8) where its params are per channel
};

/// x, opaque to the optimizer: what a slow-path sink computes from it stays in
/// the slow path (the K sinks' four pointers, invariant in the decode loop,
/// were hoisted out of it and spilled at every chunk: SASS).
__device__ __forceinline__ int opaque(int x) {
  asm volatile("" : "+r"(x));
  return x;
}

struct SlowGroup {
  uint32_t h0, h1;                 // the group's fp16x2 codes (escaped raw values read as 0)
  uint32_t w0, w1, q0, q1, l0, l1;  // the decoder's window, queue and pending words after the group
  uint32_t pos;
  const uint32_t* next;
};

/// The decoder's window whose next stream bit is bit b of base[]: that bit
/// lands at window bit pos + 2 (for b < 2 the window starts one word before
/// base, inside the block's lane table: its bits are never used).
__device__ __forceinline__ void fill_window(SlowGroup& out, const uint32_t* base, uint32_t b) {
  const uint32_t c = b + 30;  // b - 2, kept non-negative
  const uint32_t* p = base + (c >> 5) - 1;
  out.pos = c & 31;
  out.w0 = p[0];
  out.w1 = p[1];
  out.q0 = p[2];
  out.q1 = p[3];
  out.l0 = p[4];
  out.l1 = p[5];
  out.next = p + 6;
}

/// A group decoded from bit b of base[] by a plain bit reader, escapes
/// included, and the decoder's window re-loaded after it. Rare, so out of
/// line; and the window's loads are waited for in here, so that the fast
/// path never shares a load scoreboard with them (in line, every group
/// waited on the look-ahead load, whose scoreboard these loads shared).
__device__ __noinline__ SlowGroup decode_group_slow(const uint32_t* lut, const uint32_t* base, uint32_t b,
                                                    int low_bits, EscapeSink sink) {
  auto peek = [&]() { return __funnelshift_r(base[b >> 5], base[(b >> 5) + 1], b & 31); };
  auto take = [&](int n) {
    const uint32_t v = peek();
    b += uint32_t(n);
    return n == 32 ? v : v & ((1u << n) - 1);
  };
  SlowGroup out;
  for (int half = 0; half < 2; ++half) {
    const uint32_t e = lut[peek() & (format::kLutSize - 1)];
    b += uint32_t(format::lut_length(e));
    uint32_t h = e & format::kLutValueMask;
    if (format::lut_is_slow(e)) {
      const int symbol = format::lut_slow_symbol(e);
      h = 0;
      if (symbol != format::kPairEscape) {  // a long codeword: its low bits follow
        const uint32_t a = (uint32_t(symbol / format::kPairBase) << low_bits) | take(low_bits);
        const uint32_t c = (uint32_t(symbol % format::kPairBase) << low_bits) | take(low_bits);
        h = format::lut_code_half(a) | (format::lut_code_half(c) << 16);
      } else {
        for (int v = 0; v < 2; ++v) {
          const uint32_t code = take(format::kFieldBits);
          if (code == uint32_t(format::kEscape)) {
            const float raw = __uint_as_float(take(format::kRawBits));
            const int at = sink.v_base + sink.v_step * half + v;
            float* acc = sink.acc + sink.acc_step * half;
            const int param = sink.channel < 0 ? at : sink.channel + 8 * half;
            const float vmin = __half2float(__ushort_as_half(uint16_t(sink.params[param])));
            for (int g = 0; g < sink.group; ++g)
              atomicAdd(acc + g * sink.acc_stride, sink.coef[g * sink.coef_stride + at] * (raw - vmin));
          } else {
            h |= format::lut_code_half(code) << (16 * v);
          }
        }
      }
    }
    (half == 0 ? out.h0 : out.h1) = h;
  }
  fill_window(out, base, b);
  return out;
}

/// The window at bit b of base[] (a restart; out of line for the same reason).
__device__ __noinline__ SlowGroup load_window(const uint32_t* base, uint32_t b) {
  SlowGroup out;
  out.h0 = out.h1 = 0;
  fill_window(out, base, b);
  return out;
}

/// Two decoders' windows (a block's K and V streams) at once: their twelve
/// loads are in flight together, one memory latency for both (two calls of
/// load_window() wait one after the other).
struct WindowPair {
  SlowGroup k, v;
};
__device__ __noinline__ WindowPair load_windows(const uint32_t* k_base, uint32_t k_bit, const uint32_t* v_base,
                                                uint32_t v_bit) {
  WindowPair out;
  out.k.h0 = out.k.h1 = out.v.h0 = out.v.h1 = 0;
  fill_window(out.k, k_base, k_bit);
  fill_window(out.v, v_base, v_bit);
  return out;
}

/// One 32-bit word of shared memory at a 32-bit shared-window address.
__device__ __forceinline__ uint32_t lds(uint32_t addr) {
  uint32_t v;
  asm volatile("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(addr));
  return v;
}

/// Whether any lane's group holds a slow table entry (one vote; in PTX so that
/// the test stays one predicate-writing LOP3, not a bool round trip).
__device__ __forceinline__ bool warp_any_slow(uint32_t e0, uint32_t e1) {
  uint32_t any;
  asm("{\n"
      " .reg .pred p;\n"
      " .reg .b32 t;\n"
      " or.b32 t, %1, %2;\n"
      " and.b32 t, t, %3;\n"
      " setp.ne.u32 p, t, 0;\n"
      " vote.sync.any.pred p, p, 0xffffffff;\n"
      " selp.u32 %0, 1, 0, p;\n"
      "}\n"
      : "=r"(any)
      : "r"(e0), "r"(e1), "n"(format::kLutEscapeBit));
  return any != 0;
}

/// A lane's stream reader. The window w1:w0 shifts by a word after a group
/// that ends in w1, taking the next word from a two-word queue (q0, q1); the
/// queue is topped up only at merge() (the kernel calls it after every second
/// group: a group ends at most one word further), from two pending words
/// (l0, l1) loaded at the merge before. Loads thus complete while two groups
/// decode: each lane shifts on its own, and a register a load writes is
/// waited for by the first instruction that reads it, whichever lanes need it,
/// so a load that the next group's shift read (as before) waited out its
/// latency at nearly every group.
struct PairDecoder {
  const uint32_t* next;  // the word after l1
  uint32_t w0, w1;       // the next stream bit is bit pos + 2 of w1:w0
  uint32_t q0, q1;       // the words after w1 (q1 valid only before the first shift since merge())
  uint32_t l0, l1;       // the two words after the queue as it was at the last merge()
  uint32_t pos;          // 0..31
  uint32_t shifts;       // window shifts since merge(): 0..2

  /// Two decoders at their streams' starts (bit k_start of k_words, which
  /// holds k_n words: the block payload in global memory; the same for v),
  /// their windows loaded together (load_windows()).
  __device__ __forceinline__ static void init_pair(PairDecoder& kd, const uint32_t* k_words, uint32_t k_n,
                                                   uint32_t k_start, PairDecoder& vd, const uint32_t* v_words,
                                                   uint32_t v_n, uint32_t v_start) {
    // A corrupt lane table cannot send a decoder far past its payload.
    auto clamped = [](uint32_t start, uint32_t n) { return (start >> 5) <= n ? start : 32 * n; };
    const WindowPair w = load_windows(k_words, clamped(k_start, k_n), v_words, clamped(v_start, v_n));
    kd.take(w.k);
    vd.take(w.v);
  }

  /// The next group: two pairs as fp16x2 bit patterns (h0, h1: two registers
  /// of an mma fragment). lut: the table's shared-memory address; low_bits:
  /// the codebook's k. If a lane's group takes the slow path (a PAIR_ESC,
  /// whose raw values `sink()` says where to add, or a codeword too long to
  /// carry its low bits in the table), the whole warp decodes its group
  /// there (the branch stays warp-uniform: no reconvergence bookkeeping in
  /// the fast path) and `slow()` is called first, by every lane.
  /// A group is at most 22 bits from window bit pos + 2 <= 33, so it lies in
  /// the 64-bit window w1:w0: the second lookup is one 64-bit shift.
  template <typename Slow, typename Sink>
  __device__ __forceinline__ void group(uint32_t lut, int low_bits, uint32_t& h0, uint32_t& h1, Slow&& slow,
                                        Sink&& sink) {
    uint32_t e0, e1;
    const uint32_t p2 = lookup(lut, e0, e1);
    h0 = e0 & format::kLutValueMask;
    h1 = e1 & format::kLutValueMask;
    if (__builtin_expect(warp_any_slow(e0, e1), 0)) {
      slow();
      const uint32_t* table = reinterpret_cast<const uint32_t*>(__cvta_shared_to_generic(lut));
      // w0's word: the window has moved `shifts` words since `next` was set.
      const SlowGroup s = decode_group_slow(table, next - 6 + shifts, pos + 2, low_bits, sink());
      take(s);
      h0 = s.h0;
      h1 = s.h1;
      return;
    }
    advance(p2);
  }

  /// The next group without the slow-path test. A slow entry (PAIR_ESC or a
  /// long codeword) gives wrong codes and a wrong length, and the groups
  /// after it are read from wrong positions; but every entry takes at most
  /// 11 bits a lookup, fewer than the 91 bits a pair that kDecodeOverread is
  /// sized for (max_overread), so the reads stay inside the pool's slack.
  /// The caller ORs `flags` over a run of groups, tests flags &
  /// kLutEscapeBit once for the warp, and decodes the run again with group()
  /// from restart_bit() if any lane met one (rare where k = 0: the library's
  /// codebooks give every pair in the range seen a codeword, so PAIR_ESC is
  /// left to escaped values and codes over 14 << k).
  __device__ __forceinline__ void group_unchecked(uint32_t lut, uint32_t& h0, uint32_t& h1, uint32_t& flags) {
    uint32_t e0, e1;
    const uint32_t p2 = lookup(lut, e0, e1);
    h0 = e0 & format::kLutValueMask;
    h1 = e1 & format::kLutValueMask;
    flags |= e0 | e1;
    advance(p2);
  }

  /// Where the next group starts: the word in the window's low half and the
  /// stream bit in it (+ 2), for restart(). From the decoder's own state, so
  /// that marking a chunk's start reads nothing the kernel may have spilled.
  struct Mark {
    const uint32_t* word;
    uint32_t bit;  // 2..33
  };
  __device__ __forceinline__ Mark mark() const { return {next - 6 + shifts, pos + 2u}; }

  /// Back to a mark() of this block.
  __device__ __forceinline__ void restart(Mark m) { take(load_window(m.word, m.bit)); }

  /// Tops the queue up by the words the window took since the last merge
  /// (0, 1 or 2: q1, then q0 and q1, come from l0 and l1) and loads the
  /// pending words after it. Call after every second group().
  __device__ __forceinline__ void merge() {
    asm("{\n"
        " .reg .pred c1, c2;\n"
        " setp.eq.u32 c1, %4, 1;\n"
        " setp.eq.u32 c2, %4, 2;\n"
        " @c1 mov.b32 %1, %2;\n"  // q1 = l0
        " @c2 mov.b32 %1, %3;\n"  // q1 = l1
        " @c2 mov.b32 %0, %2;\n"  // q0 = l0
        " @c1 mov.b32 %2, %3;\n"  // l0 = l1
        "}\n"
        : "+r"(q0), "+r"(q1), "+r"(l0), "+r"(l1)
        : "r"(shifts));
    next += shifts;
    // One asm block a load: with both loads and the moves in one block, ptxas copied the address for the
    // second load at every merge (SASS: 4.7% fewer instructions in the decode loops without the copies).
    asm volatile("{ .reg .pred c; setp.eq.u32 c, %2, 2; @c ld.global.u32 %0, [%1+-8]; }"
                 : "+r"(l0) : "l"(next), "r"(shifts));
    asm volatile("{ .reg .pred c; setp.ne.u32 c, %2, 0; @c ld.global.u32 %0, [%1+-4]; }"
                 : "+r"(l1) : "l"(next), "r"(shifts));
    shifts = 0;
  }

 private:
  /// The group's two table entries (the window's next bits, then the bits
  /// after the first pair's); returns the window position after both.
  __device__ __forceinline__ uint32_t lookup(uint32_t lut, uint32_t& e0, uint32_t& e1) const {
    constexpr uint32_t kIndex = (format::kLutSize - 1) << 2;  // index bits, scaled to bytes
    e0 = lds(lut + (__funnelshift_r(w0, w1, pos) & kIndex));
    const uint32_t p1 = pos + (e0 >> format::kLutLengthShift);  // <= 42
    const uint32_t x1 = uint32_t(((uint64_t(w1) << 32) | w0) >> p1);
    e1 = lds(lut + (x1 & kIndex));
    return p1 + (e1 >> format::kLutLengthShift);  // <= 53
  }

  __device__ __forceinline__ void take(const SlowGroup& s) {
    w0 = s.w0;
    w1 = s.w1;
    q0 = s.q0;
    q1 = s.q1;
    l0 = s.l0;
    l1 = s.l1;
    pos = s.pos;
    next = s.next;
    shifts = 0;
  }

  /// Shifts the window by a word if p >= 32 (predicated moves, no load).
  __device__ __forceinline__ void advance(uint32_t p) {
    asm volatile(
        "{\n"
        " .reg .pred q;\n"
        " setp.ge.u32 q, %4, 32;\n"
        " @q mov.b32 %0, %1;\n"
        " @q mov.b32 %1, %2;\n"
        " @q mov.b32 %2, %3;\n"
        "}\n"
        : "+r"(w0), "+r"(w1), "+r"(q0), "+r"(q1)
        : "r"(p));
    shifts += p >> 5;
    pos = p & 31;
  }
};

/// This lane's stream start (bits) from its entry of the block's lane table
/// (`bits`, the lane's stream length): a warp scan.
__device__ __forceinline__ uint32_t lane_stream_start(uint32_t bits, int lane) {
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
