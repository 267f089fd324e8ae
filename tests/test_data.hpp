// Test data: fresh random seeds every run (printed on failure, overridable by
// KVCOMP_TEST_SEED) and KV-like distributions.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

namespace kvcomp_test {

inline uint64_t fresh_seed() {
  if (const char* s = std::getenv("KVCOMP_TEST_SEED")) return std::strtoull(s, nullptr, 10);
  std::random_device rd;
  return (uint64_t(rd()) << 32) ^ rd();
}

/// SkewedRows (not in kAllDists): each row near its minimum (0.1 g^2) with one
/// large value (5 + |g|): rows whose range one value sets, so most codes are
/// small and one a row is large (a PAIR_ESC at k = 0).
enum class Dist { Uniform, Gaussian, HeavyTailed, OutlierChannels, SkewedRows, ConstantChannels };
inline const char* dist_name(Dist d) {
  switch (d) {
    case Dist::Uniform: return "uniform";
    case Dist::Gaussian: return "gaussian";
    case Dist::HeavyTailed: return "heavy-tailed";
    case Dist::OutlierChannels: return "outlier-channels";
    case Dist::SkewedRows: return "skewed-rows";
    case Dist::ConstantChannels: return "constant-channels";
  }
  return "?";
}
constexpr Dist kAllDists[] = {Dist::Uniform, Dist::Gaussian, Dist::HeavyTailed, Dist::OutlierChannels};

/// rows x cols values; for OutlierChannels a few channels (columns) carry a
/// large scale and offset, as keys do in real models; ConstantChannels is
/// Gaussian with every fourth column constant (a group of range 0, step 0).
inline std::vector<float> make_data(Dist d, int rows, int cols, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::uniform_real_distribution<float> uni(-2.f, 2.f);
  std::student_t_distribution<float> student(2.5f);
  std::vector<float> scale(cols, 1.f), offset(cols, 0.f);
  if (d == Dist::OutlierChannels)
    for (int c = 0; c < cols; ++c)
      if (rng() % 16 == 0) { scale[c] = 8.f + float(rng() % 12); offset[c] = float(int(rng() % 21) - 10); }
  std::vector<float> x(size_t(rows) * cols);
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < cols; ++c) {
      float v = 0;
      switch (d) {
        case Dist::Uniform: v = uni(rng); break;
        case Dist::Gaussian: v = normal(rng); break;
        case Dist::HeavyTailed: v = student(rng); break;
        case Dist::OutlierChannels: v = normal(rng) * scale[c] + offset[c]; break;
        case Dist::SkewedRows: { const float g = normal(rng); v = 0.1f * g * g; break; }
        case Dist::ConstantChannels: v = c % 4 == 0 ? 0.375f * float(c % 7) - 1.f : normal(rng); break;
      }
      x[size_t(r) * cols + c] = v;
    }
  if (d == Dist::SkewedRows)
    for (int r = 0; r < rows; ++r) x[size_t(r) * cols + rng() % cols] = 5.f + std::fabs(normal(rng));
  return x;
}

/// Rounds values to what an fp16 engine would hand us (exact in fp32).
inline void round_to_half(std::vector<float>& x);

}  // namespace kvcomp_test

#include "kvcomp/format.hpp"
inline void kvcomp_test::round_to_half(std::vector<float>& x) {
  // Round to nearest fp16 via the two directed roundings.
  for (auto& v : x) {
    const float lo = kvcomp::format::half_to_float(kvcomp::format::float_to_half_down(v));
    const float hi = -kvcomp::format::half_to_float(kvcomp::format::float_to_half_down(-v));
    v = (v - lo <= hi - v) ? lo : hi;
  }
}
