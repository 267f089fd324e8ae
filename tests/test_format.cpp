// CPU tests of the format's arithmetic: fp16 directed rounding and the
// error-bounded quantizer.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>

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

TEST(Format, BlockSizesAndPositions) {
  EXPECT_EQ(payload_offset(Kind::Key, 64, 128), 8u + 4u * 128 + 64);
  EXPECT_EQ(payload_offset(Kind::Value, 64, 128), 8u + 4u * 64 + 64);
  EXPECT_EQ(block_bytes(Kind::Key, 64, 128, 1) % kBlockAlign, 0u);
  EXPECT_LE(max_lane_bits(128, 256), 65535u);  // lane lengths fit uint16
  // Every (token, channel) belongs to exactly one (lane, symbol).
  for (Kind kind : {Kind::Key, Kind::Value})
    for (int T : {32, 64, 128})
      for (int D : {64, 128, 256}) {
        std::vector<int> seen(size_t(T) * D, 0);
        for (int lane = 0; lane < kLanes; ++lane)
          for (int i = 0; i < symbols_per_lane(T, D); ++i) {
            int t, c;
            symbol_position(kind, D, lane, i, t, c);
            ASSERT_TRUE(t >= 0 && t < T && c >= 0 && c < D);
            ++seen[size_t(t) * D + c];
          }
        for (int s : seen) ASSERT_EQ(s, 1);
      }
}
