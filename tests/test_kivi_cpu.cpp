// The KIVI-style baseline's CPU reference quantizer: what the quality harness
// and the GPU tests compare against.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

#include "kvcomp/error.hpp"
#include "src/baselines.hpp"
#include "src/kivi.hpp"
#include "test_data.hpp"

using namespace kvcomp_test;
using kvcomp::baseline::KiviShape;

TEST(KiviReference, GroupsWindowAndErrorWithinHalfAStep) {
  const uint64_t seed = fresh_seed();
  for (int bits : {2, 4})
    for (int tokens : {0, 20, 32, 64, 65, 200}) {
      KiviShape s;
      s.batch = 2; s.kv_heads = 2; s.q_heads = 8; s.head_dim = 64; s.tokens = tokens; s.bits = bits;
      const int D = s.head_dim, seqs = s.batch * s.kv_heads;
      auto k = make_data(Dist::OutlierChannels, seqs * tokens, D, seed + tokens);
      auto v = make_data(Dist::Gaussian, seqs * tokens, D, seed + tokens + 1);
      round_to_half(k);
      round_to_half(v);
      std::vector<float> ko(k.size()), vo(v.size());
      kvcomp::baseline::kivi_reference(s, k.data(), v.data(), ko.data(), vo.data());
      const int quant = s.chunks() * 32;
      ASSERT_EQ(quant % 32, 0);
      ASSERT_GE(tokens - quant, std::min(tokens, s.window)) << "the recent window stays fp16";
      ASSERT_LT(tokens - quant, s.window + 32);
      const float levels = float((1 << bits) - 1);
      for (int sq = 0; sq < seqs; ++sq)
        for (int t = 0; t < tokens; ++t)
          for (int c = 0; c < D; ++c) {
            const size_t i = (size_t(sq) * tokens + t) * D + c;
            if (t >= quant) {
              ASSERT_EQ(ko[i], k[i]);
              ASSERT_EQ(vo[i], v[i]);
              continue;
            }
            // K group: channel c over the chunk's 32 tokens; V group: token t over 32 channels.
            float klo = INFINITY, khi = -INFINITY, vlo = INFINITY, vhi = -INFINITY;
            for (int r = t / 32 * 32; r < t / 32 * 32 + 32; ++r) {
              klo = std::min(klo, k[(size_t(sq) * tokens + r) * D + c]);
              khi = std::max(khi, k[(size_t(sq) * tokens + r) * D + c]);
            }
            for (int cc = c / 32 * 32; cc < c / 32 * 32 + 32; ++cc) {
              vlo = std::min(vlo, v[(size_t(sq) * tokens + t) * D + cc]);
              vhi = std::max(vhi, v[(size_t(sq) * tokens + t) * D + cc]);
            }
            // Half a step, plus the fp16 rounding of scale and zero.
            const float kstep = (khi - klo) / levels, vstep = (vhi - vlo) / levels;
            ASSERT_LE(std::fabs(ko[i] - k[i]), 0.5f * kstep + 2e-3f * (std::fabs(klo) + khi - klo) + 1e-6f)
                << "bits " << bits << " K t " << t << " c " << c << " seed " << seed;
            ASSERT_LE(std::fabs(vo[i] - v[i]), 0.5f * vstep + 2e-3f * (std::fabs(vlo) + vhi - vlo) + 1e-6f)
                << "bits " << bits << " V t " << t << " c " << c << " seed " << seed;
          }
    }
}

TEST(KiviReference, BytesCountCodesParamsAndTail) {
  KiviShape s;
  s.batch = 1; s.kv_heads = 1; s.q_heads = 1; s.head_dim = 128; s.tokens = 32 * 10 + 40; s.bits = 2;
  // (360 - 32) / 32 = 10 chunks quantized, the last 40 tokens (>= the 32-token window) stay fp16.
  ASSERT_EQ(s.chunks(), 10);
  ASSERT_EQ(s.tail(), 40);
  const size_t codes = size_t(10) * 32 * 128 * 2 / 8, params = size_t(10) * 32 * 128 / 32 * 4, tail = 40 * 128 * 2;
  ASSERT_EQ(s.bytes(), 2 * (codes + params + tail));
  EXPECT_THROW(kvcomp::baseline::kivi_reference(KiviShape{1, 1, 1, 96, 64, 4, 32}, nullptr, nullptr, nullptr, nullptr),
               kvcomp::Error);
  EXPECT_THROW(kvcomp::baseline::kivi_reference(KiviShape{1, 1, 1, 64, 64, 3, 32}, nullptr, nullptr, nullptr, nullptr),
               kvcomp::Error);
}

TEST(FlashBaseline, MisalignedKvIsRejectedBeforeAnyDeviceWork) {
  // No memory is touched: the check comes before the launch (fake device addresses).
  const auto* aligned = reinterpret_cast<const __half*>(uintptr_t(1) << 20);
  const auto* odd = reinterpret_cast<const __half*>((uintptr_t(1) << 20) + 2);
  kvcomp::baseline::Fp16Attention a{odd, aligned, 1, 2, 8, 64, 100};
  EXPECT_THROW(kvcomp::baseline::flash_decode_fp16(a, nullptr, nullptr, nullptr, 132, 0), kvcomp::Error);
  a = {aligned, aligned, 1, 2, 8, 64, 100, /*seq_stride=*/-1, /*head_stride=*/100 * 64 + 4};
  try {
    kvcomp::baseline::flash_decode_fp16(a, nullptr, nullptr, nullptr, 132, 0);
    FAIL() << "expected kvcomp::Error";
  } catch (const kvcomp::Error& e) {
    EXPECT_NE(std::string(e.what()).find("multiples of 8"), std::string::npos) << e.what();
  }
}
