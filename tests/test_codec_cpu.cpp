// CPU tests of the codebook and the reference codec.
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <queue>
#include <string>
#include <utility>
#include <vector>

#include "kernels/huffman_build.cuh"
#include "kvcomp/codebook.hpp"
#include "kvcomp/error.hpp"
#include "kvcomp/reference.hpp"
#include "random_histograms.hpp"
#include "test_data.hpp"

using namespace kvcomp;
using namespace kvcomp::format;
using kvcomp_test::HistShape;

namespace {

void check_code_properties(const Codebook& cb) {
  const auto& len = cb.lengths();
  uint64_t kraft = 0;
  int present = 0;
  for (int s = 0; s < kNumSymbols; ++s) {
    ASSERT_LE(len[s], kMaxCodeLen);
    if (s > kPairEscape) {
      ASSERT_EQ(len[s], 0) << "symbol " << s << " is never in a stream";
    }
    if (len[s]) { kraft += uint64_t(1) << (kMaxCodeLen - len[s]); ++present; }
  }
  ASSERT_GT(len[kPairEscape], 0) << "PAIR_ESC must always be codable";
  ASSERT_LE(kraft, uint64_t(1) << kMaxCodeLen);
  if (present >= 2) {
    ASSERT_EQ(kraft, uint64_t(1) << kMaxCodeLen) << "Huffman codes are complete";
  }
  // Prefix-free and canonical: un-reverse the codes; within a length, codes rise with the symbol;
  // a shorter code is never a prefix of a longer one.
  const auto& enc = cb.tables().enc;
  std::vector<std::pair<int, uint32_t>> codes;  // (len, msb-first code)
  for (int s = 0; s < kNumSymbols; ++s) {
    ASSERT_EQ(int(enc[s] >> 16), int(len[s])) << s;
    if (len[s]) codes.push_back({len[s], reverse_bits(enc[s] & 0xFFFF, len[s])});
  }
  for (size_t i = 0; i < codes.size(); ++i)
    for (size_t j = 0; j < codes.size(); ++j) {
      if (i == j) continue;
      auto [li, ci] = codes[i];
      auto [lj, cj] = codes[j];
      if (li <= lj) {
        ASSERT_NE(ci, cj >> (lj - li)) << "code " << i << " is a prefix of " << j;
      }
    }
  int prev_sym = -1;
  uint32_t prev_code = 0;
  int prev_len = 0;
  for (int s = 0; s < kNumSymbols; ++s) {
    if (!len[s]) continue;
    const uint32_t c = reverse_bits(enc[s] & 0xFFFF, len[s]);
    if (prev_sym >= 0 && len[s] == prev_len) {
      ASSERT_GT(c, prev_code);
    }
    prev_sym = s; prev_code = c; prev_len = len[s];
  }
  // The decode table, index by index: the one codeword its low bits start
  // with (or none: 0). A pair symbol whose codeword and 2k low bits fit in
  // kMaxCodeLen bits has a fast entry: both full codes, the low bits taken
  // from the index bits after the codeword (k of a, then k of b), length
  // L + 2k; PAIR_ESC and longer pair symbols have a slow entry: symbol and L.
  const int k = cb.low_bits();
  ASSERT_TRUE(k >= 0 && k <= kMaxLowBits);
  ASSERT_EQ(cb.tables().low_bits, uint32_t(k));
  const uint32_t mask = (1u << k) - 1;
  size_t filled = 0;
  for (uint32_t i = 0; i < uint32_t(kLutSize); ++i) {
    const uint32_t e = cb.tables().lut[i];
    int s = -1;
    for (int t = 0; t < kNumSymbols; ++t)
      if (len[t] && (i & ((1u << len[t]) - 1)) == (enc[t] & 0xFFFFu)) {
        ASSERT_EQ(s, -1) << "index " << i << " starts with two codewords";
        s = t;
      }
    if (s < 0) {
      ASSERT_EQ(e, 0u) << "index " << i;
      continue;
    }
    ++filled;
    const int l = len[s];
    if (s == kPairEscape || l + 2 * k > kMaxCodeLen) {
      ASSERT_TRUE(lut_is_slow(e)) << "index " << i << " symbol " << s;
      ASSERT_EQ(lut_slow_symbol(e), s) << "index " << i;
      ASSERT_EQ(lut_length(e), l) << "index " << i;
      ASSERT_EQ(e, lut_slow_entry(s, l)) << "index " << i;
    } else {
      const int lo_a = int((i >> l) & mask), lo_b = int((i >> (l + k)) & mask);
      ASSERT_FALSE(lut_is_slow(e)) << "index " << i << " symbol " << s;
      ASSERT_EQ(lut_length(e), l + 2 * k) << "index " << i;
      ASSERT_EQ(lut_first(e), (s / kPairBase) << k | lo_a) << "index " << i;
      ASSERT_EQ(lut_second(e), (s % kPairBase) << k | lo_b) << "index " << i;
      // Decoding the pair's codes back gives the symbol under k.
      ASSERT_EQ(pair_symbol(lut_first(e), lut_second(e), k), s) << "index " << i;
    }
  }
  ASSERT_EQ(filled, size_t(kraft)) << "each codeword of length l fills 2^(11-l) entries";
}

double entropy_bits(const uint64_t* counts) {
  double n = 0, h = 0;
  for (int s = 0; s < kNumSymbols; ++s) n += double(counts[s]);
  for (int s = 0; s < kNumSymbols; ++s)
    if (counts[s]) { const double p = double(counts[s]) / n; h -= p * std::log2(p); }
  return h;
}

}  // namespace

TEST(Codebook, SkewedFlatSingleAndEmptyHistograms) {
  uint64_t counts[kNumSymbols] = {};
  // Geometric (very skewed): forces the length limit.
  for (int s = 0; s < 60; ++s) counts[s] = uint64_t(1) << (59 - s);
  const Codebook skewed = Codebook::from_histogram(counts);
  check_code_properties(skewed);
  EXPECT_EQ(*std::max_element(skewed.lengths().begin(), skewed.lengths().end()), kMaxCodeLen);
  for (int s = 0; s < 60; ++s) EXPECT_GT(skewed.length(s), 0) << s;
  // Flat over all 256 symbols: the 226 stream symbols get 7-8 bit codes, the rest none.
  for (int s = 0; s < kNumSymbols; ++s) counts[s] = 1000;
  const Codebook flat = Codebook::from_histogram(counts);
  check_code_properties(flat);
  for (int s = 0; s <= kPairEscape; ++s) {
    EXPECT_TRUE(flat.length(s) == 7 || flat.length(s) == 8) << s;
  }
  for (int s = kPairEscape + 1; s < kNumSymbols; ++s) EXPECT_EQ(flat.length(s), 0) << s;
  // Single symbol, the pair (0, 0): it and PAIR_ESC get codewords.
  std::fill(std::begin(counts), std::end(counts), 0);
  counts[0] = 12345;
  Codebook one = Codebook::from_histogram(counts);
  check_code_properties(one);
  EXPECT_EQ(one.length(0), 1);
  EXPECT_EQ(one.length(kPairEscape), 1);
  // The pair (0, 7) alone: every pair of hi parts up to 7 gets a codeword too (weight 1), no other pair does.
  std::fill(std::begin(counts), std::end(counts), 0);
  counts[7] = 12345;
  Codebook seven = Codebook::from_histogram(counts);
  check_code_properties(seven);
  EXPECT_EQ(seven.length(7), 1);
  for (int s = 0; s < kPairEscape; ++s)
    EXPECT_EQ(seven.length(s) != 0, s / kPairBase <= 7 && s % kPairBase <= 7) << s;
  // Empty: only PAIR_ESC.
  std::fill(std::begin(counts), std::end(counts), 0);
  Codebook empty = Codebook::from_histogram(counts);
  check_code_properties(empty);
  EXPECT_EQ(empty.length(kPairEscape), 1);
  for (int s = 0; s < kNumSymbols; ++s) EXPECT_EQ(empty.length(s), s == kPairEscape ? 1 : 0) << s;
  // Counts above PAIR_ESC (no stream holds them, e.g. the old ESC = 255) are ignored.
  std::fill(std::begin(counts), std::end(counts), 0);
  counts[kEscape] = 1000000;
  counts[kPairEscape + 1] = 1000000;
  counts[0] = 10;
  Codebook above = Codebook::from_histogram(counts);
  check_code_properties(above);
  EXPECT_EQ(above.length(0), 1);
  EXPECT_EQ(above.length(kPairEscape), 1);
  EXPECT_EQ(above.length(kEscape), 0);
  EXPECT_EQ(above.length(kPairEscape + 1), 0);
}

TEST(Codebook, LengthLimitIsElevenBits) {
  EXPECT_EQ(kMaxCodeLen, 11);
  EXPECT_EQ(kLutSize, 2048);
  // Fibonacci weights give the deepest Huffman trees: unlimited, 40 symbols would need depth 39.
  uint64_t counts[kNumSymbols] = {};
  uint64_t f0 = 1, f1 = 1;
  for (int s = 0; s < 40; ++s) { counts[s] = f0; const uint64_t f2 = f0 + f1; f0 = f1; f1 = f2; }
  for (int max_len : {8, 9, 10, 11, 12, 15}) {
    const auto len = huffman_lengths(counts, max_len);
    uint64_t kraft = 0;
    for (int s = 0; s < kNumSymbols; ++s) {
      ASSERT_LE(int(len[s]), max_len);
      ASSERT_EQ(len[s] != 0, counts[s] != 0) << s;
      if (len[s]) kraft += uint64_t(1) << (15 - len[s]);
    }
    EXPECT_EQ(kraft, uint64_t(1) << 15) << "complete at limit " << max_len;
    EXPECT_EQ(*std::max_element(len.begin(), len.end()), max_len) << "the limit binds";
  }
  const Codebook cb = Codebook::from_histogram(counts);
  check_code_properties(cb);
  EXPECT_EQ(*std::max_element(cb.lengths().begin(), cb.lengths().end()), kMaxCodeLen);
  // Stored lengths at exactly the limit are accepted: 1, 2, .., 11, 11 (Kraft = 1).
  uint8_t lengths[kNumSymbols] = {};
  for (int s = 0; s < 11; ++s) lengths[s * 20] = uint8_t(s + 1);  // symbols 0, 20, .., 200
  lengths[kPairEscape] = 11;
  const Codebook deep = Codebook::from_lengths(lengths);
  check_code_properties(deep);
  EXPECT_EQ(deep.length(200), 11);
  EXPECT_EQ(deep.length(kPairEscape), 11);
  // One bit more is not.
  lengths[200] = 12;
  EXPECT_THROW(Codebook::from_lengths(lengths), Error);
}

TEST(Codebook, RandomHistogramsAndLengthsRoundTrip) {
  const uint64_t seed = kvcomp_test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  for (int iter = 0; iter < 50; ++iter) {
    uint64_t counts[kNumSymbols] = {};
    const int present = 1 + int(rng() % kNumSymbols);
    for (int i = 0; i < present; ++i) counts[rng() % kNumSymbols] = 1 + (rng() % 1000000) * (rng() % 3 == 0 ? 1000 : 1);
    const int k = iter % kLowBitChoices;
    const Codebook cb = Codebook::from_histogram(counts, k);
    check_code_properties(cb);
    ASSERT_EQ(cb.low_bits(), k);
    // Present pair symbols and those within the largest present hi part have codewords (huffman_build.cuh).
    int hi_max = -1;
    for (int s = 0; s < kPairEscape; ++s)
      if (counts[s]) hi_max = std::max({hi_max, s / kPairBase, s % kPairBase});
    for (int s = 0; s < kPairEscape; ++s)
      ASSERT_EQ(cb.length(s) != 0, counts[s] != 0 || (s / kPairBase <= hi_max && s % kPairBase <= hi_max)) << s;
    const Codebook again = Codebook::from_lengths(cb.lengths().data(), k);
    ASSERT_EQ(0, std::memcmp(&cb.tables(), &again.tables(), sizeof(CodebookTables)));
    // The lengths do not depend on k; the decode table does (unless no pair symbol has a codeword).
    const Codebook k0 = Codebook::from_histogram(counts, 0);
    ASSERT_EQ(k0.lengths(), cb.lengths());
    ASSERT_EQ(0, std::memcmp(k0.tables().enc, cb.tables().enc, sizeof(cb.tables().enc)));
  }
}

TEST(Codebook, DecodeTableForEveryLowBitCount) {
  // A deep code: lengths 1, 2, .., 11, 11 (symbols 0, 20, .., 200 and
  // PAIR_ESC). Under k, codewords of length L <= 11 - 2k have fast entries,
  // longer ones (and PAIR_ESC) slow ones.
  uint8_t lengths[kNumSymbols] = {};
  for (int s = 0; s < 11; ++s) lengths[s * 20] = uint8_t(s + 1);
  lengths[kPairEscape] = 11;
  for (int k = 0; k <= kMaxLowBits; ++k) {
    SCOPED_TRACE("k " + std::to_string(k));
    const Codebook cb = Codebook::from_lengths(lengths, k);
    ASSERT_EQ(cb.low_bits(), k);
    check_code_properties(cb);
    int fast = 0, slow = 0;
    for (int i = 0; i < 11; ++i) {
      const int s = i * 20, l = i + 1;
      const uint32_t e = cb.tables().lut[cb.tables().enc[s] & 0xFFFFu];
      EXPECT_EQ(lut_is_slow(e), l + 2 * k > kMaxCodeLen) << "length " << l;
      (lut_is_slow(e) ? slow : fast) += 1;
    }
    EXPECT_EQ(slow, 2 * k);  // lengths 12 - 2k .. 11
    EXPECT_EQ(fast, 11 - 2 * k);
    EXPECT_TRUE(lut_is_slow(cb.tables().lut[cb.tables().enc[kPairEscape] & 0xFFFFu]));
  }
  // The first codeword ('0', symbol 0 = (0, 0)) under k = 3: the 6 index bits
  // after it are a's 3 low bits, then b's.
  const Codebook cb = Codebook::from_lengths(lengths, 3);
  for (uint32_t lo = 0; lo < 64; ++lo) {
    const uint32_t e = cb.tables().lut[lo << 1];
    EXPECT_EQ(e, lut_fast_entry(int(lo & 7), int(lo >> 3), 7)) << lo;
  }
  // Symbol 20 = (1, 5), '10' (bit-reversed: index bits 1, 0), k = 3:
  // codes (1 << 3 | lo_a, 5 << 3 | lo_b).
  EXPECT_EQ(cb.tables().lut[0x1u | 0x0u << 1 | 0x5u << 2 | 0x2u << 5], lut_fast_entry(8 | 5, 40 | 2, 8));
}

TEST(Codebook, LowBitsOutOfRangeAreRejected) {
  uint64_t counts[kNumSymbols] = {};
  counts[0] = 5;
  uint8_t lengths[kNumSymbols] = {};
  lengths[0] = 1;
  lengths[kPairEscape] = 1;
  for (int k : {-1, kMaxLowBits + 1, 8}) {
    for (int which = 0; which < 2; ++which) {
      std::string msg;
      try {
        (void)(which ? Codebook::from_lengths(lengths, k) : Codebook::from_histogram(counts, k));
      } catch (const Error& e) {
        msg = e.what();
      }
      EXPECT_NE(msg.find("low_bits"), std::string::npos) << k << ": " << msg;
      EXPECT_NE(msg.find(std::to_string(k)), std::string::npos) << k << ": " << msg;
    }
  }
  for (int k = 0; k <= kMaxLowBits; ++k) {
    EXPECT_EQ(Codebook::from_lengths(lengths, k).low_bits(), k);
    EXPECT_EQ(Codebook::from_histogram(counts, k).low_bits(), k);
  }
}

TEST(Codebook, FromHistogramsPicksTheFewestBits) {
  const uint64_t seed = kvcomp_test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  for (int iter = 0; iter < 40; ++iter) {
    std::vector<uint64_t> counts(size_t(kLowBitChoices) * kNumSymbols, 0);
    for (int k = 0; k < kLowBitChoices; ++k) {
      const int present = 1 + int(rng() % 40);
      for (int i = 0; i < present; ++i)
        counts[size_t(k) * kNumSymbols + rng() % (kPairEscape + 1)] += 1 + rng() % 10000;
    }
    if (iter % 5 == 0) {  // identical rows: the bits tie, or k = 0 is cheaper (no low bits)
      for (int k = 1; k < kLowBitChoices; ++k)
        std::copy(counts.begin(), counts.begin() + kNumSymbols, counts.begin() + size_t(k) * kNumSymbols);
    }
    int want = -1;
    double best = 0;
    for (int k = 0; k < kLowBitChoices; ++k) {
      const uint64_t* h = &counts[size_t(k) * kNumSymbols];
      double n = 0;
      for (int s = 0; s < kNumSymbols; ++s) n += double(h[s]);
      const double bits = Codebook::from_histogram(h, k).mean_bits(h) * n;
      if (want < 0 || bits < best - 1e-6) { want = k; best = bits; }
    }
    if (iter % 5 == 0) {
      ASSERT_EQ(want, 0);
    }
    const Codebook cb = Codebook::from_histograms(counts.data());
    ASSERT_EQ(cb.low_bits(), want) << "iter " << iter;
    const Codebook same = Codebook::from_histogram(&counts[size_t(want) * kNumSymbols], want);
    ASSERT_EQ(0, std::memcmp(&cb.tables(), &same.tables(), sizeof(CodebookTables)));
  }
  // Only PAIR_ESC (every k escapes every pair alike): a tie, the smaller k.
  std::vector<uint64_t> esc(size_t(kLowBitChoices) * kNumSymbols, 0);
  for (int k = 0; k < kLowBitChoices; ++k) esc[size_t(k) * kNumSymbols + kPairEscape] = 1000;
  EXPECT_EQ(Codebook::from_histograms(esc.data()).low_bits(), 0);
  std::vector<uint64_t> none(size_t(kLowBitChoices) * kNumSymbols, 0);
  EXPECT_EQ(Codebook::from_histograms(none.data()).low_bits(), 0);
  // Codes uniform over 0..59: pairs escape under k = 0 (hi parts up to 59)
  // and k = 1 (up to 29) but fit under k = 2 and 3.
  std::vector<uint64_t> uni(size_t(kLowBitChoices) * kNumSymbols, 0);
  for (int a = 0; a < 60; ++a)
    for (int b = 0; b < 60; ++b)
      for (int k = 0; k < kLowBitChoices; ++k) ++uni[size_t(k) * kNumSymbols + pair_symbol(a, b, k)];
  const int k_uni = Codebook::from_histograms(uni.data()).low_bits();
  EXPECT_GE(k_uni, 2);
}

namespace {

/// The message of the kvcomp::Error that from_lengths throws ("" if none).
std::string from_lengths_error(const uint8_t* lengths) {
  try {
    (void)Codebook::from_lengths(lengths);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST(Codebook, BadLengthsAreRejected) {
  uint8_t lengths[kNumSymbols] = {};
  EXPECT_NE(from_lengths_error(lengths).find("225"), std::string::npos);  // no PAIR_ESC
  lengths[0] = 1;
  lengths[1] = 1;
  EXPECT_NE(from_lengths_error(lengths).find("225"), std::string::npos);  // a complete code, but no PAIR_ESC
  lengths[1] = 0;
  lengths[kPairEscape] = 1;
  EXPECT_EQ(from_lengths_error(lengths), "");  // valid: symbol 0 and PAIR_ESC
  lengths[kPairEscape] = 12;
  EXPECT_NE(from_lengths_error(lengths).find("exceeds"), std::string::npos);  // too long
  lengths[kPairEscape] = 1; lengths[1] = 1;
  EXPECT_NE(from_lengths_error(lengths).find("Kraft"), std::string::npos);  // Kraft > 1
  lengths[1] = 0;
  // A codeword for a symbol above PAIR_ESC (a v2 codebook had ESC = 255): named in the message.
  for (int s : {kPairEscape + 1, 240, kEscape}) {
    uint8_t bad[kNumSymbols] = {};
    bad[0] = 2;
    bad[kPairEscape] = 2;
    bad[s] = 2;
    const std::string msg = from_lengths_error(bad);
    EXPECT_NE(msg.find("symbol " + std::to_string(s)), std::string::npos) << s << ": " << msg;
    bad[s] = 0;
    EXPECT_EQ(from_lengths_error(bad), "");
  }
}

TEST(Codebook, MeanBitsCountsPairEscapeFields) {
  uint64_t train[kNumSymbols] = {};
  train[0] = 8;   // -> length 1
  train[16] = 4;  // (1, 1) -> length 3
  train[kPairEscape] = 4;  // -> length 2
  // (0, 1) and (1, 0), within the hi parts seen, get weight 1 -> length 4; (1, 2) = 17 is beyond: none.
  const Codebook cb = Codebook::from_histogram(train);
  ASSERT_EQ(cb.length(0), 1);
  ASSERT_EQ(cb.length(16), 3);
  ASSERT_EQ(cb.length(kPairEscape), 2);
  ASSERT_EQ(cb.length(1), 4);
  ASSERT_EQ(cb.length(15), 4);
  ASSERT_EQ(cb.length(17), 0);
  uint64_t counts[kNumSymbols] = {};
  counts[0] = 10;            // 1 bit each
  counts[16] = 20;           // 3 bits
  counts[kPairEscape] = 30;  // 2 + 16 bits (raw words not counted)
  counts[17] = 40;           // no codeword: written as PAIR_ESC, 2 + 16 bits
  const double want = (10.0 * 1 + 20.0 * 3 + 30.0 * 18 + 40.0 * 18) / 100.0;
  EXPECT_DOUBLE_EQ(cb.mean_bits(counts), want);
  uint64_t none[kNumSymbols] = {};
  EXPECT_EQ(cb.mean_bits(none), 0.0);
  // Under k = 2 a coded pair symbol also carries 4 low bits; PAIR_ESC does not.
  const Codebook k2 = Codebook::from_histogram(train, 2);
  ASSERT_EQ(k2.lengths(), cb.lengths());
  const double want2 = (10.0 * 5 + 20.0 * 7 + 30.0 * 18 + 40.0 * 18) / 100.0;
  EXPECT_DOUBLE_EQ(k2.mean_bits(counts), want2);
}

namespace {

// The construction before kernels/huffman_build.cuh, as the oracle of the
// tests below: a binary heap ordered by (weight, id), internal nodes numbered
// 256, 257, .. in creation order; (c + 1) / 2 halving for the length limit;
// tables filled codeword by codeword; bit totals in double.
namespace heap_oracle {

std::array<uint8_t, kNumSymbols> unlimited_lengths(const std::vector<uint64_t>& counts) {
  std::array<uint8_t, kNumSymbols> len{};
  struct Node { uint64_t weight; int id; };
  auto cmp = [](const Node& a, const Node& b) { return a.weight != b.weight ? a.weight > b.weight : a.id > b.id; };
  std::priority_queue<Node, std::vector<Node>, decltype(cmp)> heap(cmp);
  std::vector<int> parent(2 * kNumSymbols, -1);
  int present = 0;
  for (int s = 0; s < kNumSymbols; ++s)
    if (counts[s] > 0) { heap.push({counts[s], s}); ++present; }
  if (present == 1) {
    for (int s = 0; s < kNumSymbols; ++s) if (counts[s] > 0) len[s] = 1;
    return len;
  }
  int next = kNumSymbols;
  while (heap.size() > 1) {
    const Node a = heap.top(); heap.pop();
    const Node b = heap.top(); heap.pop();
    parent[a.id] = parent[b.id] = next;
    heap.push({a.weight + b.weight, next++});
  }
  for (int s = 0; s < kNumSymbols; ++s) {
    if (counts[s] == 0) continue;
    int depth = 0;
    for (int n = s; parent[n] != -1; n = parent[n]) ++depth;
    len[s] = uint8_t(std::min(depth, 255));
  }
  return len;
}

std::array<uint8_t, kNumSymbols> lengths(const uint64_t* counts_in, int max_len) {
  std::vector<uint64_t> counts(counts_in, counts_in + kNumSymbols);
  for (;;) {
    const auto len = unlimited_lengths(counts);
    if (*std::max_element(len.begin(), len.end()) <= max_len) return len;
    for (auto& c : counts) if (c > 0) c = (c + 1) / 2;
  }
}

CodebookTables tables(const std::array<uint8_t, kNumSymbols>& lengths, int k) {
  CodebookTables t{};
  int bl_count[kMaxCodeLen + 1] = {};
  for (int s = 0; s < kNumSymbols; ++s) if (lengths[s]) ++bl_count[lengths[s]];
  uint32_t next_code[kMaxCodeLen + 2] = {};
  uint32_t code = 0;
  for (int bits = 1; bits <= kMaxCodeLen; ++bits) {
    code = (code + bl_count[bits - 1]) << 1;
    next_code[bits] = code;
  }
  t.low_bits = uint32_t(k);
  const uint32_t mask = (1u << k) - 1;
  for (int s = 0; s < kNumSymbols; ++s) {
    const int len = lengths[s];
    if (!len) continue;
    const uint32_t rev = reverse_bits(next_code[len]++, len);
    t.enc[s] = rev | (uint32_t(len) << 16);
    const bool slow = s == kPairEscape || len + 2 * k > kMaxCodeLen;
    for (uint32_t ext = 0; ext < (1u << (kMaxCodeLen - len)); ++ext) {
      const int lo_a = int(ext & mask), lo_b = int((ext >> k) & mask);
      t.lut[rev | (ext << len)] = slow ? lut_slow_entry(s, len)
                                       : lut_fast_entry((s / kPairBase) << k | lo_a, (s % kPairBase) << k | lo_b,
                                                        len + 2 * k);
    }
  }
  return t;
}

std::array<uint8_t, kNumSymbols> codebook_lengths(const uint64_t* counts_in) {
  std::vector<uint64_t> counts(counts_in, counts_in + kNumSymbols);
  for (int s = kPairEscape + 1; s < kNumSymbols; ++s) counts[s] = 0;
  counts[kPairEscape] = std::max<uint64_t>(counts[kPairEscape], 1);
  int hi_max = -1;  // pairs within the largest hi part present get weight 1
  for (int s = 0; s < kPairEscape; ++s)
    if (counts_in[s]) hi_max = std::max({hi_max, s / kPairBase, s % kPairBase});
  for (int s = 0; s < kPairEscape; ++s)
    if (!counts[s] && s / kPairBase <= hi_max && s % kPairBase <= hi_max) counts[s] = 1;
  return lengths(counts.data(), kMaxCodeLen);
}

double total_bits(const std::array<uint8_t, kNumSymbols>& len, int k, const uint64_t* counts) {
  const double esc_bits = double(len[kPairEscape]) + 2.0 * kFieldBits;
  double bits = 0;
  for (int s = 0; s < kNumSymbols; ++s)
    if (counts[s]) bits += ((s < kPairEscape && len[s]) ? double(len[s]) + 2.0 * k : esc_bits) * double(counts[s]);
  return bits;
}

CodebookTables from_histograms(const uint64_t* counts) {
  CodebookTables best{};
  double best_bits = 0;
  for (int k = 0; k < kLowBitChoices; ++k) {
    const uint64_t* row = counts + size_t(k) * kNumSymbols;
    const auto len = codebook_lengths(row);
    const double bits = total_bits(len, k, row);
    if (k == 0 || bits < best_bits) { best = tables(len, k); best_bits = bits; }
  }
  return best;
}

}  // namespace heap_oracle

using Bits = unsigned __int128;

/// Exact bits of a row under a codebook (what from_histograms compares).
Bits exact_bits(const Codebook& cb, const uint64_t* counts) {
  const int k = cb.low_bits();
  Bits bits = 0;
  for (int s = 0; s < kNumSymbols; ++s) {
    const bool coded = s < kPairEscape && cb.length(s);
    bits += Bits(counts[s]) * Bits(coded ? cb.length(s) + 2 * k : cb.length(kPairEscape) + 2 * kFieldBits);
  }
  return bits;
}

bool same_tables(const CodebookTables& a, const CodebookTables& b) { return std::memcmp(&a, &b, sizeof(a)) == 0; }

}  // namespace

TEST(Codebook, TwoQueueLengthsMatchTheHeapConstruction) {
  const uint64_t seed = kvcomp_test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  uint64_t row[kNumSymbols];
  int limited = 0;
  for (int iter = 0; iter < 100; ++iter)
    for (auto shape : kvcomp_test::kAllShapes) {
      kvcomp_test::random_row(rng, shape, row);
      for (int max_len : {8, kMaxCodeLen, 15}) {
        SCOPED_TRACE(std::string(kvcomp_test::shape_name(shape)) + " limit " + std::to_string(max_len) + " iter " +
                     std::to_string(iter));
        const auto want = heap_oracle::lengths(row, max_len);
        ASSERT_EQ(huffman_lengths(row, max_len), want);
        if (max_len == kMaxCodeLen && heap_oracle::lengths(row, 64) != want) ++limited;
      }
      // As a codebook: PAIR_ESC forced in, symbols above it dropped.
      ASSERT_EQ(Codebook::from_histogram(row).lengths(), heap_oracle::codebook_lengths(row))
          << kvcomp_test::shape_name(shape);
    }
  EXPECT_GT(limited, 50) << "the length limit must bind often enough to be tested";
  // Ties at every level: equal counts over 2..256 symbols (a balanced tree, lengths differ by symbol order).
  for (int present = 2; present <= kNumSymbols; ++present) {
    std::fill(std::begin(row), std::end(row), uint64_t(0));
    for (int s = 0; s < present; ++s) row[(s * 37) % kNumSymbols] = 7;
    ASSERT_EQ(huffman_lengths(row, kMaxCodeLen), heap_oracle::lengths(row, kMaxCodeLen)) << present;
  }
}

TEST(Codebook, TablesMatchTheHeapConstruction) {
  // The whole host build against the old one: lengths, k choice (doubles are
  // exact at these counts), encoder and decode tables, byte for byte.
  const uint64_t seed = kvcomp_test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  for (int iter = 0; iter < 25; ++iter)
    for (auto shape : kvcomp_test::kAllShapes) {
      if (shape == HistShape::Huge || shape == HistShape::Single) continue;  // doubles would round
      SCOPED_TRACE(std::string(kvcomp_test::shape_name(shape)) + " iter " + std::to_string(iter));
      const auto rows = kvcomp_test::random_book(rng, shape);
      ASSERT_TRUE(same_tables(Codebook::from_histograms(rows.data()).tables(), heap_oracle::from_histograms(rows.data())));
      const int k = iter % kLowBitChoices;
      const uint64_t* row = &rows[size_t(k) * kNumSymbols];
      ASSERT_TRUE(same_tables(Codebook::from_histogram(row, k).tables(),
                              heap_oracle::tables(heap_oracle::codebook_lengths(row), k)));
    }
}

TEST(Codebook, FromHistogramsTakesTheExactArgminOfBits) {
  // Random 4-row histograms of every shape, huge counts included: a complete
  // prefix code (Kraft sum 1 with two or more codewords), PAIR_ESC coded, and
  // k the first argmin of the exact bit totals of the four candidates.
  const uint64_t seed = kvcomp_test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  for (int iter = 0; iter < 6; ++iter)
    for (auto shape : kvcomp_test::kAllShapes) {
      SCOPED_TRACE(std::string(kvcomp_test::shape_name(shape)) + " iter " + std::to_string(iter));
      const auto rows = kvcomp_test::random_book(rng, shape);
      const Codebook cb = Codebook::from_histograms(rows.data());
      check_code_properties(cb);
      int want = 0;
      Bits best = 0;
      for (int k = 0; k < kLowBitChoices; ++k) {
        const uint64_t* row = &rows[size_t(k) * kNumSymbols];
        const Bits bits = exact_bits(Codebook::from_histogram(row, k), row);
        if (k == 0 || bits < best) { want = k; best = bits; }
      }
      ASSERT_EQ(cb.low_bits(), want);
      ASSERT_TRUE(same_tables(cb.tables(), Codebook::from_histogram(&rows[size_t(want) * kNumSymbols], want).tables()));
    }
  // Only PAIR_ESC under every k, 2^58 pairs under k = 0 and one fewer under
  // k = 1: 17 x 2^58 and 17 x 2^58 - 17 bits, the same double (a tie that
  // would keep k = 0); the integers pick k = 1.
  std::vector<uint64_t> rows(size_t(kLowBitChoices) * kNumSymbols, 0);
  for (int k = 0; k < kLowBitChoices; ++k) rows[size_t(k) * kNumSymbols + kPairEscape] = uint64_t(1) << 58;
  rows[size_t(1) * kNumSymbols + kPairEscape] -= 1;
  ASSERT_EQ(17.0 * double(uint64_t(1) << 58), 17.0 * double((uint64_t(1) << 58) - 1));
  EXPECT_EQ(Codebook::from_histograms(rows.data()).low_bits(), 1);
}

TEST(Codebook, CountsPastTwoToTheSixtyFourAreHalvedFirst) {
  // Node weights would wrap: the counts are halved (ceil) until they sum
  // below 2^64; the code is then that of the halved counts.
  uint64_t row[kNumSymbols] = {}, halved[kNumSymbols] = {};
  for (int s = 0; s < 4; ++s) row[s] = uint64_t(1) << 63;
  auto len = huffman_lengths(row, kMaxCodeLen);
  for (int s = 0; s < kNumSymbols; ++s) EXPECT_EQ(len[s], s < 4 ? 2 : 0) << s;
  const uint64_t big = ~uint64_t(0);
  for (int s = 0; s < 40; ++s) row[s] = big >> s;  // sum near 2^65, skewed
  for (int s = 0; s < kNumSymbols; ++s) halved[s] = row[s] - row[s] / 2;
  len = huffman_lengths(row, kMaxCodeLen);
  EXPECT_EQ(len, huffman_lengths(halved, kMaxCodeLen));
  uint64_t kraft = 0;
  for (int s = 0; s < kNumSymbols; ++s) {
    ASSERT_EQ(len[s] != 0, row[s] != 0) << s;
    if (len[s]) kraft += uint64_t(1) << (kMaxCodeLen - len[s]);
  }
  EXPECT_EQ(kraft, uint64_t(1) << kMaxCodeLen);
  // As a codebook, bits past 2^64 included.
  row[kPairEscape] = big;
  const Codebook cb = Codebook::from_histogram(row, 2);
  check_code_properties(cb);
  EXPECT_GT(cb.mean_bits(row), 1.0);
}

TEST(Codebook, StridedStepsMatchTheSerialBuild) {
  // kernels/codebook_build.cuh's decomposition, emulated lane by lane: one
  // warp (32 lanes) per k for the lengths, 128 threads for the tables. Each
  // strided step's lanes are independent, so running them one after another
  // is one valid interleaving of the device's.
  const uint64_t seed = kvcomp_test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  namespace hf = kvcomp::huffman;
  for (int iter = 0; iter < 5; ++iter)
    for (auto shape : kvcomp_test::kAllShapes) {
      SCOPED_TRACE(std::string(kvcomp_test::shape_name(shape)) + " iter " + std::to_string(iter));
      const auto rows = kvcomp_test::random_book(rng, shape);
      std::vector<hf::LengthWork> work(kLowBitChoices);
      hf::BitTotal bits[kLowBitChoices];
      for (int k = 0; k < kLowBitChoices; ++k) {
        hf::LengthWork& w = work[k];
        const uint64_t* row = &rows[size_t(k) * kNumSymbols];
        for (int lane = 0; lane < 32; ++lane) hf::load_step(w, row, true, lane, 32);
        hf::finish_load(w);
        for (;;) {
          for (int lane = 0; lane < 32; ++lane) hf::rank_step(w, lane, 32);
          hf::merge_step(w);
          if (w.max_depth <= kMaxCodeLen) break;
          for (int lane = 0; lane < 32; ++lane) hf::halve_step(w, lane, 32);
        }
        bits[k] = hf::total_bits(w.length, k, row);
      }
      int best = 0;
      for (int k = 1; k < kLowBitChoices; ++k)
        if (hf::fewer_bits(bits[k], bits[best])) best = k;
      CodebookTables t{};
      hf::CanonicalCode code;
      uint8_t by_length[kNumSymbols];
      hf::canonical_code(work[best].length, code);
      t.low_bits = uint32_t(best);
      for (int lane = 0; lane < 128; ++lane) hf::enc_step(work[best].length, code, t.enc, by_length, lane, 128);
      for (int lane = 0; lane < 128; ++lane) hf::lut_step(code, by_length, best, t.lut, lane, 128);
      ASSERT_TRUE(same_tables(t, Codebook::from_histograms(rows.data()).tables()));
    }
}

TEST(Codebook, ExactBitTotalsCarryPastSixtyFourBits) {
  namespace hf = kvcomp::huffman;
  hf::BitTotal t = {0, 0};
  Bits want = 0;
  std::mt19937_64 rng(kvcomp_test::fresh_seed());
  for (int i = 0; i < 1000; ++i) {
    const uint64_t count = i % 3 ? rng() : ~uint64_t(0) - i;
    const uint32_t per = uint32_t(rng() % 28);
    hf::add_bits(t, count, per);
    want += Bits(count) * per;
    ASSERT_EQ(t.low, uint64_t(want));
    ASSERT_EQ(t.high, uint64_t(want >> 64));
  }
  EXPECT_TRUE(hf::fewer_bits({0, ~uint64_t(0)}, {1, 0}));
  EXPECT_FALSE(hf::fewer_bits({1, 0}, {1, 0}));
  EXPECT_TRUE(hf::fewer_bits({1, 0}, {1, 1}));
}

namespace {

struct Case { Kind kind; int T; int D; };

/// Histograms of stream symbols under every k, as ref::add_histogram fills them.
using Histograms = std::vector<uint64_t>;  // kLowBitChoices x kNumSymbols
Histograms no_histograms() { return Histograms(size_t(kLowBitChoices) * kNumSymbols, 0); }

Codebook codebook_for(Kind kind, const std::vector<float>& x, int T, int D, ErrorBound eb) {
  Histograms counts = no_histograms();
  ref::add_histogram(kind, x.data(), T, D, eb, counts.data());
  const Codebook cb = Codebook::from_histograms(counts.data());
  check_code_properties(cb);
  return cb;
}

}  // namespace

TEST(ReferenceCodec, RoundTripWithinBoundOnEveryElement) {
  const uint64_t seed = kvcomp_test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  for (auto dist : kvcomp_test::kAllDists)
    for (Case cs : {Case{Kind::Key, 64, 128}, Case{Kind::Value, 64, 128}, Case{Kind::Key, 32, 64},
                    Case{Kind::Value, 128, 256}, Case{Kind::Key, 128, 64}, Case{Kind::Value, 128, 96}})
      for (ErrorBound eb : {ErrorBound{BoundMode::Relative, 0.01f}, ErrorBound{BoundMode::Relative, 0.1f},
                            ErrorBound{BoundMode::Absolute, 0.02f}}) {
        auto x = kvcomp_test::make_data(dist, cs.T, cs.D, seed + cs.T + cs.D);
        kvcomp_test::round_to_half(x);
        // The codebook comes from other data (as in serving: built at prefill).
        const auto train = kvcomp_test::make_data(dist, cs.T, cs.D, seed + 17);
        const Codebook cb = codebook_for(cs.kind, train, cs.T, cs.D, eb);
        const auto bytes = ref::encode_block(cs.kind, x.data(), cs.T, cs.D, eb, cb, 42);
        ASSERT_EQ(bytes.size() % kBlockAlign, 0u);
        std::vector<float> out(x.size(), std::numeric_limits<float>::quiet_NaN());
        uint16_t id = 0;
        ASSERT_EQ(ref::decode_block(bytes.data(), bytes.size(), cs.kind, cs.T, cs.D, cb, out.data(), &id),
                  ref::DecodeStatus::Ok);
        EXPECT_EQ(id, 42);
        const auto params = ref::block_params(cs.kind, x.data(), cs.T, cs.D, eb);
        for (int t = 0; t < cs.T; ++t)
          for (int c = 0; c < cs.D; ++c) {
            const float bound = params[group_of(cs.kind, cs.T, cs.D, t, c)].eb_abs;
            const size_t i = size_t(t) * cs.D + c;
            ASSERT_LE(std::fabs(out[i] - x[i]), bound)
                << kvcomp_test::dist_name(dist) << " t " << t << " c " << c;
          }
      }
}

TEST(ReferenceCodec, ValueGroupsAreChannelsWhereBlocksHaveMoreTokensThanChannels) {
  // Format v4: a V block of T > D tokens (128 x 64/80/96) is quantized per
  // channel over its tokens, as K; T <= D stays per token. The stored params
  // are each group's own (min, step) from its finite range, and every value is
  // within eb x its channel's (or token's) range.
  const uint64_t seed = kvcomp_test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  const ErrorBound eb{BoundMode::Relative, 0.05f};
  for (Case cs : {Case{Kind::Value, 128, 64}, Case{Kind::Value, 128, 80}, Case{Kind::Value, 128, 96},
                  Case{Kind::Value, 128, 128}, Case{Kind::Value, 64, 64}, Case{Kind::Value, 32, 64}}) {
    SCOPED_TRACE("V " + std::to_string(cs.T) + " x " + std::to_string(cs.D));
    const bool by_channel = cs.T > cs.D;
    ASSERT_EQ(groups_are_channels(Kind::Value, cs.T, cs.D), by_channel);
    ASSERT_EQ(num_groups(Kind::Value, cs.T, cs.D), by_channel ? cs.D : cs.T);
    auto x = kvcomp_test::make_data(kvcomp_test::Dist::OutlierChannels, cs.T, cs.D, seed + cs.T + cs.D);
    kvcomp_test::round_to_half(x);
    x[3 * cs.D + 5] = std::numeric_limits<float>::infinity();  // escaped, outside its group's range
    const Codebook cb = codebook_for(Kind::Value, x, cs.T, cs.D, eb);
    const auto bytes = ref::encode_block(Kind::Value, x.data(), cs.T, cs.D, eb, cb, 1);
    const int groups = num_groups(Kind::Value, cs.T, cs.D);
    ASSERT_EQ(lane_bits_offset(Kind::Value, cs.T, cs.D), params_offset() + 4u * groups);
    for (int g = 0; g < groups; ++g) {
      float lo = kEmptyLo, hi = kEmptyHi;
      for (int i = 0; i < (by_channel ? cs.T : cs.D); ++i)
        range_add(by_channel ? x[size_t(i) * cs.D + g] : x[size_t(g) * cs.D + i], lo, hi);
      const GroupQuant want = make_group_quant(lo, hi, eb);
      GroupParams got;
      std::memcpy(&got, &bytes[params_offset() + 4 * g], 4);
      ASSERT_EQ(got.min_bits, want.stored.min_bits) << "group " << g;
      ASSERT_EQ(got.step_bits, want.stored.step_bits) << "group " << g;
    }
    std::vector<float> out(x.size());
    ASSERT_EQ(ref::decode_block(bytes.data(), bytes.size(), Kind::Value, cs.T, cs.D, cb, out.data()),
              ref::DecodeStatus::Ok);
    for (int t = 0; t < cs.T; ++t)
      for (int c = 0; c < cs.D; ++c) {
        const size_t i = size_t(t) * cs.D + c;
        if (!std::isfinite(x[i])) {
          ASSERT_EQ(float_bits(out[i]), float_bits(x[i]));
          continue;
        }
        float lo = kEmptyLo, hi = kEmptyHi;  // the value's group range, computed here
        for (int j = 0; j < (by_channel ? cs.T : cs.D); ++j)
          range_add(by_channel ? x[size_t(j) * cs.D + c] : x[size_t(t) * cs.D + j], lo, hi);
        ASSERT_LE(std::fabs(out[i] - x[i]), 0.05f * (hi - lo) * (1 + 1e-6f)) << "t " << t << " c " << c;
      }
  }
}

TEST(ReferenceCodec, HistogramCountsPairSymbols) {
  const uint64_t seed = kvcomp_test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  for (Case cs : {Case{Kind::Key, 64, 128}, Case{Kind::Value, 64, 128}, Case{Kind::Key, 32, 256},
                  Case{Kind::Value, 128, 64}})
    for (ErrorBound eb : {ErrorBound{BoundMode::Relative, 0.003f}, ErrorBound{BoundMode::Relative, 0.05f}}) {
      auto x = kvcomp_test::make_data(kvcomp_test::Dist::HeavyTailed, cs.T, cs.D, seed + cs.T);
      x[5] = std::numeric_limits<float>::infinity();
      // Exactly 4 x 256 counts (ASan sees a write past them).
      std::vector<uint64_t> counts(size_t(kLowBitChoices) * kNumSymbols, 0);
      ref::add_histogram(cs.kind, x.data(), cs.T, cs.D, eb, counts.data());
      // Independently: the lane order pairs neighbours along the group-crossing
      // axis, K (t, 2j) with (t, 2j + 1), V (2j, c) with (2j + 1, c); row k
      // holds the pair symbols under k low bits.
      const auto params = ref::block_params(cs.kind, x.data(), cs.T, cs.D, eb);
      auto code = [&](int t, int c) {
        return quantize(x[size_t(t) * cs.D + c], params[group_of(cs.kind, cs.T, cs.D, t, c)]);
      };
      std::vector<uint64_t> want(counts.size(), 0);
      for (int k = 0; k < kLowBitChoices; ++k)
        for (int t = 0; t < cs.T; ++t)
          for (int c = 0; c < cs.D; ++c) {
            if (cs.kind == Kind::Key && c % 2 == 0)
              ++want[size_t(k) * kNumSymbols + pair_symbol(code(t, c), code(t, c + 1), k)];
            if (cs.kind == Kind::Value && t % 2 == 0)
              ++want[size_t(k) * kNumSymbols + pair_symbol(code(t, c), code(t + 1, c), k)];
          }
      for (size_t i = 0; i < counts.size(); ++i)
        ASSERT_EQ(counts[i], want[i]) << "k " << i / kNumSymbols << " symbol " << i % kNumSymbols;
      for (int k = 0; k < kLowBitChoices; ++k) {
        uint64_t n = 0;
        for (int s = 0; s < kNumSymbols; ++s) n += counts[size_t(k) * kNumSymbols + s];
        EXPECT_EQ(n, uint64_t(cs.T) * cs.D / 2) << "every row counts every pair, k " << k;
        EXPECT_GT(counts[size_t(k) * kNumSymbols + kPairEscape], 0u) << "the Inf, k " << k;
      }
      // It adds to what is there.
      ref::add_histogram(cs.kind, x.data(), cs.T, cs.D, eb, counts.data());
      for (size_t i = 0; i < counts.size(); ++i) ASSERT_EQ(counts[i], 2 * want[i]) << i;
    }
}

TEST(ReferenceCodec, EveryKindOfPairRoundTrips) {
  // Under every k: pairs with a codeword (fast table entries, and slow ones
  // whose codeword is too long to carry its low bits), pairs of small codes
  // without one (written as PAIR_ESC), pairs with a hi part >= 15 (8-bit
  // fields) and pairs with an ESC value (field 255 + raw fp32, NaN and Inf
  // included): each must occur, and every value decodes to exactly
  // dequantize(code) within eb_abs, or to its own bits when escaped.
  const uint64_t seed = kvcomp_test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const float specials[] = {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                            -std::numeric_limits<float>::infinity(), bits_float(0x7FC01234u), bits_float(0xFF800001u),
                            bits_float(0x7F800001u)};
  for (int k = 0; k <= kMaxLowBits; ++k) {
    uint64_t fast = 0, slow = 0, small_uncoded = 0, large = 0, raw = 0;
    for (Case cs : {Case{Kind::Key, 64, 128}, Case{Kind::Value, 64, 128}, Case{Kind::Key, 32, 64},
                    Case{Kind::Value, 128, 256}, Case{Kind::Key, 128, 256}, Case{Kind::Value, 32, 64},
                    Case{Kind::Value, 128, 64}})
      for (ErrorBound eb : {ErrorBound{BoundMode::Relative, 0.002f}, ErrorBound{BoundMode::Relative, 0.01f},
                            ErrorBound{BoundMode::Relative, 0.05f}, ErrorBound{BoundMode::Absolute, 1e-4f}}) {
        SCOPED_TRACE(std::string(cs.kind == Kind::Key ? "K " : "V ") + std::to_string(cs.T) + " x " +
                     std::to_string(cs.D) + " eb " + std::to_string(eb.value) + " k " + std::to_string(k));
        auto x = kvcomp_test::make_data(kvcomp_test::Dist::OutlierChannels, cs.T, cs.D, rng());
        for (size_t j = 0; j < x.size() / 64; ++j) x[rng() % x.size()] = specials[j % 6];
        // The codebook: trained on other data, without the block's most
        // frequent pair symbol, under this k.
        Histograms mine = no_histograms(), train = no_histograms();
        ref::add_histogram(cs.kind, x.data(), cs.T, cs.D, eb, mine.data());
        const auto other = kvcomp_test::make_data(kvcomp_test::Dist::OutlierChannels, cs.T, cs.D, rng());
        ref::add_histogram(cs.kind, other.data(), cs.T, cs.D, eb, train.data());
        uint64_t* row = &train[size_t(k) * kNumSymbols];
        const uint64_t* my_row = &mine[size_t(k) * kNumSymbols];
        const int top = int(std::max_element(my_row, my_row + kPairEscape) - my_row);
        // (Built with a codeword for it, as every pair within the range seen; taken away from the stored lengths.)
        auto lens = Codebook::from_histogram(row, k).lengths();
        lens[top] = 0;
        const Codebook cb = Codebook::from_lengths(lens.data(), k);
        ASSERT_EQ(cb.length(top), 0);
        ASSERT_EQ(cb.low_bits(), k);

        const auto bytes = ref::encode_block(cs.kind, x.data(), cs.T, cs.D, eb, cb, 3);
        std::vector<float> out(x.size(), 12345.f);
        ASSERT_EQ(ref::decode_block(bytes.data(), bytes.size(), cs.kind, cs.T, cs.D, cb, out.data()),
                  ref::DecodeStatus::Ok);
        const auto params = ref::block_params(cs.kind, x.data(), cs.T, cs.D, eb);
        std::vector<int> codes(x.size());
        for (int t = 0; t < cs.T; ++t)
          for (int c = 0; c < cs.D; ++c) {
            const size_t i = size_t(t) * cs.D + c;
            const GroupQuant& g = params[group_of(cs.kind, cs.T, cs.D, t, c)];
            codes[i] = quantize(x[i], g);
            if (codes[i] == kEscape) {
              ASSERT_EQ(float_bits(out[i]), float_bits(x[i])) << "t " << t << " c " << c;
            } else {
              ASSERT_EQ(float_bits(out[i]), float_bits(dequantize(codes[i], g.min, g.step))) << "t " << t << " c " << c;
              ASSERT_LE(std::fabs(out[i] - x[i]), g.eb_abs) << "t " << t << " c " << c;
            }
          }
        uint64_t total_bits = 0;
        for (int lane = 0; lane < kLanes; ++lane)
          for (int i = 0; i < pairs_per_lane(cs.T, cs.D); ++i) {
            int t0, c0, t1, c1;
            pair_position(cs.kind, cs.D, lane, i, t0, c0, t1, c1);
            const int a = codes[size_t(t0) * cs.D + c0], b = codes[size_t(t1) * cs.D + c1];
            total_bits += pair_bits(cb.tables().enc, k, a, b);
            const int sym = pair_symbol(a, b, k);
            if (sym != kPairEscape && cb.length(sym)) ++(cb.length(sym) + 2 * k <= kMaxCodeLen ? fast : slow);
            else if (a == kEscape || b == kEscape) ++raw;
            else if ((a >> k) >= kPairBase || (b >> k) >= kPairBase) ++large;
            else ++small_uncoded;
          }
        // The block is exactly as long as pair_bits says.
        EXPECT_EQ(bytes.size(), block_bytes(cs.kind, cs.T, cs.D, total_bits));
      }
    SCOPED_TRACE("k " + std::to_string(k));
    EXPECT_GT(fast, 0u);
    if (k >= 2) {
      EXPECT_GT(slow, 0u);  // codewords of 8 bits and more; k = 0: every codeword fits (L <= 11)
    }
    if (k == 0) {
      EXPECT_EQ(slow, 0u);
    }
    EXPECT_GT(small_uncoded, 0u);
    EXPECT_GT(large, 0u);
    EXPECT_GT(raw, 0u);
  }
}

TEST(ReferenceCodec, LongCodewordsAndHighCodesRoundTripUnderEveryK) {
  // Hand-made codes: Absolute bound 0.5 gives step 1, and every group holds a
  // 0, so an integer value is its own code. Codes are drawn from the whole
  // range of each kind of pair, with a codebook whose codewords are mostly
  // long (lengths 7..11): under k >= 1 many pairs take the slow path.
  const uint64_t seed = kvcomp_test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const ErrorBound eb{BoundMode::Absolute, 0.5f};
  for (int k = 0; k <= kMaxLowBits; ++k)
    for (Case cs : {Case{Kind::Key, 64, 128}, Case{Kind::Value, 32, 64}, Case{Kind::Value, 128, 256}}) {
      SCOPED_TRACE(std::string(cs.kind == Kind::Key ? "K " : "V ") + std::to_string(cs.T) + " x " +
                   std::to_string(cs.D) + " k " + std::to_string(k));
      // Skewed so that lengths spread: symbol s gets weight ~ 1 / (1 + s).
      uint64_t counts[kNumSymbols] = {};
      for (int s = 0; s <= kPairEscape; ++s) counts[s] = 1 + 100000 / (1 + s);
      // Some without a codeword: taken from the stored lengths (the builder gives one to every pair in the
      // range of hi parts it saw).
      const Codebook full = Codebook::from_histogram(counts, k);
      check_code_properties(full);
      auto lens = full.lengths();
      for (int j = 0; j < 20; ++j) lens[rng() % kPairEscape] = 0;
      const Codebook cb = Codebook::from_lengths(lens.data(), k);  // an incomplete code: accepted
      const int pair_max = (kPairBase << k) - 1;  // largest code whose hi part pairs up
      std::vector<float> x(size_t(cs.T) * cs.D);
      for (auto& v : x) {
        const uint64_t r = rng() % 100;
        if (r < 80) v = float(rng() % (pair_max + 1));
        else if (r < 92) v = float(pair_max + 1 + rng() % (kMaxCode - pair_max));  // hi part >= 15
        else if (r < 96) v = float(rng() % (kMaxCode + 1));
        else v = r < 98 ? std::numeric_limits<float>::quiet_NaN() : -std::numeric_limits<float>::infinity();
      }
      for (int t = 0; t < cs.T; ++t)  // a 0 in every group (row and column 0)
        for (int c = 0; c < cs.D; ++c)
          if (t == 0 || c == 0) x[size_t(t) * cs.D + c] = 0.f;
      const auto bytes = ref::encode_block(cs.kind, x.data(), cs.T, cs.D, eb, cb, 1);
      std::vector<float> out(x.size(), -7.f);
      ASSERT_EQ(ref::decode_block(bytes.data(), bytes.size(), cs.kind, cs.T, cs.D, cb, out.data()),
                ref::DecodeStatus::Ok);
      uint64_t slow = 0, fast = 0, esc = 0;
      uint64_t total_bits = 0;
      for (int lane = 0; lane < kLanes; ++lane)
        for (int i = 0; i < pairs_per_lane(cs.T, cs.D); ++i) {
          int t[2], c[2];
          pair_position(cs.kind, cs.D, lane, i, t[0], c[0], t[1], c[1]);
          int code[2];
          for (int v = 0; v < 2; ++v) {
            const float xv = x[size_t(t[v]) * cs.D + c[v]], ov = out[size_t(t[v]) * cs.D + c[v]];
            if (std::isfinite(xv)) {
              code[v] = int(xv);
              ASSERT_EQ(ov, xv) << "t " << t[v] << " c " << c[v];
            } else {
              code[v] = kEscape;
              ASSERT_EQ(float_bits(ov), float_bits(xv));
            }
          }
          const int s = pair_symbol(code[0], code[1], k);
          total_bits += pair_bits(cb.tables().enc, k, code[0], code[1]);
          if (s == kPairEscape || !cb.length(s)) ++esc;
          else ++(cb.length(s) + 2 * k > kMaxCodeLen ? slow : fast);
        }
      EXPECT_EQ(bytes.size(), block_bytes(cs.kind, cs.T, cs.D, total_bits));
      EXPECT_GT(fast, 0u);
      EXPECT_GT(esc, 0u);
      if (k >= 2) {
        EXPECT_GT(slow, 0u);
      }
    }
}

namespace {

// The hand-made codebook of the golden-bit tests: symbol 0 = '0', pair (1, 1)
// = '10', PAIR_ESC = '11' (canonical, MSB first).
std::array<uint8_t, kNumSymbols> golden_lengths() {
  std::array<uint8_t, kNumSymbols> lengths{};
  lengths[0] = 1;
  lengths[1 * kPairBase + 1] = 2;
  lengths[kPairEscape] = 2;
  return lengths;
}

// A T x D block of 0.25 whose lane 0 starts with the pairs (NaN, 3.0) and (a, b).
std::vector<float> golden_input(Kind kind, int T, int D, uint32_t nan_bits, float a, float b) {
  std::vector<float> x(size_t(T) * D, 0.25f);
  int t0, c0, t1, c1;
  pair_position(kind, D, 0, 0, t0, c0, t1, c1);
  x[size_t(t0) * D + c0] = bits_float(nan_bits);
  x[size_t(t1) * D + c1] = 3.0f;
  pair_position(kind, D, 0, 1, t0, c0, t1, c1);
  x[size_t(t0) * D + c0] = a;
  x[size_t(t1) * D + c1] = b;
  return x;
}

// The payload's first two words are `want` (LSB first), every later word of the `total` bits is 0.
void expect_payload(const std::vector<uint8_t>& bytes, Kind kind, int T, int D, uint64_t total, uint64_t want) {
  const size_t at = payload_offset(kind, T, D);
  const size_t words = (total + 31) / 32;
  for (size_t w = 0; w < words; ++w) {
    uint32_t got;
    std::memcpy(&got, &bytes[at + 4 * w], 4);
    ASSERT_EQ(got, w < 2 ? uint32_t(want >> (32 * w)) : 0u) << "word " << w;
  }
}

}  // namespace

TEST(ReferenceCodec, GoldenBitsOfALaneStream) {
  // A hand-made codebook: symbol 0 = '0', pair (1, 1) = '10', PAIR_ESC = '11'
  // (canonical, MSB first). Lane 0's first pair is (NaN, 3.0): PAIR_ESC, field
  // 255, the NaN's raw bits, field 3; its second pair is (1.25, 1.25) = (1, 1);
  // every other value is 0.25 = code 0 (Absolute bound 0.5: min 0.25, step 1).
  const auto lengths = golden_lengths();
  const Codebook cb = Codebook::from_lengths(lengths.data());
  const int T = 32, D = 64;
  const uint32_t nan_bits = 0x7FC01234u;
  const ErrorBound eb{BoundMode::Absolute, 0.5f};
  for (Kind kind : {Kind::Key, Kind::Value}) {
    SCOPED_TRACE(kind == Kind::Key ? "K" : "V");
    const std::vector<float> x = golden_input(kind, T, D, nan_bits, 1.25f, 1.25f);
    int t0, c0, t1, c1;
    const auto bytes = ref::encode_block(kind, x.data(), T, D, eb, cb, 9);

    const int pairs = pairs_per_lane(T, D);
    const uint64_t lane0 = 2 + 8 + 32 + 8 + 2 + uint64_t(pairs - 2);
    const uint64_t total = lane0 + uint64_t(kLanes - 1) * pairs;
    ASSERT_EQ(bytes.size(), block_bytes(kind, T, D, total));
    BlockHeader h;
    std::memcpy(&h, bytes.data(), sizeof(h));
    EXPECT_EQ(h.magic, kMagic);
    EXPECT_EQ(h.version, 4);
    EXPECT_EQ(h.kind, uint8_t(kind));
    EXPECT_EQ(h.codebook_id, 9);
    for (int g = 0; g < num_groups(kind, T, D); ++g) {
      GroupParams p;
      std::memcpy(&p, &bytes[params_offset() + 4 * g], 4);
      ASSERT_EQ(p.min_bits, 0x3400) << g;   // 0.25
      ASSERT_EQ(p.step_bits, 0x3C00) << g;  // 1.0
    }
    uint16_t lane_bits[kLanes];
    std::memcpy(lane_bits, &bytes[lane_bits_offset(kind, T, D)], sizeof(lane_bits));
    EXPECT_EQ(lane_bits[0], lane0);
    for (int l = 1; l < kLanes; ++l) EXPECT_EQ(lane_bits[l], pairs) << l;
    // LSB first: '11', 0xFF, the raw word, 0x03, then '10' as bits 1, 0, then zeros.
    const uint64_t want = 0x3u | uint64_t(0xFF) << 2 | uint64_t(nan_bits) << 10 | uint64_t(3) << 42 | uint64_t(1) << 50;
    expect_payload(bytes, kind, T, D, total, want);
    if (HasFatalFailure()) return;
    for (size_t b = payload_offset(kind, T, D) + 4 * ((total + 31) / 32); b < bytes.size(); ++b) ASSERT_EQ(bytes[b], 0) << "padding byte " << b;

    std::vector<float> out(x.size());
    uint16_t id = 0;
    ASSERT_EQ(ref::decode_block(bytes.data(), bytes.size(), kind, T, D, cb, out.data(), &id), ref::DecodeStatus::Ok);
    EXPECT_EQ(id, 9);
    pair_position(kind, D, 0, 0, t0, c0, t1, c1);
    EXPECT_EQ(float_bits(out[size_t(t0) * D + c0]), nan_bits);
    EXPECT_EQ(out[size_t(t1) * D + c1], 3.25f);
    for (size_t i = 0; i < x.size(); ++i)
      if (x[i] == x[i]) {
        ASSERT_LE(std::fabs(out[i] - x[i]), 0.5f) << i;
      }
  }
}

TEST(ReferenceCodec, GoldenBitsOfALaneStreamWithLowBits) {
  // The codebook of GoldenBitsOfALaneStream under k = 1: symbol 0 = hi parts
  // (0, 0) = '0', symbol 16 = (1, 1) = '10', PAIR_ESC = '11'. Lane 0's first
  // pair is (NaN, 3.0): PAIR_ESC, field 255, the NaN's raw bits, field 3 (no
  // low bits); its second pair is codes (3, 2) = hi (1, 1), lo (1, 0): '10',
  // then a's low bit 1, then b's 0. Every other value is 0.25 = code 0: '0'
  // and two low bits 0.
  const auto lengths = golden_lengths();
  const Codebook cb = Codebook::from_lengths(lengths.data(), 1);
  const int T = 32, D = 64;
  const uint32_t nan_bits = 0x7FC01234u;
  const ErrorBound eb{BoundMode::Absolute, 0.5f};
  for (Kind kind : {Kind::Key, Kind::Value}) {
    SCOPED_TRACE(kind == Kind::Key ? "K" : "V");
    const std::vector<float> x = golden_input(kind, T, D, nan_bits, 3.25f, 2.25f);
    int t0, c0, t1, c1;
    const auto bytes = ref::encode_block(kind, x.data(), T, D, eb, cb, 9);

    const int pairs = pairs_per_lane(T, D);
    const uint64_t lane0 = 2 + 8 + 32 + 8 + (2 + 2) + 3 * uint64_t(pairs - 2);
    const uint64_t total = lane0 + uint64_t(kLanes - 1) * 3 * pairs;
    ASSERT_EQ(bytes.size(), block_bytes(kind, T, D, total));
    uint16_t lane_bits[kLanes];
    std::memcpy(lane_bits, &bytes[lane_bits_offset(kind, T, D)], sizeof(lane_bits));
    EXPECT_EQ(lane_bits[0], lane0);
    for (int l = 1; l < kLanes; ++l) EXPECT_EQ(lane_bits[l], 3 * pairs) << l;
    // LSB first: '11', 0xFF, the raw word, 0x03, '10' as bits 1, 0, low bits 1, 0, then zeros.
    const uint64_t want = 0x3u | uint64_t(0xFF) << 2 | uint64_t(nan_bits) << 10 | uint64_t(3) << 42 |
                          uint64_t(1) << 50 | uint64_t(1) << 52;
    expect_payload(bytes, kind, T, D, total, want);
    if (HasFatalFailure()) return;
    std::vector<float> out(x.size());
    ASSERT_EQ(ref::decode_block(bytes.data(), bytes.size(), kind, T, D, cb, out.data()), ref::DecodeStatus::Ok);
    pair_position(kind, D, 0, 0, t0, c0, t1, c1);
    EXPECT_EQ(float_bits(out[size_t(t0) * D + c0]), nan_bits);
    EXPECT_EQ(out[size_t(t1) * D + c1], 3.25f);
    pair_position(kind, D, 0, 1, t0, c0, t1, c1);
    EXPECT_EQ(out[size_t(t0) * D + c0], 3.25f);
    EXPECT_EQ(out[size_t(t1) * D + c1], 2.25f);
    for (size_t i = 0; i < x.size(); ++i)
      if (x[i] == x[i]) {
        ASSERT_LE(std::fabs(out[i] - x[i]), 0.5f) << i;
      }
    // The same bits under k = 0 mean other pairs: the codebook's k is part of the format.
    const Codebook k0 = Codebook::from_lengths(lengths.data(), 0);
    EXPECT_NE(ref::decode_block(bytes.data(), bytes.size(), kind, T, D, k0, out.data()), ref::DecodeStatus::Ok);
  }
}

TEST(ReferenceCodec, NonFiniteValuesAreStoredExactly) {
  const uint64_t seed = kvcomp_test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  auto x = kvcomp_test::make_data(kvcomp_test::Dist::Gaussian, 64, 128, seed);
  const float specials[] = {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                            -std::numeric_limits<float>::infinity(), 65504.f, -65504.f, 1e-7f, 6e-8f};
  std::mt19937_64 rng(seed);
  for (int i = 0; i < 40; ++i) x[rng() % x.size()] = specials[i % 7];
  for (Kind kind : {Kind::Key, Kind::Value}) {
    const ErrorBound eb{BoundMode::Relative, 0.05f};
    const Codebook cb = codebook_for(kind, x, 64, 128, eb);
    const auto bytes = ref::encode_block(kind, x.data(), 64, 128, eb, cb, 0);
    std::vector<float> out(x.size());
    ASSERT_EQ(ref::decode_block(bytes.data(), bytes.size(), kind, 64, 128, cb, out.data()), ref::DecodeStatus::Ok);
    const auto params = ref::block_params(kind, x.data(), 64, 128, eb);
    for (size_t i = 0; i < x.size(); ++i) {
      if (!std::isfinite(x[i])) {
        ASSERT_EQ(float_bits(out[i]), float_bits(x[i]));
      } else {
        const int t = int(i / 128), c = int(i % 128);
        ASSERT_LE(std::fabs(out[i] - x[i]), params[group_of(kind, 64, 128, t, c)].eb_abs);
        ASSERT_TRUE(std::isfinite(params[group_of(kind, 64, 128, t, c)].eb_abs));
      }
    }
  }
}

TEST(ReferenceCodec, TruncatedAndBitFlippedBlocksAreRejected) {
  const uint64_t seed = kvcomp_test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  const int T = 32, D = 64;
  const ErrorBound eb{BoundMode::Relative, 0.05f};
  auto x = kvcomp_test::make_data(kvcomp_test::Dist::HeavyTailed, T, D, seed);
  for (Kind kind : {Kind::Key, Kind::Value}) {
    const Codebook cb = codebook_for(kind, x, T, D, eb);
    const auto bytes = ref::encode_block(kind, x.data(), T, D, eb, cb, 0);
    std::vector<float> out(size_t(T) * D);
    // Every truncation (the decoder gets an exactly-sized copy, so ASan sees any overread).
    for (size_t n = 0; n < bytes.size(); ++n) {
      std::vector<uint8_t> cut(bytes.begin(), bytes.begin() + n);
      ASSERT_NE(ref::decode_block(cut.data(), cut.size(), kind, T, D, cb, out.data()), ref::DecodeStatus::Ok)
          << "truncated to " << n;
    }
    // Every single-bit flip.
    for (size_t bit = 0; bit < bytes.size() * 8; ++bit) {
      auto bad = bytes;
      bad[bit / 8] ^= uint8_t(1u << (bit % 8));
      ASSERT_NE(ref::decode_block(bad.data(), bad.size(), kind, T, D, cb, out.data()), ref::DecodeStatus::Ok)
          << "bit " << bit;
    }
    // Corrupt payloads that pass the checksum (it is recomputed): the decoder
    // still stays inside the block (ASan build) and never crashes.
    std::mt19937_64 rng(seed);
    for (int iter = 0; iter < 300; ++iter) {
      auto bad = bytes;
      const size_t lo = sizeof(BlockHeader);
      for (int k = 0; k < 1 + int(rng() % 8); ++k) bad[lo + rng() % (bad.size() - lo)] ^= uint8_t(1 + rng() % 255);
      uint64_t sum = 0;  // codebook id 0
      for (size_t off = lo; off < bad.size(); off += 4) { uint32_t w; std::memcpy(&w, &bad[off], 4); checksum_add(sum, w); }
      const uint16_t ck = checksum_fold(sum);
      std::memcpy(&bad[6], &ck, 2);
      (void)ref::decode_block(bad.data(), bad.size(), kind, T, D, cb, out.data());
    }
  }
}

TEST(ReferenceCodec, CorruptHeadersAndLaneTablesGiveTheirStatus) {
  // Corruptions with a repaired checksum, so the later checks are reached.
  const uint64_t seed = kvcomp_test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  const int T = 64, D = 128;
  // Codes up to ~125: k = 3 low bits, and PAIR_ESC fields for hi parts >= 15.
  const ErrorBound eb{BoundMode::Relative, 0.004f};
  auto x = kvcomp_test::make_data(kvcomp_test::Dist::Gaussian, T, D, seed);
  x[7] = std::numeric_limits<float>::quiet_NaN();
  auto reseal = [](std::vector<uint8_t>& b) {
    BlockHeader h;
    std::memcpy(&h, b.data(), sizeof(h));
    uint64_t sum = h.codebook_id;
    for (size_t off = sizeof(h); off < b.size(); off += 4) { uint32_t w; std::memcpy(&w, &b[off], 4); checksum_add(sum, w); }
    h.checksum = checksum_fold(sum);
    std::memcpy(b.data(), &h, sizeof(h));
  };
  for (Kind kind : {Kind::Key, Kind::Value}) {
    const Codebook cb = codebook_for(kind, x, T, D, eb);
    EXPECT_EQ(cb.low_bits(), 3);
    const auto bytes = ref::encode_block(kind, x.data(), T, D, eb, cb, 5);
    std::vector<float> out(x.size());
    auto status = [&](std::vector<uint8_t> b) {
      return ref::decode_block(b.data(), b.size(), kind, T, D, cb, out.data());
    };
    ASSERT_EQ(status(bytes), ref::DecodeStatus::Ok);
    const size_t lanes_at = lane_bits_offset(kind, T, D);
    auto with_lanes = [&](int l0_delta, int l1_delta) {
      auto b = bytes;
      uint16_t lb[2];
      std::memcpy(lb, &b[lanes_at], 4);
      lb[0] = uint16_t(lb[0] + l0_delta);
      lb[1] = uint16_t(lb[1] + l1_delta);
      std::memcpy(&b[lanes_at], lb, 4);
      reseal(b);
      return b;
    };
    // A v3 block (V per token at any shape) or any other version is not read as v4.
    for (uint8_t version : {2, 3, 5}) {
      auto old = bytes;
      old[3] = version;
      reseal(old);
      EXPECT_EQ(status(old), ref::DecodeStatus::BadHeader) << int(version);
    }
    auto other_kind = bytes;
    other_kind[2] ^= 1;
    reseal(other_kind);
    EXPECT_EQ(status(other_kind), ref::DecodeStatus::BadHeader);
    EXPECT_EQ(status(std::vector<uint8_t>(bytes.begin(), bytes.begin() + 16)), ref::DecodeStatus::TooSmall);
    // One bit moved from lane 1 to lane 0: lane 0's pairs end a bit early.
    EXPECT_EQ(status(with_lanes(+1, -1)), ref::DecodeStatus::LengthMismatch);
    // One bit moved from lane 0 to lane 1: lane 0's last codeword runs past its end.
    EXPECT_EQ(status(with_lanes(-1, +1)), ref::DecodeStatus::BadCode);
    // More bits than the block holds.
    EXPECT_EQ(status(with_lanes(+128, 0)), ref::DecodeStatus::LaneOverflow);
    // Bits that match no codeword: with only PAIR_ESC (= '0'), a stream starting with 1.
    uint64_t none[kNumSymbols] = {};
    const Codebook esc_only = Codebook::from_histogram(none);
    auto b = ref::encode_block(kind, x.data(), T, D, eb, esc_only, 5);
    ASSERT_EQ(ref::decode_block(b.data(), b.size(), kind, T, D, esc_only, out.data()), ref::DecodeStatus::Ok);
    b[payload_offset(kind, T, D)] ^= 1;
    reseal(b);
    EXPECT_EQ(ref::decode_block(b.data(), b.size(), kind, T, D, esc_only, out.data()), ref::DecodeStatus::BadCode);
  }
}

TEST(ReferenceCodec, RatioIsCloseToTheHistogramEntropy) {
  // Per stream symbol (pair), under the k the codebook picked: the entropy of
  // the histogram under k, the Huffman codewords alone, and mean_bits
  // (codewords + 2k low bits of coded pairs + PAIR_ESC's 8-bit fields).
  const uint64_t seed = kvcomp_test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  const int T = 64, D = 128, blocks = 16;
  std::printf("%-17s %-4s %5s %2s | %7s %8s %8s %8s | %9s %9s %9s\n", "data", "kind", "eb", "k", "P(esc)",
              "entropy", "huffman", "code", "code b/v", "total b/v", "x vs fp16");
  for (auto dist : {kvcomp_test::Dist::Gaussian, kvcomp_test::Dist::OutlierChannels})
    for (Kind kind : {Kind::Key, Kind::Value})
      for (float e : {0.005f, 0.01f, 0.02f, 0.05f, 0.1f}) {
        const ErrorBound eb{BoundMode::Relative, e};
        std::vector<std::vector<float>> data;
        Histograms all_counts = no_histograms();
        for (int b = 0; b < blocks; ++b) {
          // OutlierChannels: the same outlier channels in every block of a head.
          auto all = kvcomp_test::make_data(dist, T * blocks, D, seed);
          data.emplace_back(all.begin() + size_t(b) * T * D, all.begin() + size_t(b + 1) * T * D);
          kvcomp_test::round_to_half(data.back());
          ref::add_histogram(kind, data.back().data(), T, D, eb, all_counts.data());
        }
        const Codebook cb = Codebook::from_histograms(all_counts.data());
        const int k = cb.low_bits();
        const uint64_t* counts = &all_counts[size_t(k) * kNumSymbols];
        size_t total_bytes = 0;
        for (auto& x : data) total_bytes += ref::encode_block(kind, x.data(), T, D, eb, cb, 0).size();
        const double pairs = double(blocks) * T * D / 2;
        double huffman = 0;
        for (int s = 0; s < kNumSymbols; ++s) huffman += double(counts[s]) * cb.length(s);
        huffman /= pairs;
        const double p_esc = double(counts[kPairEscape]) / pairs;
        const double h = entropy_bits(counts), code = cb.mean_bits(counts);
        const double total = 8.0 * double(total_bytes) / (2 * pairs);
        std::printf("%-17s %-4s %5.3f %2d | %7.3f %8.3f %8.3f %8.3f | %9.3f %9.3f %9.2f\n",
                    kvcomp_test::dist_name(dist), kind == Kind::Key ? "K" : "V", e, k, p_esc, h, huffman, code,
                    code / 2, total, 16.0 / total);
        // Every symbol of the histogram has a codeword (the codebook is its own).
        for (int s = 0; s < kNumSymbols; ++s) ASSERT_TRUE(counts[s] == 0 || cb.length(s) > 0) << s;
        EXPECT_NEAR(code, huffman + 2.0 * kFieldBits * p_esc + 2.0 * k * (1 - p_esc), 1e-9);
        // Huffman is at least the entropy; on these alphabets within 0.15 bit
        // of it unless one symbol (PAIR_ESC at small bounds) dominates: then
        // within Gallager's bound 2 - p - H2(p) for its probability p >= 1/2.
        double p_max = 0;
        for (int s = 0; s < kNumSymbols; ++s) p_max = std::max(p_max, double(counts[s]) / pairs);
        const double gallager =
            p_max >= 1.0 ? 1.0 : 2 - p_max + p_max * std::log2(p_max) + (1 - p_max) * std::log2(1 - p_max);
        EXPECT_GE(huffman, h - 1e-9);
        EXPECT_LT(huffman - h, p_max < 0.5 ? 0.15 : gallager) << "Huffman gap too large, p_max " << p_max;
        // The k picked needs no more bits than any other k (each with its own codebook).
        for (int j = 0; j < kLowBitChoices; ++j) {
          const uint64_t* row = &all_counts[size_t(j) * kNumSymbols];
          EXPECT_LE(code, Codebook::from_histogram(row, j).mean_bits(row) + 1e-9) << "k " << j;
        }
        // Small bounds give many codes: low bits pay off, PAIR_ESC stays rare.
        if (e <= 0.02f) {
          EXPECT_GE(k, 1);
          EXPECT_LT(p_esc, 0.1);
        }
        // The blocks hold at least the coded stream (raw words, params, lane tables and padding come on top).
        EXPECT_GE(8.0 * double(total_bytes), code * pairs);
      }
}

TEST(ReferenceCodec, FromHistogramsPicksLowBitsForSmallBounds) {
  // Gaussian data, relative bounds: at eb 0.01 codes run to ~50, so k = 2
  // (hi parts up to ~12) needs the fewest bits; at eb 0.1 codes stay below
  // 15 and low bits would only add raw bits: k = 0. The payload of the blocks
  // (the exact sum of the lane streams) is smallest with the k picked.
  const uint64_t seed = kvcomp_test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  const int T = 64, D = 128, blocks = 8;
  for (auto [e, want_k] : {std::pair<float, int>{0.01f, 2}, std::pair<float, int>{0.1f, 0}})
    for (Kind kind : {Kind::Key, Kind::Value}) {
      SCOPED_TRACE(std::string(kind == Kind::Key ? "K" : "V") + " eb " + std::to_string(e));
      const ErrorBound eb{BoundMode::Relative, e};
      auto all = kvcomp_test::make_data(kvcomp_test::Dist::Gaussian, T * blocks, D, seed);
      kvcomp_test::round_to_half(all);
      Histograms counts = no_histograms();
      for (int b = 0; b < blocks; ++b) ref::add_histogram(kind, &all[size_t(b) * T * D], T, D, eb, counts.data());
      const Codebook cb = Codebook::from_histograms(counts.data());
      EXPECT_EQ(cb.low_bits(), want_k);
      auto payload_bits = [&](const Codebook& book) {
        uint64_t bits = 0;
        for (int b = 0; b < blocks; ++b) {
          const auto blk = ref::encode_block(kind, &all[size_t(b) * T * D], T, D, eb, book, 0);
          uint16_t lane_bits[kLanes];
          std::memcpy(lane_bits, &blk[lane_bits_offset(kind, T, D)], sizeof(lane_bits));
          for (uint16_t l : lane_bits) bits += l;
        }
        return bits;
      };
      const uint64_t picked = payload_bits(cb);
      for (int k = 0; k < kLowBitChoices; ++k) {
        const Codebook other = Codebook::from_histogram(&counts[size_t(k) * kNumSymbols], k);
        const uint64_t bits = payload_bits(other);
        std::printf("%s eb %.2f: k %d -> %.3f bits per value%s\n", kind == Kind::Key ? "K" : "V", e, k,
                    double(bits) / (double(blocks) * T * D), k == cb.low_bits() ? " (picked)" : "");
        EXPECT_LE(picked, bits) << "k " << k;
      }
    }
}
