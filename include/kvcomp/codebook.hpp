// Canonical, length-limited Huffman codebooks (host side).
//
// A codebook is fully described by 256 code lengths of stream symbols
// (format.hpp, "Entropy coding (v3: pairs, with low bits)"): pair symbols
// 0..224 and PAIR_ESC = 225; symbols 226..255 never have a codeword; and its
// low-bit count k (0..kMaxLowBits). From the lengths and k we
// derive the encoder table and the decoder lookup table; both are plain arrays
// (CodebookTables) so they can be copied to the device as they are.
#pragma once

#include <array>
#include <cstdint>

#include "kvcomp/format.hpp"

namespace kvcomp {

/// Device-ready tables of one codebook.
struct CodebookTables {
  /// Decoder: indexed by the next kMaxCodeLen stream bits (LSB first);
  /// entries as format::lut_fast_entry (both codes of the pair, low bits
  /// included) or format::lut_slow_entry (PAIR_ESC, or a codeword too long
  /// to carry its low bits); 0 where no codeword matches.
  uint32_t lut[format::kLutSize];
  /// Encoder, per stream symbol: bit-reversed codeword | length << 16;
  /// length 0 = no codeword (format::put_pair then writes PAIR_ESC).
  uint32_t enc[format::kNumSymbols];
  uint32_t low_bits;  // k
  uint32_t pad[3];    // keeps the size a multiple of 16 bytes (arrays of tables, uint4 copies)
};
static_assert(sizeof(CodebookTables) % 16 == 0, "tables are copied as uint4");

class Codebook {
 public:
  /// Builds from the histograms of stream symbols under every low-bit count
  /// (counts[kLowBitChoices][kNumSymbols], row k at counts + k * kNumSymbols,
  /// as ref::add_histogram makes them): from_histogram(row k, k) for each k,
  /// keeping the one whose code needs the fewest bits for its row, counted as
  /// mean_bits counts them, in exact integers (the smaller k on a tie). The
  /// raw words of ESC values, left out, are the same under every k. The
  /// device build (detail::launch_build_codebooks) gives the same tables.
  static Codebook from_histograms(const uint64_t* counts);
  /// Builds from a histogram of stream symbols under k low bits
  /// (counts[kNumSymbols]). PAIR_ESC always gets a codeword, so any input
  /// stays representable; a pair symbol with zero count gets one only if
  /// both its hi parts are within the largest hi part of the present pair
  /// symbols (weight 1: data later in the sequence shows pairs the histogram
  /// did not, and a PAIR_ESC costs 16 bits more and the fused kernel's slow
  /// path), others get none (the encoder writes them as PAIR_ESC); counts of
  /// symbols above PAIR_ESC, which no stream holds, are ignored. Throws
  /// kvcomp::Error if k is out of range.
  static Codebook from_histogram(const uint64_t* counts, int low_bits = 0);
  /// Rebuilds from stored code lengths and k; throws kvcomp::Error if they
  /// do not form a valid prefix code within kMaxCodeLen, give a codeword to a
  /// symbol above PAIR_ESC, lack PAIR_ESC, or k is out of range.
  static Codebook from_lengths(const uint8_t* lengths, int low_bits = 0);

  int length(int symbol) const { return lengths_[symbol]; }
  const std::array<uint8_t, format::kNumSymbols>& lengths() const { return lengths_; }
  const CodebookTables& tables() const { return tables_; }
  /// k: the raw low bits of each code that follow a pair symbol's codeword.
  int low_bits() const { return int(tables_.low_bits); }
  /// Expected bits per stream symbol (per pair) under a histogram of stream
  /// symbols (under this codebook's k): the codeword, plus 2k low bits for a
  /// pair symbol, plus 2 x kFieldBits for a pair written as
  /// PAIR_ESC (also a pair symbol without a codeword). The 32 raw bits of an
  /// ESC value inside a PAIR_ESC are NOT included: a stream-symbol histogram
  /// cannot tell how many there are.
  double mean_bits(const uint64_t* counts) const;

 private:
  void derive_tables();
  std::array<uint8_t, format::kNumSymbols> lengths_{};
  CodebookTables tables_{};
};

/// Huffman code lengths for `counts`, limited to `max_len` >= 8 (exposed for
/// tests): ties broken by symbol (kernels/huffman_build.cuh); counts summing
/// to 2^64 or more are halved first until they do not.
std::array<uint8_t, format::kNumSymbols> huffman_lengths(const uint64_t* counts, int max_len);

}  // namespace kvcomp
