#include "kvcomp/codebook.hpp"

#include <string>

#include "kernels/huffman_build.cuh"
#include "kvcomp/error.hpp"

// The construction itself lives in kernels/huffman_build.cuh, shared with the
// device build (kernels/codebook_build.cuh): this file runs its steps serially.

namespace kvcomp {
namespace {

using format::kMaxCodeLen;
using format::kNumSymbols;
using format::kPairEscape;

void check_low_bits(int low_bits, const char* what) {
  if (low_bits < 0 || low_bits > format::kMaxLowBits)
    throw Error(std::string("codebook: ") + what + ": low_bits (k) must be 0.." +
                std::to_string(format::kMaxLowBits) + ", got " + std::to_string(low_bits));
}

/// Code lengths of a codebook built from one histogram row (codebook_weight rules).
void codebook_lengths(const uint64_t* counts, huffman::LengthWork& work) {
  huffman::load_step(work, counts, true, 0, 1);
  huffman::limited_lengths(work, kMaxCodeLen);
}

}  // namespace

std::array<uint8_t, kNumSymbols> huffman_lengths(const uint64_t* counts, int max_len) {
  huffman::LengthWork work;
  huffman::load_step(work, counts, false, 0, 1);
  huffman::limited_lengths(work, max_len);
  std::array<uint8_t, kNumSymbols> len{};
  for (int s = 0; s < kNumSymbols; ++s) len[s] = work.length[s];
  return len;
}

Codebook Codebook::from_histogram(const uint64_t* counts, int low_bits) {
  check_low_bits(low_bits, "from_histogram");
  huffman::LengthWork work;
  codebook_lengths(counts, work);
  Codebook cb;
  for (int s = 0; s < kNumSymbols; ++s) cb.lengths_[s] = work.length[s];
  cb.tables_.low_bits = uint32_t(low_bits);
  cb.derive_tables();
  return cb;
}

Codebook Codebook::from_histograms(const uint64_t* counts) {
  // One candidate per k, each from the histogram under its k; the estimate is
  // total_bits (what mean_bits averages), so the raw words of ESC values,
  // which every k writes alike, do not take part. Exact integers: the device
  // build (kernels/codebook_build.cuh) must pick the same k.
  huffman::LengthWork work;
  Codebook best;
  huffman::BitTotal best_bits = {0, 0};
  for (int k = 0; k < format::kLowBitChoices; ++k) {
    const uint64_t* row = counts + size_t(k) * kNumSymbols;
    codebook_lengths(row, work);
    const huffman::BitTotal bits = huffman::total_bits(work.length, k, row);
    if (k == 0 || huffman::fewer_bits(bits, best_bits)) {  // strictly fewer: a tie keeps the smaller k
      for (int s = 0; s < kNumSymbols; ++s) best.lengths_[s] = work.length[s];
      best.tables_.low_bits = uint32_t(k);
      best_bits = bits;
    }
  }
  best.derive_tables();
  return best;
}

Codebook Codebook::from_lengths(const uint8_t* lengths, int low_bits) {
  check_low_bits(low_bits, "from_lengths");
  Codebook cb;
  uint64_t kraft = 0;  // in units of 2^-kMaxCodeLen
  for (int s = 0; s < kNumSymbols; ++s) {
    if (lengths[s] > kMaxCodeLen) throw Error("codebook: code length " + std::to_string(lengths[s]) +
                                              " of symbol " + std::to_string(s) + " exceeds the limit");
    if (s > kPairEscape && lengths[s] != 0)
      throw Error("codebook: symbol " + std::to_string(s) + " has a codeword (length " +
                  std::to_string(lengths[s]) + ") but only symbols 0.." + std::to_string(kPairEscape) + " may");
    cb.lengths_[s] = lengths[s];
    if (lengths[s]) kraft += uint64_t(1) << (kMaxCodeLen - lengths[s]);
  }
  if (kraft > (uint64_t(1) << kMaxCodeLen)) throw Error("codebook: lengths violate the Kraft inequality");
  if (lengths[kPairEscape] == 0)
    throw Error("codebook: the pair escape symbol " + std::to_string(kPairEscape) + " has no codeword");
  cb.tables_.low_bits = uint32_t(low_bits);
  cb.derive_tables();
  return cb;
}

void Codebook::derive_tables() {
  huffman::CanonicalCode code;
  uint8_t by_length[kNumSymbols];
  huffman::canonical_code(lengths_.data(), code);
  huffman::enc_step(lengths_.data(), code, tables_.enc, by_length, 0, 1);
  huffman::lut_step(code, by_length, int(tables_.low_bits), tables_.lut, 0, 1);
}

double Codebook::mean_bits(const uint64_t* counts) const {
  double n = 0;
  for (int s = 0; s < kNumSymbols; ++s) n += double(counts[s]);
  if (!(n > 0)) return 0.0;
  const huffman::BitTotal bits = huffman::total_bits(lengths_.data(), low_bits(), counts);
  return (double(bits.high) * 0x1p64 + double(bits.low)) / n;
}

}  // namespace kvcomp
