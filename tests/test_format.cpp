// CPU tests of the format's arithmetic: fp16 directed rounding, the
// error-bounded quantizer, the v3 lane order (pair_position), pair symbols
// under k low bits, decode-table entries (fast and slow) and put_pair.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "kvcomp/format.hpp"
#include "test_data.hpp"

using namespace kvcomp;
using namespace kvcomp::format;

TEST(Format, HalfToFloatRoundTripsEveryFiniteHalf) {
  for (uint32_t h = 0; h < 0x10000u; ++h) {
    if ((h & 0x7C00u) == 0x7C00u) continue;  // inf / nan
    const float f = half_to_float(uint16_t(h));
    const uint16_t back = float_to_half_down(f);
    if (h == 0x8000u) {  // -0 may come back as +0 or -0; both are 0
      EXPECT_EQ(half_to_float(back), 0.f);
      continue;
    }
    ASSERT_EQ(back, h) << "half 0x" << std::hex << h;
    ASSERT_EQ(float_to_half_toward_zero(std::fabs(f)), h & 0x7FFFu);
  }
}

TEST(Format, DirectedRoundingBracketsTheInput) {
  const uint64_t seed = kvcomp_test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  for (int i = 0; i < 200000; ++i) {
    // Random finite floats across the whole exponent range.
    uint32_t u = uint32_t(rng());
    if (!is_finite_bits(u)) continue;
    const float f = bits_float(u);
    const float down = half_to_float(float_to_half_down(f));
    if (f >= -65504.f) {
      ASSERT_LE(down, f) << f;
    } else {
      ASSERT_EQ(down, -65504.f);
    }
    const float a = std::fabs(f);
    const float tz = half_to_float(float_to_half_toward_zero(a));
    ASSERT_LE(tz, a);
    // Tight: the next half up is above the input (unless clamped).
    const uint16_t tzb = float_to_half_toward_zero(a);
    if (tzb < 0x7BFF) {
      ASSERT_GT(half_to_float(uint16_t(tzb + 1)), a);
    }
  }
}

TEST(Format, QuantizerHoldsTheBoundOnEveryElement) {
  const uint64_t seed = kvcomp_test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  for (auto dist : kvcomp_test::kAllDists)
    for (float eb : {0.005f, 0.01f, 0.05f, 0.1f, 0.5f})
      for (auto mode : {BoundMode::Relative, BoundMode::Absolute}) {
        const auto x = kvcomp_test::make_data(dist, 64, 64, seed + int(dist));
        // One group per row.
        for (int r = 0; r < 64; ++r) {
          float lo = kEmptyLo, hi = kEmptyHi;
          for (int c = 0; c < 64; ++c) range_add(x[r * 64 + c], lo, hi);
          const GroupQuant g = make_group_quant(lo, hi, {mode, eb});
          for (int c = 0; c < 64; ++c) {
            const float v = x[r * 64 + c];
            const int q = quantize(v, g);
            ASSERT_TRUE(q == kEscape || (q >= 0 && q <= kMaxCode));
            if (q == kEscape) continue;  // stored exactly
            ASSERT_LE(std::fabs(dequantize(q, g.min, g.step) - v), g.eb_abs)
                << kvcomp_test::dist_name(dist) << " eb " << eb << " v " << v;
            if (mode == BoundMode::Relative) {
              ASSERT_LE(g.eb_abs, eb * (hi - lo));
            }
          }
        }
      }
}

TEST(Format, NonFiniteValuesEscapeAndDoNotWidenTheRange) {
  float lo = kEmptyLo, hi = kEmptyHi;
  const float vals[] = {1.f, std::numeric_limits<float>::quiet_NaN(), -2.f, std::numeric_limits<float>::infinity(),
                        -std::numeric_limits<float>::infinity(), 0.5f};
  for (float v : vals) range_add(v, lo, hi);
  EXPECT_EQ(lo, -2.f);
  EXPECT_EQ(hi, 1.f);
  const GroupQuant g = make_group_quant(lo, hi, {BoundMode::Relative, 0.05f});
  EXPECT_EQ(quantize(vals[1], g), kEscape);
  EXPECT_EQ(quantize(vals[3], g), kEscape);
  EXPECT_EQ(quantize(vals[4], g), kEscape);
  EXPECT_NE(quantize(vals[0], g), kEscape);
  // A group with no finite value escapes everything.
  const GroupQuant empty = make_group_quant(kEmptyLo, kEmptyHi, {BoundMode::Relative, 0.05f});
  EXPECT_EQ(quantize(1.f, empty), kEscape);
}

TEST(Format, ConstantGroupsAndHugeValues) {
  // Range 0: step 0, the exact value is code 0.
  GroupQuant g = make_group_quant(0.25f, 0.25f, {BoundMode::Relative, 0.05f});
  EXPECT_EQ(quantize(0.25f, g), 0);
  // A value fp16 cannot hold as min: escaped, never out of bound.
  g = make_group_quant(-1e6f, 1e6f, {BoundMode::Relative, 0.05f});
  EXPECT_EQ(quantize(-1e6f, g), kEscape);
  const int q = quantize(0.f, g);
  if (q != kEscape) {
    EXPECT_LE(std::fabs(dequantize(q, g.min, g.step)), g.eb_abs);
  }
}

TEST(Format, BlockSizesAndLaneBits) {
  EXPECT_EQ(payload_offset(Kind::Key, 64, 128), 8u + 4u * 128 + 64);
  EXPECT_EQ(payload_offset(Kind::Value, 64, 128), 8u + 4u * 64 + 64);
  EXPECT_EQ(block_bytes(Kind::Key, 64, 128, 1) % kBlockAlign, 0u);
  // The worst pair: PAIR_ESC at the length limit, both values raw.
  uint32_t worst_enc[kNumSymbols] = {};
  worst_enc[kPairEscape] = uint32_t(kMaxCodeLen) << 16;
  const uint32_t worst = uint32_t(kMaxCodeLen + 2 * (kFieldBits + kRawBits));
  for (int k = 0; k <= kMaxLowBits; ++k) {
    EXPECT_EQ(pair_bits(worst_enc, k, kEscape, kEscape), worst) << "k " << k;
    // A coded pair symbol at the length limit with its 2k low bits is shorter.
    uint32_t enc[kNumSymbols] = {};
    for (int s = 0; s <= kPairEscape; ++s) enc[s] = uint32_t(kMaxCodeLen) << 16;
    for (int a = 0; a <= kEscape; ++a)
      for (int b = 0; b <= kEscape; ++b) ASSERT_LE(pair_bits(enc, k, a, b), worst) << k << " " << a << " " << b;
    EXPECT_EQ(pair_bits(enc, k, 0, 0), uint32_t(kMaxCodeLen + 2 * k));
  }
  for (int T : {32, 64, 128})
    for (int D : {64, 80, 96, 128, 256}) {
      EXPECT_EQ(pairs_per_lane(T, D) * 2 * kLanes, T * D);
      EXPECT_EQ(max_lane_bits(T, D), uint32_t(pairs_per_lane(T, D)) * worst);
      EXPECT_LE(max_lane_bits(T, D), 65535u) << T << " x " << D << ": lane lengths must fit uint16";
    }
}

TEST(Format, PairPositionsCoverEveryValueOnce) {
  // Every (token, channel) belongs to exactly one (lane, pair, value); the two
  // values of a pair are neighbours along the mma's k dimension.
  for (Kind kind : {Kind::Key, Kind::Value})
    for (int T : {32, 64, 128})
      for (int D : {64, 80, 96, 128, 256}) {
        SCOPED_TRACE(std::string(kind == Kind::Key ? "K " : "V ") + std::to_string(T) + " x " + std::to_string(D));
        std::vector<int> seen(size_t(T) * D, 0);
        for (int lane = 0; lane < kLanes; ++lane)
          for (int i = 0; i < pairs_per_lane(T, D); ++i) {
            int t0 = -1, c0 = -1, t1 = -1, c1 = -1;
            pair_position(kind, D, lane, i, t0, c0, t1, c1);
            ASSERT_TRUE(t0 >= 0 && t0 < T && c0 >= 0 && c0 < D) << lane << " " << i;
            ASSERT_TRUE(t1 >= 0 && t1 < T && c1 >= 0 && c1 < D) << lane << " " << i;
            if (kind == Kind::Key) {
              ASSERT_EQ(t1, t0);
              ASSERT_EQ(c1, c0 + 1);
            } else {
              ASSERT_EQ(c1, c0);
              ASSERT_EQ(t1, t0 + 1);
            }
            ++seen[size_t(t0) * D + c0];
            ++seen[size_t(t1) * D + c1];
          }
        for (size_t j = 0; j < seen.size(); ++j) ASSERT_EQ(seen[j], 1) << "t " << j / D << " c " << j % D;
      }
}

TEST(Format, PairPositionsFollowTheMmaFragmentOrder) {
  // mma.m16n8k16 fragments (PTX ISA), g = l / 4, q = l % 4:
  //   B (K): register i of lane l holds row k = 2 q + (i % 2) + 8 (i / 2), column n = g;
  //   A (V): register i holds row m = g + 8 ((i / 2) % 2), column k = 2 q + (i % 2) + 8 (i / 4).
  // K: two pairs (b0 b1, b2 b3) per (k16, n8) tile; V: four pairs (a0 a1 .. a6 a7) per (k16, m16) tile.
  for (Kind kind : {Kind::Key, Kind::Value})
    for (int T : {32, 64, 128})
      for (int D : {64, 80, 96, 128, 256})
        for (int lane = 0; lane < kLanes; ++lane) {
          const int g = lane / 4, q = lane % 4;
          int i = 0;
          for (int chunk = 0; chunk < T / kChunkTokens; ++chunk) {
            const int outer = kind == Kind::Key ? D / 16 : 2, inner = kind == Kind::Key ? 4 : D / 16;
            const int pairs = kind == Kind::Key ? 2 : 4;
            for (int a = 0; a < outer; ++a)
              for (int b = 0; b < inner; ++b)
                for (int pair = 0; pair < pairs; ++pair, ++i) {
                  int got[2][2];
                  pair_position(kind, D, lane, i, got[0][0], got[0][1], got[1][0], got[1][1]);
                  for (int v = 0; v < 2; ++v) {
                    const int reg = 2 * pair + v;
                    int t, c;
                    if (kind == Kind::Key) {  // a = k16 (channels), b = n8 (tokens)
                      c = 16 * a + 2 * q + (reg % 2) + 8 * (reg / 2);
                      t = kChunkTokens * chunk + 8 * b + g;
                    } else {  // a = k16 (tokens), b = m16 (channels)
                      c = 16 * b + g + 8 * ((reg / 2) % 2);
                      t = kChunkTokens * chunk + 16 * a + 2 * q + (reg % 2) + 8 * (reg / 4);
                    }
                    ASSERT_EQ(got[v][0], t) << "lane " << lane << " pair " << i << " value " << v;
                    ASSERT_EQ(got[v][1], c) << "lane " << lane << " pair " << i << " value " << v;
                  }
                }
          }
          ASSERT_EQ(i, pairs_per_lane(T, D));
        }
}

TEST(Format, PairSymbols) {
  EXPECT_EQ(kMaxLowBits, 3);
  EXPECT_EQ(kLowBitChoices, 4);
  for (int k = 0; k <= kMaxLowBits; ++k) {
    std::vector<int> hits(kNumSymbols, 0);
    for (int a = 0; a <= kEscape; ++a)
      for (int b = 0; b <= kEscape; ++b) {
        const int s = pair_symbol(a, b, k);
        ++hits[s];
        // Codes below 15 * 2^k pair up by their hi parts; ESC (255) never does.
        if (a != kEscape && b != kEscape && a < (kPairBase << k) && b < (kPairBase << k)) {
          ASSERT_EQ(s, (a >> k) * kPairBase + (b >> k)) << k << " " << a << " " << b;
          ASSERT_LT(s, kPairEscape);
        } else {
          ASSERT_EQ(s, kPairEscape) << k << " " << a << " " << b;
        }
      }
    // Every pair symbol stands for 2^k x 2^k pairs of codes (its low bits).
    for (int s = 0; s < kPairEscape; ++s) ASSERT_EQ(hits[s], 1 << (2 * k)) << k << " " << s;
    for (int s = kPairEscape + 1; s < kNumSymbols; ++s) ASSERT_EQ(hits[s], 0) << k << " " << s;
    EXPECT_EQ(pair_symbol((kPairBase << k) - 1, (kPairBase << k) - 1, k), kPairEscape - 1);
    EXPECT_EQ(pair_symbol(kPairBase << k, 0, k), kPairEscape);
    EXPECT_EQ(pair_symbol(0, kEscape, k), kPairEscape);
  }
  EXPECT_EQ(kPairEscape, 225);
  EXPECT_LT(kPairEscape, kNumSymbols);
  EXPECT_EQ(pair_symbol(kPairBase - 1, kPairBase - 1), kPairEscape - 1);  // k defaults to 0
  EXPECT_EQ(pair_symbol(kPairBase, 0), kPairEscape);
}

TEST(Format, LutCodeHalvesAreExactSubnormals) {
  // A fast entry's fp16 half of code n is the subnormal n x kLutCodeUnit
  // (mantissa n << 2): exact for every code an entry or the slow path forms
  // (< 256), leaving bits 0..1 and 10..15 of each half free.
  EXPECT_EQ(kLutCodeUnit, std::ldexp(1.f, -22));
  for (uint32_t n = 0; n < 256; ++n) {
    const uint32_t h = lut_code_half(n);
    ASSERT_LT(h, 0x400u) << n;  // exponent 0: a subnormal (or 0)
    ASSERT_EQ(h & 0x3u, 0u) << n;
    ASSERT_EQ(half_to_float(uint16_t(h)), float(n) * kLutCodeUnit) << n;
  }
}

TEST(Format, LutFastEntriesRoundTrip) {
  // Every pair of codes a fast entry can hold (hi part < 15 and k <= 3 low
  // bits: codes 0..119) and every length it can carry (L + 2k, 1..11).
  const int max_code = ((kPairBase - 1) << kMaxLowBits) | ((1 << kMaxLowBits) - 1);
  EXPECT_EQ(max_code, 119);
  for (int a = 0; a <= max_code; ++a)
    for (int b = 0; b <= max_code; ++b)
      for (int bits = 1; bits <= kMaxCodeLen; ++bits) {
        const uint32_t e = lut_fast_entry(a, b, bits);
        ASSERT_FALSE(lut_is_slow(e)) << a << " " << b;
        ASSERT_EQ(lut_length(e), bits) << a << " " << b;
        ASSERT_EQ(lut_first(e), a) << b << " " << bits;
        ASSERT_EQ(lut_second(e), b) << a << " " << bits;
        // The masked entry is the pair's two codes as fp16 (x kLutCodeUnit),
        // first value low; the other bits hold nothing but the length.
        const uint32_t values = e & kLutValueMask;
        ASSERT_EQ(half_to_float(uint16_t(values & 0xFFFFu)), float(a) * kLutCodeUnit);
        ASSERT_EQ(half_to_float(uint16_t(values >> 16)), float(b) * kLutCodeUnit);
        ASSERT_EQ(e & ~kLutValueMask, uint32_t(bits) << kLutLengthShift);
        ASSERT_NE(e, 0u);  // 0 = no codeword
      }
}

TEST(Format, LutSlowEntriesRoundTrip) {
  for (int s = 0; s <= kPairEscape; ++s)
    for (int len = 1; len <= kMaxCodeLen; ++len) {
      const uint32_t e = lut_slow_entry(s, len);
      ASSERT_TRUE(lut_is_slow(e)) << s;
      ASSERT_EQ(lut_length(e), len) << s;
      ASSERT_EQ(lut_slow_symbol(e), s) << s << " len " << len;
      ASSERT_EQ(e, kLutEscapeBit | uint32_t(s) << 4 | uint32_t(len) << kLutLengthShift) << s;
    }
  // Bits 28..31 = L, 4..11 = the symbol, 16 = slow: nothing overlaps.
  EXPECT_EQ(lut_slow_symbol(lut_slow_entry(255, 15)), 255);
  EXPECT_EQ(lut_length(lut_slow_entry(255, 15)), 15);
  EXPECT_TRUE(lut_is_slow(lut_slow_entry(255, 15)));
  EXPECT_FALSE(lut_is_slow(0u));
  EXPECT_EQ(lut_length(0u), 0);
}

TEST(Format, PutPairWritesWhatPairBitsCounts) {
  const uint64_t seed = kvcomp_test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  // An encoder table with codewords for some pair symbols (arbitrary bits:
  // put_pair does not care whether they form a prefix code).
  uint32_t enc[kNumSymbols] = {};
  for (int s = 0; s < kPairEscape; ++s)
    if (rng() % 2) {
      const int len = 1 + int(rng() % kMaxCodeLen);
      enc[s] = uint32_t(rng() & ((1u << len) - 1)) | uint32_t(len) << 16;
    }
  enc[kPairEscape] = 0x5u | 4u << 16;
  const float va = -1.5f, vb = std::numeric_limits<float>::quiet_NaN();
  for (int k = 0; k <= kMaxLowBits; ++k)
    for (int a = 0; a <= kEscape; ++a)
      for (int b = 0; b <= kEscape; ++b) {
        std::vector<std::pair<uint32_t, int>> puts;
        put_pair(enc, k, a, b, va, vb, [&](uint32_t bits, int n) { puts.push_back({bits, n}); });
        uint32_t total = 0;
        for (auto [bits, n] : puts) {
          ASSERT_TRUE(n >= 1 && n <= 32);
          if (n < 32) {
            ASSERT_EQ(bits >> n, 0u);
          }
          total += uint32_t(n);
        }
        ASSERT_EQ(total, pair_bits(enc, k, a, b)) << k << ": " << a << " " << b;
        const int s = pair_symbol(a, b, k);
        if (s != kPairEscape && (enc[s] >> 16) != 0) {
          // The codeword, then k low bits of a and k of b (LSB first: a's lowest), in one put.
          const uint32_t mask = (1u << k) - 1, len = enc[s] >> 16;
          const uint32_t low = (uint32_t(a) & mask) | (uint32_t(b) & mask) << k;
          const std::vector<std::pair<uint32_t, int>> want = {{(enc[s] & 0xFFFFu) | low << len, int(len) + 2 * k}};
          ASSERT_EQ(puts, want) << k << ": " << a << " " << b;
          continue;
        }
        // PAIR_ESC, field a [raw a], field b [raw b]: no low bits.
        std::vector<std::pair<uint32_t, int>> want = {{0x5u, 4}, {uint32_t(a), kFieldBits}};
        if (a == kEscape) want.push_back({float_bits(va), kRawBits});
        want.push_back({uint32_t(b), kFieldBits});
        if (b == kEscape) want.push_back({float_bits(vb), kRawBits});
        ASSERT_EQ(puts, want) << k << ": " << a << " " << b;
      }
}
