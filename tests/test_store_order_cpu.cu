// The store kernels' walk, run on the host (no device needed): the segments
// of every lane stream (one per warp of a store CTA) cover the lane's pairs
// once each, in format::pair_position() order, for every block shape.
// kernels/store.cuh's for_each_unit_pair is host-callable for this test.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "kernels/store.cuh"

using namespace kvcomp;

namespace {

// Staged value (t, c) = t * 1024 + c: exact in fp32, so each visited value names its position.
float position_value(int t, int c) { return float(t * 1024 + c); }

}  // namespace

TEST(StoreWalk, SegmentsCoverEveryLaneStreamInPairPositionOrder) {
  for (Kind kind : {Kind::Key, Kind::Value})
    for (int T : {32, 64, 128})
      for (int D : {64, 80, 96, 128, 256}) {
        SCOPED_TRACE(std::string(kind == Kind::Key ? "K" : "V") + " T " + std::to_string(T) + " D " +
                     std::to_string(D));
        const int stride = detail::StagedRows::stride_of(kind, D);
        std::vector<float> staged(size_t(T) * stride, -1.f);
        for (int t = 0; t < T; ++t)
          for (int c = 0; c < D; ++c) staged[size_t(t) * stride + c] = position_value(t, c);
        const detail::StagedRows rows{staged.data(), stride};
        std::vector<format::GroupQuant> params(format::num_groups(kind, T, D),
                                               format::make_group_quant(0.f, 1.f, ErrorBound{}));
        const int units = detail::lane_units(kind, T, D);
        ASSERT_EQ(units * (kind == Kind::Key ? 8 : 4), format::pairs_per_lane(T, D));
        for (int warps : {detail::kStoreWarps, detail::kStoreWarpsFew}) {
          for (int lane = 0; lane < format::kLanes; ++lane) {
            int i = 0;  // pairs visited so far: the stream index the next pair must have
            for (int w = 0; w < warps; ++w)
              detail::for_each_unit_pair(kind, T, D, lane, detail::segment_begin(w, units, warps),
                                         detail::segment_begin(w + 1, units, warps), rows, params.data(),
                                         [&](int, int, float va, float vb) {
                                           int t0, c0, t1, c1;
                                           format::pair_position(kind, D, lane, i, t0, c0, t1, c1);
                                           ASSERT_EQ(va, position_value(t0, c0)) << "lane " << lane << " pair " << i;
                                           ASSERT_EQ(vb, position_value(t1, c1)) << "lane " << lane << " pair " << i;
                                           ++i;
                                         });
            ASSERT_EQ(i, format::pairs_per_lane(T, D)) << "lane " << lane;
            ASSERT_EQ(detail::segment_begin(warps, units, warps), units) << warps << " warps";
          }
        }
      }
}
