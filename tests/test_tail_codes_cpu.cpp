// The Codes8 / Codes6 tail codec (kvcomp/tail_codes.hpp) on the CPU: every
// element of random vectors of every input type, wide and narrow ranges,
// constant vectors, ranges that overflow fp32 and non-finite values: codes in
// range, params exact in the input type, each value within half a step of its
// input (up to the fp32 rounding the header states), non-finite values keep
// their class; rows packed and read back (one code, four codes) for every
// head_dim; and a bad Config::tail_format is refused.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "kvcomp/cache.hpp"
#include "kvcomp/dtype.hpp"
#include "kvcomp/error.hpp"
#include "kvcomp/tail_codes.hpp"
#include "test_data.hpp"

using namespace kvcomp;

namespace {

/// Checks one vector (values exact in type t) through the codec, element by element.
void check_vector(DType t, int bits, const std::vector<float>& x, const std::string& what) {
  SCOPED_TRACE(what + (bits == 6 ? " Codes6" : " Codes8"));
  const int D = int(x.size()), elem = int(t);
  const uint32_t M = format::tail_max_code(bits);
  std::vector<uint8_t> codes(D);
  const format::TailQuant q = format::tail_encode_row(x.data(), D, elem, bits, codes.data());
  std::vector<float> round(D);
  format::tail_round_row(x.data(), D, elem, bits, round.data());
  // The params: lo is the smallest finite value, exactly; step is an element of t, at least span / M.
  double lo = std::numeric_limits<double>::infinity(), hi = -lo;
  for (float v : x)
    if (std::isfinite(v)) { lo = std::min(lo, double(v)); hi = std::max(hi, double(v)); }
  if (!(lo <= hi)) lo = hi = 0;
  ASSERT_EQ(double(q.lo), lo);
  ASSERT_EQ(format::tail_elem_to_float(q.lo_bits, elem), q.lo);
  ASSERT_EQ(format::tail_elem_to_float(q.step_bits, elem), q.step);
  ASSERT_EQ(round_to_dtype(t, q.step), q.step) << "step is a value of the input type";
  ASSERT_GE(double(q.step) * (1 + 0x1p-22), (hi - lo) / M) << "step covers the range";
  // ... and is no coarser than that, up to the type's rounding up (fp16 8 + 2 mantissa bits, bf16 7; the
  // smallest step each type holds).
  const double grain = t == DType::F16 ? 0x1p-24 : t == DType::BF16 ? 0x1p-133 : 0x1p-149;
  ASSERT_LE(double(q.step), (hi - lo) / M * (1 + 0x1p-7) + grain) << "step no coarser than the range needs";
  for (int i = 0; i < D; ++i) {
    const float v = format::tail_value(format::tail_code_to8(codes[i], bits), q.lo, q.step);
    ASSERT_TRUE(v == round[i] || (std::isnan(v) && std::isnan(round[i]))) << "element " << i;
    if (std::isnan(x[i])) {
      ASSERT_EQ(codes[i], M + 3);
      ASSERT_TRUE(std::isnan(v));
    } else if (std::isinf(x[i])) {
      ASSERT_EQ(codes[i], x[i] > 0 ? M + 2 : M + 1);
      ASSERT_EQ(v, x[i]);
    } else {
      ASSERT_LE(codes[i], M) << "element " << i;
      // Half a step, plus the fp32 rounding of (x - lo) x inv and of the fma (tail_codes.hpp).
      const double bound = (0.5 + 0x1p-13) * double(q.step) + 0x1p-23 * std::fabs(double(x[i]));
      ASSERT_LE(std::fabs(double(v) - double(x[i])), bound)
          << "element " << i << ": x " << x[i] << " value " << v << " step " << q.step << " lo " << q.lo;
    }
  }
}

std::vector<float> round_to_vector(DType t, std::vector<float> x) {
  for (float& v : x) v = round_to_dtype(t, v);
  return x;
}

std::vector<float> random_vector(DType t, int D, double scale, double offset, std::mt19937_64& rng) {
  std::normal_distribution<double> n(0.0, 1.0);
  std::vector<float> x(D);
  for (float& v : x) v = round_to_dtype(t, float(offset + scale * n(rng)));
  return x;
}

}  // namespace

TEST(TailCodesCpu, EveryElementWithinHalfAStepForEveryTypeAndRange) {
  const uint64_t seed = kvcomp_test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  for (DType t : {DType::F16, DType::BF16, DType::F32})
    for (int D : {64, 80, 96, 128, 256})
      for (double scale : {1e-6, 1e-3, 0.1, 1.0, 30.0, 3000.0})
        for (double offset : {0.0, 5.0, -700.0}) {
          if (t == DType::F16 && std::fabs(offset) + 6 * scale > 60000) continue;
          for (int rep = 0; rep < 4; ++rep)
            for (int bits : {8, 6})
              check_vector(t, bits, random_vector(t, D, scale, offset * scale, rng),
                           std::string(dtype_name(t)) + " D " + std::to_string(D) + " scale " + std::to_string(scale) +
                               " offset " + std::to_string(offset));
          if (HasFatalFailure()) return;
        }
}

TEST(TailCodesCpu, ConstantExtremeAndNonFiniteVectors) {
  const float inf = std::numeric_limits<float>::infinity(), nan = std::nanf("");
  for (int bits : {8, 6})
  for (DType t : {DType::F16, DType::BF16, DType::F32}) {
    const std::string name = dtype_name(t);
    auto check_vector = [bits](DType t, const std::vector<float>& x, const std::string& what) {
      ::check_vector(t, bits, x, what);
    };
    check_vector(t, std::vector<float>(64, round_to_dtype(t, 3.140625f)), name + " constant");
    check_vector(t, std::vector<float>(64, 0.f), name + " zeros");
    std::vector<float> x(128);
    for (int i = 0; i < 128; ++i) x[i] = round_to_dtype(t, float(i % 7) * 0.25f - 0.5f);
    x[3] = nan;
    x[10] = inf;
    x[11] = -inf;
    check_vector(t, x, name + " with NaN, +Inf, -Inf");
    check_vector(t, std::vector<float>(64, nan), name + " all NaN");
    const float big = t == DType::F16 ? 65504.f : t == DType::BF16 ? round_to_dtype(t, 3.3e38f) : 3.4e38f;
    std::vector<float> y(64, 0.f);
    y[0] = big;
    y[1] = -big;  // fp16: the span 131008 fits fp32; bf16 and fp32: it overflows (hi / 252 - lo / 252)
    check_vector(t, y, name + " the widest range");
    std::vector<float> tiny(64);
    for (int i = 0; i < 64; ++i) tiny[i] = round_to_dtype(t, float(i) * 1e-7f);  // fp16: subnormals
    check_vector(t, tiny, name + " tiny values");
    if (t != DType::F16) {
      // A range near the top of the type: hi - lo overflows fp32, and so would x - lo (d = x inv - lo inv).
      std::vector<float> wide(96);
      for (int i = 0; i < 96; ++i) wide[i] = round_to_dtype(t, big * (float(i) / 47.5f - 1.f));
      check_vector(t, wide, name + " values across the whole range");
      // Subnormal ranges: 1 / step overflows (d = (x - lo) / step).
      std::vector<float> sub(64);
      for (int i = 0; i < 64; ++i) sub[i] = std::ldexp(float(i % 37), t == DType::BF16 ? -133 : -149);
      check_vector(t, sub, name + " a subnormal range");
      for (int i = 0; i < 64; ++i) sub[i] = std::ldexp(float(i), -128) - std::ldexp(1.f, -126);
      check_vector(t, round_to_vector(t, sub), name + " a range of 2^-122 around -2^-126");
    }
    if (HasFatalFailure()) return;
  }
}

// Rows of random codes (every code, the non-finite ones included), packed by
// tail_put_code, read back one code at a time (tail_code8) and four at a
// time (tail_quad8, as the fused kernel reads them) at every head_dim; the
// bytes past the codes (the params) are neither written nor needed.
TEST(TailCodesCpu, RowsPackAndReadBackOneAndFourCodesAtATime) {
  const uint64_t seed = kvcomp_test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  for (int bits : {8, 6})
    for (int D : {64, 80, 96, 128, 256})
      for (int rep = 0; rep < 8; ++rep) {
        SCOPED_TRACE("bits " + std::to_string(bits) + " D " + std::to_string(D));
        const size_t code_bytes = format::tail_code_bytes(D, bits);
        ASSERT_EQ(code_bytes * 8, size_t(D) * bits);
        std::vector<uint32_t> row_words((code_bytes + 4 + 3) / 4);  // 4-byte aligned, a param word after
        uint8_t* row = reinterpret_cast<uint8_t*>(row_words.data());
        uint8_t params[4];
        for (int i = 0; i < 4; ++i) row[code_bytes + i] = params[i] = uint8_t(rng());  // params: any bytes
        std::vector<uint32_t> codes(D);
        for (int c = 0; c < D; ++c) {
          codes[c] = uint32_t(rng() % (1u << bits));
          format::tail_put_code(row, c, codes[c], bits);
        }
        for (int i = 0; i < 4; ++i) ASSERT_EQ(row[code_bytes + i], params[i]) << "packing wrote past the codes";
        for (int c = 0; c < D; ++c) {
          const uint32_t want = format::tail_code_to8(codes[c], bits);
          ASSERT_EQ(format::tail_code8(row, c, bits), want) << "channel " << c;
          if (codes[c] > format::tail_max_code(bits)) ASSERT_GT(want, format::kTailMaxCode) << "non-finite stays so";
          else ASSERT_EQ(want, codes[c]);
        }
        for (int c = 0; c < D; c += 4) {
          const uint32_t quad = format::tail_quad8(row, c, bits);
          for (int i = 0; i < 4; ++i)
            ASSERT_EQ((quad >> (8 * i)) & 0xFFu, format::tail_code_to8(codes[c + i], bits)) << "channel " << c + i;
        }
      }
}

TEST(TailCodesCpu, RowBytesAndABadTailFormatIsRefused) {
  EXPECT_EQ(format::tail_code_row_bytes(128, format::tail_elem_bytes(int(DType::F16)), 8), 132u);
  EXPECT_EQ(format::tail_code_row_bytes(64, format::tail_elem_bytes(int(DType::BF16)), 8), 68u);
  EXPECT_EQ(format::tail_code_row_bytes(96, format::tail_elem_bytes(int(DType::F32)), 8), 104u);
  EXPECT_EQ(format::tail_code_row_bytes(128, format::tail_elem_bytes(int(DType::F16)), 6), 100u);
  EXPECT_EQ(format::tail_code_row_bytes(64, format::tail_elem_bytes(int(DType::BF16)), 6), 52u);
  EXPECT_EQ(format::tail_code_row_bytes(80, format::tail_elem_bytes(int(DType::F32)), 6), 68u);
  Config c;
  c.tail_format = TailFormat(7);
  try {
    Cache cache(c);
    FAIL() << "a bad tail_format was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(
                  "tail_format must be TailFormat::Input, TailFormat::Codes8 or TailFormat::Codes6, got 7"),
              std::string::npos)
        << e.what();
  }
}
