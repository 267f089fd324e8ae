// libFuzzer target for the CPU decoder and the format parser (built with
// clang -fsanitize=fuzzer,address,undefined by run_fuzz.sh).
//
// Input byte 0 picks the shape (kind, T, D), a mode and a codebook:
//   mode 0: the rest is a block, parsed as is (header, checksum, lanes);
//   mode 1: the rest is a block whose header and checksum are repaired first,
//           so the fuzzer reaches the lane table and payload decoding;
//   mode 2: the rest is 256 code lengths for Codebook::from_lengths (with the
//           low-bit count k of bits 6..7);
//   mode 3: the rest seeds a block of values (raw bytes as fp32, NaN and Inf
//           included) that is encoded, must decode within the bound, and is
//           then decoded again with bits flipped at input-chosen positions.
// Bit 5 of byte 0 picks the codebook for modes 0, 1 and 3: a complete one with
// a codeword for every stream symbol (pairs 0..224 and PAIR_ESC), or a sparse,
// incomplete one (pairs (0,0), (1,1) and PAIR_ESC only) so that pairs without
// a codeword are written as PAIR_ESC and some bit patterns match no codeword.
// Bits 6..7 pick the codebook's low-bit count k (0..3): under k >= 2 the
// complete codebook's longer codewords take the decoder's slow path.
// Any crash, sanitizer report or broken guarantee aborts.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "kvcomp/codebook.hpp"
#include "kvcomp/error.hpp"
#include "kvcomp/reference.hpp"

using namespace kvcomp;

namespace {

const Codebook& full_book(int k) {  // skewed towards small pairs, every stream symbol has a codeword
  static const auto books = [] {
    uint64_t counts[format::kNumSymbols] = {};
    for (int s = 0; s <= format::kPairEscape; ++s) {
      const int a = s / format::kPairBase, b = s % format::kPairBase;
      counts[s] = 1 + (s < format::kPairEscape && a < 4 && b < 4 ? (8 - a - b) * 1000 : 0);
    }
    std::vector<Codebook> v;
    for (int j = 0; j < format::kLowBitChoices; ++j) v.push_back(Codebook::from_histogram(counts, j));
    return v;
  }();
  return books[size_t(k)];
}

const Codebook& sparse_book(int k) {  // '00' = (0, 0), '01' = (1, 1), '100' = PAIR_ESC; Kraft 5/8
  static const auto books = [] {
    uint8_t lengths[format::kNumSymbols] = {};
    lengths[0] = 2;
    lengths[1 * format::kPairBase + 1] = 2;
    lengths[format::kPairEscape] = 3;
    std::vector<Codebook> v;
    for (int j = 0; j < format::kLowBitChoices; ++j) v.push_back(Codebook::from_lengths(lengths, j));
    return v;
  }();
  return books[size_t(k)];
}

void repair(std::vector<uint8_t>& blk, Kind kind) {
  if (blk.size() < sizeof(format::BlockHeader)) return;
  format::BlockHeader h;
  std::memcpy(&h, blk.data(), sizeof(h));
  h.magic = format::kMagic;
  h.version = format::kVersion;
  h.kind = uint8_t(kind);
  uint64_t sum = h.codebook_id;
  for (size_t i = sizeof(h); i + 4 <= blk.size(); i += 4) {
    uint32_t w;
    std::memcpy(&w, &blk[i], 4);
    format::checksum_add(sum, w);
  }
  h.checksum = format::checksum_fold(sum);
  std::memcpy(blk.data(), &h, sizeof(h));
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const uint8_t sel = data[0];
  const Kind kind = (sel & 1) ? Kind::Value : Kind::Key;
  const int T = (sel >> 1 & 1) ? 64 : 32;
  const int D = (sel >> 2 & 1) ? 128 : 64;
  const int mode = sel >> 3 & 3;
  const int k = sel >> 6 & 3;
  const Codebook& book = (sel >> 5 & 1) ? sparse_book(k) : full_book(k);
  const uint8_t* rest = data + 1;
  const size_t n = size - 1;
  std::vector<float> out(size_t(T) * D);
  if (mode == 0 || mode == 1) {
    std::vector<uint8_t> blk(rest, rest + n);
    if (mode == 1) repair(blk, kind);
    (void)ref::decode_block(blk.data(), blk.size(), kind, T, D, book, out.data());
  } else if (mode == 2) {
    if (n < format::kNumSymbols) return 0;
    try {
      const Codebook cb = Codebook::from_lengths(rest, k);
      if (cb.low_bits() != k) std::abort();
      // A valid codebook: PAIR_ESC has a codeword, no symbol above it has one,
      // and every table index holds what its low bits start with: nothing (0),
      // a slow entry (PAIR_ESC, or a codeword of length L with L + 2k > 11:
      // symbol and L), or a fast entry (both codes, the low bits taken from
      // the index bits after the codeword, and L + 2k).
      if (cb.length(format::kPairEscape) == 0) std::abort();
      for (int s = format::kPairEscape + 1; s < format::kNumSymbols; ++s)
        if (cb.length(s) != 0) std::abort();
      const uint32_t mask = (1u << k) - 1;
      for (uint32_t i = 0; i < uint32_t(format::kLutSize); ++i) {
        const uint32_t e = cb.tables().lut[i];
        int s = -1;
        for (int t = 0; t < format::kNumSymbols; ++t) {
          const int len = cb.length(t);
          if (len && (i & ((1u << len) - 1)) == (cb.tables().enc[t] & 0xFFFFu)) {
            if (s >= 0) std::abort();  // not a prefix code
            s = t;
          }
        }
        if (s < 0) {
          if (e != 0) std::abort();
          continue;
        }
        const int len = cb.length(s);
        if (s == format::kPairEscape || len + 2 * k > format::kMaxCodeLen) {
          if (e != format::lut_slow_entry(s, len)) std::abort();
        } else {
          const int lo_a = int(i >> len & mask), lo_b = int(i >> (len + k) & mask);
          if (format::lut_is_slow(e) || format::lut_length(e) != len + 2 * k ||
              format::lut_first(e) != ((s / format::kPairBase) << k | lo_a) ||
              format::lut_second(e) != ((s % format::kPairBase) << k | lo_b))
            std::abort();
        }
      }
    } catch (const Error&) {
    }
  } else {
    // Values: the input bytes as fp32, repeated to fill the block.
    std::vector<float> x(size_t(T) * D);
    if (n < 5) return 0;
    const float eb_value = float(rest[0] % 50 + 1) / 200.f;  // relative 0.005 .. 0.25
    for (size_t i = 0; i < x.size(); ++i) {
      uint32_t bits = 0;
      for (int b = 0; b < 4; ++b) bits |= uint32_t(rest[1 + (4 * i + b) % (n - 1)]) << (8 * b);
      x[i] = format::bits_float(bits);
    }
    const ErrorBound eb{BoundMode::Relative, eb_value};
    auto blk = ref::encode_block(kind, x.data(), T, D, eb, book, 7);
    if (ref::decode_block(blk.data(), blk.size(), kind, T, D, book, out.data()) != ref::DecodeStatus::Ok) std::abort();
    // Every value: its own bits if escaped, else exactly dequantize(code), within the bound.
    const auto params = ref::block_params(kind, x.data(), T, D, eb);
    for (int t = 0; t < T; ++t)
      for (int c = 0; c < D; ++c) {
        const float a = x[size_t(t) * D + c], b = out[size_t(t) * D + c];
        const format::GroupQuant& g = params[kind == Kind::Key ? c : t];
        const int code = format::quantize(a, g);
        if (code == format::kEscape) {
          if (format::float_bits(a) != format::float_bits(b)) std::abort();
          continue;
        }
        if (format::float_bits(b) != format::float_bits(format::dequantize(code, g.min, g.step))) std::abort();
        if (!(std::fabs(a - b) <= g.eb_abs)) std::abort();
      }
    // Flip bits at positions the input picks: must be rejected or decode, never crash.
    for (size_t i = 1; i + 1 < n && i < 16; i += 2) blk[(size_t(rest[i]) << 8 | rest[i + 1]) % blk.size()] ^= 1u << (rest[i] % 8);
    (void)ref::decode_block(blk.data(), blk.size(), kind, T, D, book, out.data());
  }
  return 0;
}
