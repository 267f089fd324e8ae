// The host Hadamard transform (kvcomp/transform.hpp), the reference for what
// a Cache with Transform::Hadamard stores: it is x H / sqrt(D) to fp32
// precision, orthonormal, its own inverse, and its rounding to the cache's
// type is round-to-nearest-even as on the device, within the error terms
// cache.hpp states (eps ||x||_2 + delta sqrt(D)).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "kvcomp/transform.hpp"
#include "test_data.hpp"

using namespace kvcomp;
using namespace kvcomp_test;

namespace {

double norm2(const double* x, int n) {
  double s = 0;
  for (int i = 0; i < n; ++i) s += x[i] * x[i];
  return std::sqrt(s);
}

/// x H / sqrt(D) by the definition, in float64.
std::vector<double> hadamard_by_matrix(const float* x, int D) {
  std::vector<double> y(D, 0.0);
  for (int j = 0; j < D; ++j) {
    for (int i = 0; i < D; ++i) y[j] += (__builtin_popcount(unsigned(i & j)) % 2 ? -1.0 : 1.0) * double(x[i]);
    y[j] /= std::sqrt(double(D));
  }
  return y;
}

// cache.hpp's terms for the fp32 transform and the rounding to the cache's type.
constexpr double kTransformEps = 0x1p-20;
double rounding_eps(DType t) { return t == DType::F16 ? 0x1p-11 + 0x1p-19 : t == DType::BF16 ? 0x1p-8 + 0x1p-19 : 0x1p-20; }
double rounding_delta(DType t) { return t == DType::F16 ? 0x1p-25 : 0.0; }

}  // namespace

TEST(HadamardHost, ScaleIsOneOverSqrtDRoundedToFloat) {
  for (int D = 1; D <= 4096; D *= 2) {
    EXPECT_TRUE(is_power_of_two(D));
    EXPECT_EQ(hadamard_scale(D), float(1.0 / std::sqrt(double(D)))) << "D " << D;
  }
  for (int d : {0, -4, 3, 96, 100}) EXPECT_FALSE(is_power_of_two(d)) << d;
}

TEST(HadamardHost, IsTheScaledMatrixOrthonormalAndItsOwnInverse) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  for (int D : {32, 64, 128, 256})
    for (Dist dist : kAllDists) {
      SCOPED_TRACE("D " + std::to_string(D) + " " + dist_name(dist));
      const int rows = 200;
      const auto x = make_data(dist, rows, D, seed + D);
      const auto q = make_data(Dist::Gaussian, rows, D, seed + D + 1);
      for (int r = 0; r < rows; ++r) {
        const float* xr = &x[size_t(r) * D];
        std::vector<double> xd(xr, xr + D);
        const double nx = norm2(xd.data(), D);
        std::vector<float> y(xr, xr + D);
        hadamard_row(y.data(), D);
        // The fp32 butterfly is within kTransformEps ||x||_2 of the exact product (in L2).
        const auto exact = hadamard_by_matrix(xr, D);
        std::vector<double> diff(D);
        for (int j = 0; j < D; ++j) diff[j] = double(y[j]) - exact[j];
        ASSERT_LE(norm2(diff.data(), D), kTransformEps * nx) << "row " << r;
        // Orthonormal: norms and dot products are kept.
        std::vector<double> yd(y.begin(), y.end());
        ASSERT_NEAR(norm2(yd.data(), D), nx, 2 * kTransformEps * nx) << "row " << r;
        std::vector<float> qy(&q[size_t(r) * D], &q[size_t(r) * D] + D);
        hadamard_row(qy.data(), D);
        double dot = 0, dot_rot = 0, nq = 0;
        for (int j = 0; j < D; ++j) {
          dot += double(q[size_t(r) * D + j]) * xd[j];
          dot_rot += double(qy[j]) * double(y[j]);
          nq += double(q[size_t(r) * D + j]) * q[size_t(r) * D + j];
        }
        ASSERT_NEAR(dot_rot, dot, 3 * kTransformEps * std::sqrt(nq) * nx) << "row " << r;
        // Its own inverse: rotating twice gives x back to fp32 precision.
        hadamard_row(y.data(), D);
        for (int j = 0; j < D; ++j) diff[j] = double(y[j]) - xd[j];
        ASSERT_LE(norm2(diff.data(), D), 3 * kTransformEps * nx) << "row " << r;
      }
    }
}

TEST(HadamardHost, RoundingToTheCacheTypeIsNearestEvenAsOnTheDevice) {
  // Every 997th fp32 bit pattern (about 4.3 million, all exponents), and the edges.
  std::vector<uint32_t> patterns;
  for (uint64_t u = 0; u <= 0xFFFFFFFFull; u += 997) patterns.push_back(uint32_t(u));
  for (uint32_t edge : {0x00000000u, 0x80000000u, 0x33000000u, 0x33000001u, 0x337FFFFFu, 0x38800000u, 0x387FFFFFu,
                        0x477FE000u, 0x477FEFFFu, 0x477FF000u, 0x477FF001u, 0x7F7FFFFFu, 0x7F800000u, 0xFF800000u,
                        0x3F801000u, 0x3F803000u, 0x3F808000u, 0x3F818000u, 0x00000001u, 0x007FFFFFu})
    patterns.push_back(edge);
  for (uint32_t u : patterns) {
    const float f = format::bits_float(u);
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(round_to_dtype(DType::F16, f)));
      EXPECT_TRUE(std::isnan(round_to_dtype(DType::BF16, f)));
      continue;
    }
    ASSERT_EQ(float_to_half_rn(f), __half_as_ushort(__float2half_rn(f))) << std::hex << "fp32 bits 0x" << u;
    ASSERT_EQ(float_to_bf16_rn(f), __bfloat16_as_ushort(__float2bfloat16_rn(f))) << std::hex << "fp32 bits 0x" << u;
  }
}

TEST(HadamardHost, StoredRowsAreWithinTheStatedTermsOfTheExactRotation) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  for (DType t : {DType::F16, DType::BF16, DType::F32})
    for (int D : {64, 128, 256})
      for (float scale : {1.f, 100.f, 1e-5f}) {  // 1e-5: rotated values in fp16's subnormal range
        SCOPED_TRACE(std::string(dtype_name(t)) + " D " + std::to_string(D) + " scale " + std::to_string(scale));
        auto x = make_data(Dist::OutlierChannels, 100, D, seed + D);
        for (float& v : x) v = round_to_dtype(t, v * scale);  // what an engine of type t hands over
        const auto y = hadamard_rows_as_stored(t, x.data(), 100, D);
        for (int r = 0; r < 100; ++r) {
          for (int j = 0; j < D; ++j) ASSERT_EQ(round_to_dtype(t, y[size_t(r) * D + j]), y[size_t(r) * D + j]);
          const auto exact = hadamard_by_matrix(&x[size_t(r) * D], D);
          std::vector<double> diff(D), xd(&x[size_t(r) * D], &x[size_t(r) * D] + D);
          for (int j = 0; j < D; ++j) diff[j] = double(y[size_t(r) * D + j]) - exact[j];
          ASSERT_LE(norm2(diff.data(), D), rounding_eps(t) * norm2(xd.data(), D) + rounding_delta(t) * std::sqrt(D))
              << "row " << r;
        }
      }
}
