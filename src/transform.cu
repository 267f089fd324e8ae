#include <string>

#include "kernels/hadamard.cuh"
#include "kvcomp/error.hpp"
#include "launch.hpp"

namespace kvcomp {
namespace detail {

void launch_hadamard_rows(DType type, int D, const void* src, int64_t token_stride, int64_t head_stride, int64_t tokens,
                          int heads, void* dst, cudaStream_t s) {
  const int64_t rows = tokens * heads;
  if (rows == 0) return;
  const unsigned grid = unsigned((rows + kHadamardWarps - 1) / kHadamardWarps);
  auto launch = [&](auto elem, auto d) {
    using Elem = decltype(elem);
    hadamard_rows_kernel<Elem, d.value><<<grid, 32 * kHadamardWarps, 0, s>>>(
        static_cast<const Elem*>(src), token_stride, head_stride, tokens, heads, static_cast<Elem*>(dst));
  };
  auto with_d = [&](auto elem) {
    if (D == 64) return launch(elem, std::integral_constant<int, 64>{});
    if (D == 128) return launch(elem, std::integral_constant<int, 128>{});
    if (D == 256) return launch(elem, std::integral_constant<int, 256>{});
    throw Error("the Hadamard transform supports head_dim 64, 128 and 256, got " + std::to_string(D));
  };
  switch (type) {
    case DType::F16: with_d(__half{}); break;
    case DType::BF16: with_d(__nv_bfloat16{}); break;
    case DType::F32: with_d(float{}); break;
  }
  check_cuda(cudaGetLastError(), "Hadamard transform launch");
}

}  // namespace detail
}  // namespace kvcomp
