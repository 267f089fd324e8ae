// Random symbol histograms of several shapes, for the codebook construction
// tests (host heap-vs-two-queue oracle, device build vs host build). Every
// shape keeps the sum of a row below 2^63, so no Huffman node weight wraps.
#pragma once

#include <algorithm>
#include <cstdint>
#include <random>
#include <vector>

#include "kvcomp/format.hpp"

namespace kvcomp_test {

enum class HistShape {
  Sparse,   // 1..8 symbols, counts up to 10^6
  Dense,    // nearly every symbol, counts up to 10^6, some zeros
  Ties,     // counts from a handful of small values: many equal weights
  Huge,     // counts up to 2^55 (sum below 2^63): exact bit totals past 2^64
  Single,   // one symbol
  Skewed,   // geometric or Fibonacci weights: the 11-bit limit binds
  Equal,    // every present symbol the same count
  Zero,     // nothing
};
constexpr HistShape kAllShapes[] = {HistShape::Sparse, HistShape::Dense,  HistShape::Ties,  HistShape::Huge,
                                    HistShape::Single, HistShape::Skewed, HistShape::Equal, HistShape::Zero};
inline const char* shape_name(HistShape s) {
  switch (s) {
    case HistShape::Sparse: return "sparse";
    case HistShape::Dense: return "dense";
    case HistShape::Ties: return "ties";
    case HistShape::Huge: return "huge";
    case HistShape::Single: return "single";
    case HistShape::Skewed: return "skewed";
    case HistShape::Equal: return "equal";
    case HistShape::Zero: return "zero";
  }
  return "?";
}

/// Fills row[kNumSymbols] with a random histogram of `shape`.
inline void random_row(std::mt19937_64& rng, HistShape shape, uint64_t* row) {
  constexpr int n = kvcomp::format::kNumSymbols;
  std::fill(row, row + n, uint64_t(0));
  switch (shape) {
    case HistShape::Sparse: {
      const int present = 1 + int(rng() % 8);
      for (int i = 0; i < present; ++i) row[rng() % n] = 1 + rng() % 1000000;
      break;
    }
    case HistShape::Dense:
      for (int s = 0; s < n; ++s) row[s] = rng() % 10 == 0 ? 0 : 1 + rng() % 1000000;
      break;
    case HistShape::Ties: {
      const uint64_t values[] = {0, 1, 2, 3, 5, 8, 1000};
      const int kinds = 2 + int(rng() % 6);
      for (int s = 0; s < n; ++s) row[s] = values[rng() % kinds];
      break;
    }
    case HistShape::Huge:
      for (int s = 0; s < n; ++s)
        row[s] = rng() % 4 == 0 ? 0 : (rng() % 2 ? (uint64_t(1) << 55) - 1 - rng() % 1000 : rng() >> 9);
      break;
    case HistShape::Single:
      row[rng() % n] = 1 + (rng() >> (1 + rng() % 63));
      break;
    case HistShape::Skewed: {
      // A random subset of symbols with weights falling by a factor 2..4, or
      // as Fibonacci numbers: unlimited depths far past 11.
      std::vector<int> symbols(n);
      for (int s = 0; s < n; ++s) symbols[s] = s;
      std::shuffle(symbols.begin(), symbols.end(), rng);
      const int present = 20 + int(rng() % 40);
      const bool fibonacci = rng() % 2;
      const uint64_t ratio = 2 + rng() % 3;
      uint64_t w = 1 + rng() % 64, prev = w;
      for (int i = 0; i < present; ++i) {
        row[symbols[i]] = w;
        const uint64_t next = fibonacci ? w + prev : w * ratio;
        prev = w;
        if (next > (uint64_t(1) << 52)) break;  // keeps the sum below 2^63
        w = next;
      }
      break;
    }
    case HistShape::Equal: {
      const uint64_t c = 1 + rng() % 100;
      const int present = 1 + int(rng() % n);
      for (int i = 0; i < present; ++i) row[rng() % n] = c;
      break;
    }
    case HistShape::Zero:
      break;
  }
}

/// A codebook's histograms [kLowBitChoices][kNumSymbols] of one shape; now and
/// then all rows alike (the bit totals of the k choices then tie or favor k = 0).
inline std::vector<uint64_t> random_book(std::mt19937_64& rng, HistShape shape) {
  constexpr int n = kvcomp::format::kNumSymbols;
  std::vector<uint64_t> rows(size_t(kvcomp::format::kLowBitChoices) * n);
  for (int k = 0; k < kvcomp::format::kLowBitChoices; ++k) random_row(rng, shape, &rows[size_t(k) * n]);
  if (rng() % 4 == 0)
    for (int k = 1; k < kvcomp::format::kLowBitChoices; ++k)
      std::copy(rows.begin(), rows.begin() + n, rows.begin() + size_t(k) * n);
  return rows;
}

}  // namespace kvcomp_test
