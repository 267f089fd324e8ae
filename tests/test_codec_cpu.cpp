// CPU tests of the codebook and the reference codec.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>

#include "kvcomp/codebook.hpp"
#include "kvcomp/error.hpp"
#include "kvcomp/reference.hpp"
#include "test_data.hpp"

using namespace kvcomp;
using namespace kvcomp::format;

namespace {

void check_code_properties(const Codebook& cb) {
  const auto& len = cb.lengths();
  uint64_t kraft = 0;
  int present = 0;
  for (int s = 0; s < kNumSymbols; ++s) {
    ASSERT_LE(len[s], kMaxCodeLen);
    if (len[s]) { kraft += uint64_t(1) << (kMaxCodeLen - len[s]); ++present; }
  }
  ASSERT_GT(len[kEscape], 0) << "escape must always be codable";
  ASSERT_LE(kraft, uint64_t(1) << kMaxCodeLen);
  if (present >= 2) {
    ASSERT_EQ(kraft, uint64_t(1) << kMaxCodeLen) << "Huffman codes are complete";
  }
  // Prefix-free and canonical: un-reverse the codes; within a length, codes rise with the symbol;
  // a shorter code is never a prefix of a longer one.
  const auto& enc = cb.tables().enc;
  std::vector<std::pair<int, uint32_t>> codes;  // (len, msb-first code)
  for (int s = 0; s < kNumSymbols; ++s)
    if (len[s]) codes.push_back({len[s], reverse_bits(enc[s] & 0xFFFF, len[s])});
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
  // The decode table maps every codeword back.
  for (int s = 0; s < kNumSymbols; ++s) {
    if (!len[s]) continue;
    const uint32_t e = cb.tables().lut[enc[s] & 0xFFFF];
    ASSERT_EQ(lut_symbol(e), s);
    ASSERT_EQ(lut_length(e), len[s]);
  }
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
  // Flat over all 255 codes: 8-bit-ish codes.
  for (int s = 0; s < kNumSymbols; ++s) counts[s] = 1000;
  check_code_properties(Codebook::from_histogram(counts));
  // Single symbol: it and ESC get codewords.
  std::fill(std::begin(counts), std::end(counts), 0);
  counts[7] = 12345;
  Codebook one = Codebook::from_histogram(counts);
  check_code_properties(one);
  EXPECT_EQ(one.length(7), 1);
  EXPECT_EQ(one.length(kEscape), 1);
  // Empty: only ESC.
  std::fill(std::begin(counts), std::end(counts), 0);
  Codebook empty = Codebook::from_histogram(counts);
  check_code_properties(empty);
  EXPECT_EQ(empty.length(kEscape), 1);
}

TEST(Codebook, RandomHistogramsAndLengthsRoundTrip) {
  const uint64_t seed = kvcomp_test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  for (int iter = 0; iter < 50; ++iter) {
    uint64_t counts[kNumSymbols] = {};
    const int present = 1 + int(rng() % kNumSymbols);
    for (int i = 0; i < present; ++i) counts[rng() % kNumSymbols] = 1 + (rng() % 1000000) * (rng() % 3 == 0 ? 1000 : 1);
    const Codebook cb = Codebook::from_histogram(counts);
    check_code_properties(cb);
    const Codebook again = Codebook::from_lengths(cb.lengths().data());
    ASSERT_EQ(0, std::memcmp(&cb.tables(), &again.tables(), sizeof(CodebookTables)));
  }
}

TEST(Codebook, BadLengthsAreRejected) {
  uint8_t lengths[kNumSymbols] = {};
  EXPECT_THROW(Codebook::from_lengths(lengths), Error);  // no ESC
  lengths[kEscape] = 13;
  EXPECT_THROW(Codebook::from_lengths(lengths), Error);  // too long
  lengths[kEscape] = 1; lengths[0] = 1; lengths[1] = 1;
  EXPECT_THROW(Codebook::from_lengths(lengths), Error);  // Kraft > 1
}

namespace {

struct Case { Kind kind; int T; int D; };

Codebook codebook_for(Kind kind, const std::vector<float>& x, int T, int D, ErrorBound eb) {
  uint64_t counts[kNumSymbols] = {};
  ref::add_histogram(kind, x.data(), T, D, eb, counts);
  return Codebook::from_histogram(counts);
}

}  // namespace

TEST(ReferenceCodec, RoundTripWithinBoundOnEveryElement) {
  const uint64_t seed = kvcomp_test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  for (auto dist : kvcomp_test::kAllDists)
    for (Case cs : {Case{Kind::Key, 64, 128}, Case{Kind::Value, 64, 128}, Case{Kind::Key, 32, 64},
                    Case{Kind::Value, 128, 256}, Case{Kind::Key, 128, 64}})
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
            const float bound = params[cs.kind == Kind::Key ? c : t].eb_abs;
            const size_t i = size_t(t) * cs.D + c;
            ASSERT_LE(std::fabs(out[i] - x[i]), bound)
                << kvcomp_test::dist_name(dist) << " t " << t << " c " << c;
          }
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
        ASSERT_LE(std::fabs(out[i] - x[i]), params[kind == Kind::Key ? c : t].eb_abs);
        ASSERT_TRUE(std::isfinite(params[kind == Kind::Key ? c : t].eb_abs));
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

TEST(ReferenceCodec, RatioIsCloseToTheHistogramEntropy) {
  const uint64_t seed = kvcomp_test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  const int T = 64, D = 128, blocks = 16;
  std::printf("%-17s %-5s %5s | %9s %9s %9s %9s\n", "data", "kind", "eb", "entropy", "code b/v", "total b/v",
              "x vs fp16");
  for (auto dist : {kvcomp_test::Dist::Gaussian, kvcomp_test::Dist::OutlierChannels})
    for (Kind kind : {Kind::Key, Kind::Value})
      for (float e : {0.01f, 0.05f, 0.1f}) {
        const ErrorBound eb{BoundMode::Relative, e};
        std::vector<std::vector<float>> data;
        uint64_t counts[kNumSymbols] = {};
        for (int b = 0; b < blocks; ++b) {
          // OutlierChannels: the same outlier channels in every block of a head.
          auto all = kvcomp_test::make_data(dist, T * blocks, D, seed);
          data.emplace_back(all.begin() + size_t(b) * T * D, all.begin() + size_t(b + 1) * T * D);
          kvcomp_test::round_to_half(data.back());
          ref::add_histogram(kind, data.back().data(), T, D, eb, counts);
        }
        const Codebook cb = Codebook::from_histogram(counts);
        size_t total_bytes = 0;
        for (auto& x : data) total_bytes += ref::encode_block(kind, x.data(), T, D, eb, cb, 0).size();
        const double n = double(blocks) * T * D;
        const double h = entropy_bits(counts), code = cb.mean_bits(counts);
        const double total = 8.0 * double(total_bytes) / n;
        std::printf("%-17s %-5s %5.2f | %9.3f %9.3f %9.3f %9.2f\n", kvcomp_test::dist_name(dist),
                    kind == Kind::Key ? "K" : "V", e, h, code, total, 16.0 / total);
        // Huffman is within 1 bit of entropy; on these alphabets far closer.
        EXPECT_LT(code - h, 0.15) << "Huffman gap too large";
        EXPECT_GE(code, h - 1e-9);
      }
}
