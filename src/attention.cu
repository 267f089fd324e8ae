#include <cstdint>
#include <string>

#include "kernels/attention.cuh"
#include "kvcomp/cache.hpp"
#include "kvcomp/error.hpp"
#include "launch.hpp"
#include "merge_launch.hpp"
#include "smem_opt_in.hpp"

namespace kvcomp {
namespace detail {
static_assert(kTailF16 == int32_t(DType::F16) && kTailBF16 == int32_t(DType::BF16), "tail type codes are DType's");
static_assert(kTransformHadamard == int32_t(Transform::Hadamard), "transform codes are Transform's");
namespace {


template <typename F>
void dispatch(DType q_type, int D, int G, F&& f) {
  if (G < 1 || G > kMaxGroup)
    throw Error("query heads per kv head must be 1.." + std::to_string(kMaxGroup) + ", got " + std::to_string(G));
  auto with_d = [&](auto qt) {
    if (D == 64) return f(qt, std::integral_constant<int, 64>{});
    if (D == 80) return f(qt, std::integral_constant<int, 80>{});
    if (D == 96) return f(qt, std::integral_constant<int, 96>{});
    if (D == 128) return f(qt, std::integral_constant<int, 128>{});
    if (D == 256) return f(qt, std::integral_constant<int, 256>{});
    throw Error("attention supports head_dim 64, 80, 96, 128 and 256, got " + std::to_string(D));
  };
  if (q_type == DType::F16) return with_d(__half{});
  if (q_type == DType::BF16) return with_d(__nv_bfloat16{});
  throw Error("attention takes q/out as float16 or bfloat16");
}

/// Calls f(integral_constant tiles, integral_constant warps) for the fused
/// kernel of the shape: two mma row tiles where rows come in tiles of 16
/// (attention_tile_rows: D <= 128), else one; CTAs of `warps` warps if that
/// is one of the shape's sizes (fused_cta_warps), else of 4.
template <int D, typename F>
void with_kernel(int tile_rows, int warps, F&& f) {
  auto with_tiles = [&](auto tiles) {
    constexpr int kRows = kMmaRows * decltype(tiles)::value;
    constexpr int kMid = fused_cta_warps(D, kRows, 1), kAll = fused_cta_warps(D, kRows, 2);
    if constexpr (kAll > 0)
      if (warps == kAll) return f(tiles, std::integral_constant<int, kAll>{});
    if constexpr (kMid > 0)
      if (warps == kMid) return f(tiles, std::integral_constant<int, kMid>{});
    f(tiles, std::integral_constant<int, 4>{});
  };
  if constexpr (D <= 128)
    if (tile_rows > kMmaRows) return with_tiles(std::integral_constant<int, 2>{});
  with_tiles(std::integral_constant<int, 1>{});
}

}  // namespace

int attention_ctas_per_sm(int D, int G, int tile_rows, int warps) {
  int ctas = 0;
  dispatch(DType::F16, D, G, [&](auto qt, auto d) {
    constexpr int kD = d.value;
    with_kernel<kD>(tile_rows, warps, [&](auto tiles, auto w) {
      constexpr int kTiles = decltype(tiles)::value, kW = decltype(w)::value;
      if (kW != warps) return;  // not a size of this shape
      constexpr auto kernel = fused_attention_kernel<decltype(qt), kD, kTiles, kW>;
      opt_in_dynamic_smem<kernel>(AttnSmem<kD, kTiles, kW>::kBytes, "attention shared-memory opt-in");
      check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&ctas, kernel, 32 * kW, AttnSmem<kD, kTiles, kW>::kBytes),
                 "attention occupancy");
    });
  });
  return ctas > 0 || warps != 4 ? ctas : 1;  // 4-warp CTAs are every shape's fallback
}

int attention_tile_rows(int D, int rows) { return rows > kMmaRows && D <= 128 ? 2 * kMmaRows : kMmaRows; }

void launch_attention(DType q_type, int D, int G, const AttendParams& params, cudaStream_t s) {
  if (params.batch <= 0) return;
  AttendParams p = params;
  p.group = G;
  // Tiles of 8 (query, head) rows per KV head: each CTA decodes its blocks once for a tile.
  int rows = 0, max_queries = 1;
  for (int b = 0; b < p.batch; ++b) {
    const int n = attend_queries(p, b).y;
    rows += n;
    max_queries = n > max_queries ? n : max_queries;
  }
  const int tile_rows = attention_tile_rows(D, max_queries * G);
  p.row_tiles = (max_queries * G + tile_rows - 1) / tile_rows;
  if (static_cast<long long>(p.kv_heads) * p.row_tiles > 65535)
    throw Error("attend: kv_heads x tiles of 8 query rows (" + std::to_string(p.kv_heads) + " x " +
                std::to_string(p.row_tiles) + ") exceeds 65535; attend fewer queries per sequence at once");
  dispatch(q_type, D, G, [&](auto qt, auto d) {
    using QT = decltype(qt);
    constexpr int kD = d.value;
    const dim3 grid(p.splits, p.kv_heads * p.row_tiles, p.batch);
    auto launch = [&](auto tiles, auto warps) {
      constexpr int kTiles = decltype(tiles)::value, kW = decltype(warps)::value;
      constexpr auto kernel = fused_attention_kernel<QT, kD, kTiles, kW>;
      opt_in_dynamic_smem<kernel>(AttnSmem<kD, kTiles, kW>::kBytes, "attention shared-memory opt-in");
      kernel<<<grid, 32 * kW, AttnSmem<kD, kTiles, kW>::kBytes, s>>>(p);
    };
    // The plan's CTA size where built for the shape (plan_attention only picks those), else 4 warps.
    with_kernel<kD>(tile_rows, p.warps, launch);
    check_cuda(cudaGetLastError(), "fused attention launch");
    launch_merge<QT, kD>(p.part, p.splits, static_cast<QT*>(p.out), p.transform == kTransformHadamard,
                         rows * p.kv_heads * G, s, "split merge launch");
  });
}

}  // namespace detail
}  // namespace kvcomp
