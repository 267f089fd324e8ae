// CPU tests of the codebook and the reference codec.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <string>
#include <utility>
#include <vector>

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
  // The decode table maps every codeword back, with the pair's two codes.
  for (int s = 0; s < kNumSymbols; ++s) {
    if (!len[s]) continue;
    const uint32_t e = cb.tables().lut[enc[s] & 0xFFFF];
    ASSERT_EQ(lut_symbol(e), s);
    ASSERT_EQ(lut_length(e), len[s]);
    ASSERT_EQ(lut_is_escape(e), s == kPairEscape);
    if (s != kPairEscape) {
      ASSERT_EQ(lut_first(e), s / kPairBase);
      ASSERT_EQ(lut_second(e), s % kPairBase);
    }
  }
  // Every table index holds the codeword its low bits start with (or none).
  size_t filled = 0;
  for (uint32_t i = 0; i < uint32_t(kLutSize); ++i) {
    const uint32_t e = cb.tables().lut[i];
    const int l = lut_length(e);
    if (l == 0) continue;
    ++filled;
    const int s = lut_symbol(e);
    ASSERT_EQ(l, int(len[s])) << "index " << i;
    ASSERT_EQ(i & ((1u << l) - 1), enc[s] & 0xFFFFu) << "index " << i;
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
  // Single symbol: it and PAIR_ESC get codewords.
  std::fill(std::begin(counts), std::end(counts), 0);
  counts[7] = 12345;
  Codebook one = Codebook::from_histogram(counts);
  check_code_properties(one);
  EXPECT_EQ(one.length(7), 1);
  EXPECT_EQ(one.length(kPairEscape), 1);
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
  counts[3] = 10;
  Codebook above = Codebook::from_histogram(counts);
  check_code_properties(above);
  EXPECT_EQ(above.length(3), 1);
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
    const Codebook cb = Codebook::from_histogram(counts);
    check_code_properties(cb);
    for (int s = 0; s < kPairEscape; ++s) ASSERT_EQ(cb.length(s) != 0, counts[s] != 0) << s;
    const Codebook again = Codebook::from_lengths(cb.lengths().data());
    ASSERT_EQ(0, std::memcmp(&cb.tables(), &again.tables(), sizeof(CodebookTables)));
  }
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
  train[16] = 4;  // (1, 1) -> length 2
  train[kPairEscape] = 4;  // -> length 2
  const Codebook cb = Codebook::from_histogram(train);
  ASSERT_EQ(cb.length(0), 1);
  ASSERT_EQ(cb.length(16), 2);
  ASSERT_EQ(cb.length(kPairEscape), 2);
  ASSERT_EQ(cb.length(17), 0);
  uint64_t counts[kNumSymbols] = {};
  counts[0] = 10;            // 1 bit each
  counts[16] = 20;           // 2 bits
  counts[kPairEscape] = 30;  // 2 + 16 bits (raw words not counted)
  counts[17] = 40;           // no codeword: written as PAIR_ESC, 2 + 16 bits
  const double want = (10.0 * 1 + 20.0 * 2 + 30.0 * 18 + 40.0 * 18) / 100.0;
  EXPECT_DOUBLE_EQ(cb.mean_bits(counts), want);
  uint64_t none[kNumSymbols] = {};
  EXPECT_EQ(cb.mean_bits(none), 0.0);
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

TEST(ReferenceCodec, HistogramCountsPairSymbols) {
  const uint64_t seed = kvcomp_test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  for (Case cs : {Case{Kind::Key, 64, 128}, Case{Kind::Value, 64, 128}, Case{Kind::Key, 32, 256},
                  Case{Kind::Value, 128, 64}})
    for (ErrorBound eb : {ErrorBound{BoundMode::Relative, 0.003f}, ErrorBound{BoundMode::Relative, 0.05f}}) {
      auto x = kvcomp_test::make_data(kvcomp_test::Dist::HeavyTailed, cs.T, cs.D, seed + cs.T);
      x[5] = std::numeric_limits<float>::infinity();
      uint64_t counts[kNumSymbols] = {};
      ref::add_histogram(cs.kind, x.data(), cs.T, cs.D, eb, counts);
      // Independently: the lane order pairs neighbours along the group-crossing
      // axis, K (t, 2j) with (t, 2j + 1), V (2j, c) with (2j + 1, c).
      const auto params = ref::block_params(cs.kind, x.data(), cs.T, cs.D, eb);
      auto code = [&](int t, int c) {
        return quantize(x[size_t(t) * cs.D + c], params[cs.kind == Kind::Key ? c : t]);
      };
      uint64_t want[kNumSymbols] = {};
      for (int t = 0; t < cs.T; ++t)
        for (int c = 0; c < cs.D; ++c) {
          if (cs.kind == Kind::Key && c % 2 == 0) ++want[pair_symbol(code(t, c), code(t, c + 1))];
          if (cs.kind == Kind::Value && t % 2 == 0) ++want[pair_symbol(code(t, c), code(t + 1, c))];
        }
      for (int s = 0; s < kNumSymbols; ++s) ASSERT_EQ(counts[s], want[s]) << "symbol " << s;
      EXPECT_GT(counts[kPairEscape], 0u);
      // It adds to what is there.
      ref::add_histogram(cs.kind, x.data(), cs.T, cs.D, eb, counts);
      for (int s = 0; s < kNumSymbols; ++s) ASSERT_EQ(counts[s], 2 * want[s]) << "symbol " << s;
    }
}

TEST(ReferenceCodec, EveryKindOfPairRoundTrips) {
  // Pairs with a codeword, pairs of small codes without one (written as
  // PAIR_ESC), pairs with a code >= 15 (8-bit fields) and pairs with an ESC
  // value (field 255 + raw fp32, NaN and Inf included): each must occur, and
  // every value decodes to exactly dequantize(code) within eb_abs, or to its
  // own bits when escaped.
  const uint64_t seed = kvcomp_test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const float specials[] = {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                            -std::numeric_limits<float>::infinity(), bits_float(0x7FC01234u), bits_float(0xFF800001u),
                            bits_float(0x7F800001u)};
  uint64_t coded = 0, small_uncoded = 0, large = 0, raw = 0;
  for (Case cs : {Case{Kind::Key, 64, 128}, Case{Kind::Value, 64, 128}, Case{Kind::Key, 32, 64},
                  Case{Kind::Value, 128, 256}, Case{Kind::Key, 128, 256}, Case{Kind::Value, 32, 64}})
    for (ErrorBound eb : {ErrorBound{BoundMode::Relative, 0.002f}, ErrorBound{BoundMode::Relative, 0.05f},
                          ErrorBound{BoundMode::Absolute, 1e-4f}}) {
      SCOPED_TRACE(std::string(cs.kind == Kind::Key ? "K " : "V ") + std::to_string(cs.T) + " x " +
                   std::to_string(cs.D) + " eb " + std::to_string(eb.value));
      auto x = kvcomp_test::make_data(kvcomp_test::Dist::OutlierChannels, cs.T, cs.D, rng());
      for (size_t k = 0; k < x.size() / 64; ++k) x[rng() % x.size()] = specials[k % 6];
      // The codebook: trained on other data, without the block's most frequent pair symbol.
      uint64_t mine[kNumSymbols] = {}, train[kNumSymbols] = {};
      ref::add_histogram(cs.kind, x.data(), cs.T, cs.D, eb, mine);
      const auto other = kvcomp_test::make_data(kvcomp_test::Dist::OutlierChannels, cs.T, cs.D, rng());
      ref::add_histogram(cs.kind, other.data(), cs.T, cs.D, eb, train);
      const int top = int(std::max_element(mine, mine + kPairEscape) - mine);
      train[top] = 0;
      const Codebook cb = Codebook::from_histogram(train);
      ASSERT_EQ(cb.length(top), 0);

      const auto bytes = ref::encode_block(cs.kind, x.data(), cs.T, cs.D, eb, cb, 3);
      std::vector<float> out(x.size(), 12345.f);
      ASSERT_EQ(ref::decode_block(bytes.data(), bytes.size(), cs.kind, cs.T, cs.D, cb, out.data()),
                ref::DecodeStatus::Ok);
      const auto params = ref::block_params(cs.kind, x.data(), cs.T, cs.D, eb);
      std::vector<int> codes(x.size());
      for (int t = 0; t < cs.T; ++t)
        for (int c = 0; c < cs.D; ++c) {
          const size_t i = size_t(t) * cs.D + c;
          const GroupQuant& g = params[cs.kind == Kind::Key ? c : t];
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
          total_bits += pair_bits(cb.tables().enc, a, b);
          const int sym = pair_symbol(a, b);
          if (sym != kPairEscape && cb.length(sym)) ++coded;
          else if (a == kEscape || b == kEscape) ++raw;
          else if (a >= kPairBase || b >= kPairBase) ++large;
          else ++small_uncoded;
        }
      // The block is exactly as long as pair_bits says.
      EXPECT_EQ(bytes.size(), block_bytes(cs.kind, cs.T, cs.D, total_bits));
    }
  EXPECT_GT(coded, 0u);
  EXPECT_GT(small_uncoded, 0u);
  EXPECT_GT(large, 0u);
  EXPECT_GT(raw, 0u);
}

TEST(ReferenceCodec, GoldenBitsOfALaneStream) {
  // A hand-made codebook: symbol 0 = '0', pair (1, 1) = '10', PAIR_ESC = '11'
  // (canonical, MSB first). Lane 0's first pair is (NaN, 3.0): PAIR_ESC, field
  // 255, the NaN's raw bits, field 3; its second pair is (1.25, 1.25) = (1, 1);
  // every other value is 0.25 = code 0 (Absolute bound 0.5: min 0.25, step 1).
  uint8_t lengths[kNumSymbols] = {};
  lengths[0] = 1;
  lengths[1 * kPairBase + 1] = 2;
  lengths[kPairEscape] = 2;
  const Codebook cb = Codebook::from_lengths(lengths);
  const int T = 32, D = 64;
  const uint32_t nan_bits = 0x7FC01234u;
  const ErrorBound eb{BoundMode::Absolute, 0.5f};
  for (Kind kind : {Kind::Key, Kind::Value}) {
    SCOPED_TRACE(kind == Kind::Key ? "K" : "V");
    std::vector<float> x(size_t(T) * D, 0.25f);
    int t0, c0, t1, c1;
    pair_position(kind, D, 0, 0, t0, c0, t1, c1);
    x[size_t(t0) * D + c0] = bits_float(nan_bits);
    x[size_t(t1) * D + c1] = 3.0f;
    pair_position(kind, D, 0, 1, t0, c0, t1, c1);
    x[size_t(t0) * D + c0] = 1.25f;
    x[size_t(t1) * D + c1] = 1.25f;
    const auto bytes = ref::encode_block(kind, x.data(), T, D, eb, cb, 9);

    const int pairs = pairs_per_lane(T, D);
    const uint64_t lane0 = 2 + 8 + 32 + 8 + 2 + uint64_t(pairs - 2);
    const uint64_t total = lane0 + uint64_t(kLanes - 1) * pairs;
    ASSERT_EQ(bytes.size(), block_bytes(kind, T, D, total));
    BlockHeader h;
    std::memcpy(&h, bytes.data(), sizeof(h));
    EXPECT_EQ(h.magic, kMagic);
    EXPECT_EQ(h.version, 3);
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
    const size_t at = payload_offset(kind, T, D);
    const size_t words = (total + 31) / 32;
    for (size_t w = 0; w < words; ++w) {
      uint32_t got;
      std::memcpy(&got, &bytes[at + 4 * w], 4);
      ASSERT_EQ(got, w < 2 ? uint32_t(want >> (32 * w)) : 0u) << "word " << w;
    }
    for (size_t b = at + 4 * words; b < bytes.size(); ++b) ASSERT_EQ(bytes[b], 0) << "padding byte " << b;

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

TEST(ReferenceCodec, CorruptHeadersAndLaneTablesGiveTheirStatus) {
  // Corruptions with a repaired checksum, so the later checks are reached.
  const uint64_t seed = kvcomp_test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  const int T = 64, D = 128;
  const ErrorBound eb{BoundMode::Relative, 0.004f};  // codes >= 15: PAIR_ESC fields in every lane
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
    // A v2 block (or any other version) is not read as v3.
    auto old = bytes;
    old[3] = 2;
    reseal(old);
    EXPECT_EQ(status(old), ref::DecodeStatus::BadHeader);
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
  const uint64_t seed = kvcomp_test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  const int T = 64, D = 128, blocks = 16;
  std::printf("%-17s %-5s %5s | %8s %8s %8s | %9s %9s %9s\n", "data", "kind", "eb", "P(esc)", "entropy", "huffman",
              "code b/v", "total b/v", "x vs fp16");
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
        const double pairs = double(blocks) * T * D / 2;
        // Per stream symbol (pair): the entropy of the histogram, the Huffman
        // codewords alone, and mean_bits (codewords + PAIR_ESC's 8-bit fields).
        double huffman = 0;
        for (int s = 0; s < kNumSymbols; ++s) huffman += double(counts[s]) * cb.length(s);
        huffman /= pairs;
        const double p_esc = double(counts[kPairEscape]) / pairs;
        const double h = entropy_bits(counts), code = cb.mean_bits(counts);
        const double total = 8.0 * double(total_bytes) / (2 * pairs);
        std::printf("%-17s %-5s %5.2f | %8.3f %8.3f %8.3f | %9.3f %9.3f %9.2f\n", kvcomp_test::dist_name(dist),
                    kind == Kind::Key ? "K" : "V", e, p_esc, h, huffman, code / 2, total, 16.0 / total);
        // Every symbol of the histogram has a codeword (the codebook is its own).
        for (int s = 0; s < kNumSymbols; ++s) ASSERT_TRUE(counts[s] == 0 || cb.length(s) > 0) << s;
        EXPECT_NEAR(code, huffman + 2.0 * kFieldBits * p_esc, 1e-9);
        // Huffman is at least the entropy; on these alphabets within 0.15 bit
        // of it unless one symbol (PAIR_ESC at small bounds) dominates: then
        // within Gallager's bound 2 - p - H2(p) for its probability p >= 1/2.
        double p_max = 0;
        for (int s = 0; s < kNumSymbols; ++s) p_max = std::max(p_max, double(counts[s]) / pairs);
        const double gallager =
            p_max >= 1.0 ? 1.0 : 2 - p_max + p_max * std::log2(p_max) + (1 - p_max) * std::log2(1 - p_max);
        EXPECT_GE(huffman, h - 1e-9);
        EXPECT_LT(huffman - h, p_max < 0.5 ? 0.15 : gallager) << "Huffman gap too large, p_max " << p_max;
        // The blocks hold at least the coded stream (raw words, params, lane tables and padding come on top).
        EXPECT_GE(8.0 * double(total_bytes), code * pairs);
      }
}
