#include <string>

#include "kernels/attention.cuh"
#include "kvcomp/cache.hpp"
#include "kvcomp/error.hpp"
#include "launch.hpp"

namespace kvcomp {
namespace detail {
static_assert(kTailF16 == int32_t(DType::F16) && kTailBF16 == int32_t(DType::BF16), "tail type codes are DType's");
static_assert(kTransformHadamard == int32_t(Transform::Hadamard), "transform codes are Transform's");
namespace {


/// The kernel's group: 1, 2, 4 or 8 query heads per kv head; 3, 5, 6 and 7 run padded.
int padded_group(int G) { return G <= 1 ? 1 : G <= 2 ? 2 : G <= 4 ? 4 : G <= 8 ? 8 : G; }

template <typename F>
void dispatch(DType q_type, int D, int G_real, F&& f) {
  const int G = padded_group(G_real);
  auto with_g = [&](auto qt, auto d) {
    switch (G) {
      case 1: f(qt, d, std::integral_constant<int, 1>{}); return;
      case 2: f(qt, d, std::integral_constant<int, 2>{}); return;
      case 4: f(qt, d, std::integral_constant<int, 4>{}); return;
      case 8: f(qt, d, std::integral_constant<int, 8>{}); return;
    }
    throw Error("query heads per kv head must be 1..8, got " + std::to_string(G_real));
  };
  auto with_d = [&](auto qt) {
    if (D == 64) return with_g(qt, std::integral_constant<int, 64>{});
    if (D == 128) return with_g(qt, std::integral_constant<int, 128>{});
    throw Error("attention supports head_dim 64 and 128, got " + std::to_string(D));
  };
  if (q_type == DType::F16) return with_d(__half{});
  if (q_type == DType::BF16) return with_d(__nv_bfloat16{});
  throw Error("attention takes q/out as float16 or bfloat16");
}

}  // namespace

int attention_ctas_per_sm(int D, int G) {
  int ctas = 1;
  dispatch(DType::F16, D, G, [&](auto qt, auto d, auto g) {
    auto kernel = fused_attention_kernel<decltype(qt), d.value, g.value>;
    const size_t smem = AttnSmem<d.value, g.value>::kBytes;
    check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&ctas, kernel, 32 * kAttnWarps, smem),
               "attention occupancy");
  });
  return ctas > 0 ? ctas : 1;
}

void launch_attention(DType q_type, int D, int G, const AttendParams& params, cudaStream_t s) {
  if (params.batch <= 0) return;
  AttendParams p = params;
  p.group = G;  // the real group; the kernel's template G is padded_group(G)
  dispatch(q_type, D, G, [&](auto qt, auto d, auto g) {
    using QT = decltype(qt);
    constexpr int kD = d.value, kG = g.value;
    constexpr size_t smem = AttnSmem<kD, kG>::kBytes;
    auto kernel = fused_attention_kernel<QT, kD, kG>;
    const dim3 grid(p.splits, p.kv_heads, p.batch);
    kernel<<<grid, 32 * kAttnWarps, smem, s>>>(p);
    check_cuda(cudaGetLastError(), "fused attention launch");
    merge_kernel<QT, kD><<<p.batch * p.kv_heads * G, kD, 0, s>>>(p.part, p.splits, static_cast<QT*>(p.out),
                                                                   p.transform == kTransformHadamard);
    check_cuda(cudaGetLastError(), "split merge launch");
  });
}

}  // namespace detail
}  // namespace kvcomp
