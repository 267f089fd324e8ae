// The orthonormal Hadamard transform of Config::transform (cache.hpp): the
// host reference of what the device computes.
//
// R = H_D / sqrt(D), H_D the Sylvester Hadamard matrix (H_D[i][j] =
// (-1)^popcount(i & j)), D a power of two. R is symmetric and orthonormal, so
// it is its own inverse and q.k = (qR).(kR).
//
// A row x becomes x R in fp32 by the in-order fast Walsh-Hadamard transform:
// log2(D) butterfly stages h = 1, 2, 4, ..., D/2, each mapping every pair
// (x[i], x[i + h]) with i & h == 0 to (x[i] + x[i + h], x[i] - x[i + h]);
// then one multiply of every element by hadamard_scale(D). The device
// (kernels/hadamard.cuh) performs exactly these operations in this order, with
// __fadd_rn / __fsub_rn / __fmul_rn, so hadamard_row reproduces its results bit
// for bit (there is no multiply-add to contract, so no compiler flag matters).
#pragma once

#include <cstddef>
#include <vector>

#include "kvcomp/dtype.hpp"
#include "kvcomp/format.hpp"

namespace kvcomp {

KVCOMP_HD bool is_power_of_two(int d) { return d > 0 && (d & (d - 1)) == 0; }

/// 1/sqrt(D) rounded to fp32, for D a power of two: 2^-k for D = 4^k, else
/// 2^-k x fl(1/sqrt(2)) (exact scaling of the rounded constant).
KVCOMP_HD float hadamard_scale(int D) {
  int log2_d = 0;
  while ((2 << log2_d) <= D) ++log2_d;
  float s = (log2_d % 2) ? 0.70710678118654752440f : 1.f;
  for (int i = 0; i < log2_d / 2; ++i) s *= 0.5f;
  return s;
}

/// x[0..D) <- x R in fp32 (D a power of two), in the operation order above.
inline void hadamard_row(float* x, int D) {
  for (int h = 1; h < D; h <<= 1)
    for (int i = 0; i < D; ++i) {
      if (i & h) continue;
      const float a = x[i], b = x[i + h];
      x[i] = a + b;
      x[i + h] = a - b;
    }
  const float s = hadamard_scale(D);
  for (int i = 0; i < D; ++i) x[i] = x[i] * s;
}

/// What a Cache with Transform::Hadamard stores for `rows` rows of D values
/// (each already representable in t): every row rotated (hadamard_row), then
/// rounded to nearest in t. These are the rows the blocks quantize and the
/// tail holds.
inline std::vector<float> hadamard_rows_as_stored(DType t, const float* x, size_t rows, int D) {
  std::vector<float> y(x, x + rows * size_t(D));
  for (size_t r = 0; r < rows; ++r) {
    hadamard_row(&y[r * D], D);
    for (int c = 0; c < D; ++c) y[r * D + c] = round_to_dtype(t, y[r * D + c]);
  }
  return y;
}

}  // namespace kvcomp
