// Canonical, length-limited Huffman codebooks (host side).
//
// A codebook is fully described by 256 code lengths (format.hpp). From them we
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
  /// entries as format::lut_entry, length 0 where no codeword matches.
  uint32_t lut[format::kLutSize];
  /// Encoder: bit-reversed codeword | length << 16; length 0 = no codeword.
  uint32_t enc[format::kNumSymbols];
};

class Codebook {
 public:
  /// Builds from a histogram of quantization symbols (counts[kNumSymbols]).
  /// ESC always gets a codeword, so any input stays representable; symbols
  /// with zero count get none (the encoder escapes them).
  static Codebook from_histogram(const uint64_t* counts);
  /// Rebuilds from stored code lengths; throws kvcomp::Error if they do not
  /// form a valid prefix code within kMaxCodeLen or lack ESC.
  static Codebook from_lengths(const uint8_t* lengths);

  int length(int symbol) const { return lengths_[symbol]; }
  const std::array<uint8_t, format::kNumSymbols>& lengths() const { return lengths_; }
  const CodebookTables& tables() const { return tables_; }
  /// Expected bits per symbol under a histogram (ESC's raw bits included).
  double mean_bits(const uint64_t* counts) const;

 private:
  void derive_tables();
  std::array<uint8_t, format::kNumSymbols> lengths_{};
  CodebookTables tables_{};
};

/// Huffman code lengths for `counts`, limited to `max_len` (exposed for tests).
std::array<uint8_t, format::kNumSymbols> huffman_lengths(const uint64_t* counts, int max_len);

}  // namespace kvcomp
