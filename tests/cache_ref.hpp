// What the fused kernel attends to, on the CPU: a (sequence, head)'s K/V as
// stored (closed blocks through the reference decoder, the tail exact), the
// rows a query sees, and the check of multi-token attention against float64
// over them. Shared by the GPU tests of attention, windows, fork, rollback.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "attention_ref.hpp"
#include "kvcomp/cache.hpp"
#include "kvcomp/reference.hpp"
#include "kvcomp/tail_codes.hpp"

namespace kvcomp_test {

/// K/V of (layer, seq, head) as the fused kernel sees it, [tokens][D]: blocks
/// through the reference decoder, tail tokens exact, or through the tail
/// codes with Config::tail_format = Codes8 / Codes6 (k_in, v_in: every token
/// appended, [tokens][H][D]). Blocks that end at or before `first_token`,
/// other than the sinks' (blocks holding tokens < sinks), are left 0: no
/// query sees them, and behind a sliding window their pages may be reused.
/// blocks: the closed blocks (-1: tokens / T, as without Config::max_rollback).
inline void decoded_kv(const kvcomp::Cache& cache, int layer, int seq, int head, const std::vector<float>& k_in,
                       const std::vector<float>& v_in, int tokens, std::vector<double>& k, std::vector<double>& v,
                       int first_token = 0, int sinks = 0, int blocks = -1) {
  using kvcomp::Kind;
  const auto& cfg = cache.config();
  const int T = cfg.block_tokens, D = cfg.head_dim, H = cfg.kv_heads;
  k.assign(size_t(tokens) * D, 0);
  v.assign(size_t(tokens) * D, 0);
  if (blocks < 0) blocks = tokens / T;
  std::vector<float> out(size_t(T) * D);
  for (int b = 0; b < blocks; ++b) {
    if ((b + 1) * T <= first_token && b * T >= sinks) continue;
    for (Kind kind : {Kind::Key, Kind::Value}) {
      const auto bytes = cache.read_block(layer, seq, head, b, kind, 0);
      const kvcomp::Codebook cb = cache.codebook(layer, head, kind);
      ASSERT_EQ(kvcomp::ref::decode_block(bytes.data(), bytes.size(), kind, T, D, cb, out.data()),
                kvcomp::ref::DecodeStatus::Ok);
      auto& dst = kind == Kind::Key ? k : v;
      for (size_t i = 0; i < out.size(); ++i) dst[size_t(b) * T * D + i] = out[i];
    }
  }
  const int code_bits = kvcomp::tail_code_bits(cfg.tail_format);
  std::vector<float> kr(D), vr(D);
  for (int t = blocks * T; t < tokens; ++t) {
    const float* kt = &k_in[(size_t(t) * H + head) * D];
    const float* vt = &v_in[(size_t(t) * H + head) * D];
    if (code_bits) {  // the tail holds the vectors as 8- or 6-bit codes
      kvcomp::format::tail_round_row(kt, D, int(cfg.dtype), code_bits, kr.data());
      kvcomp::format::tail_round_row(vt, D, int(cfg.dtype), code_bits, vr.data());
      kt = kr.data();
      vt = vr.data();
    }
    for (int c = 0; c < D; ++c) {
      k[size_t(t) * D + c] = kt[c];
      v[size_t(t) * D + c] = vt[c];
    }
  }
}

/// Rows of x ([tokens][D]) a query at position `pos` sees: causal, and within
/// the window plus sinks if window > 0.
inline std::vector<double> visible_rows(const std::vector<double>& x, int pos, int window, int sinks, int D) {
  std::vector<double> out;
  for (int t = 0; t <= pos; ++t)
    if (window == 0 || t > pos - window || t < sinks) out.insert(out.end(), &x[size_t(t) * D], &x[size_t(t + 1) * D]);
  return out;
}

/// `out` (fp16 bytes, [n][q_heads][D]: what Cache::attend wrote for n
/// queries q ([n][q_heads][D]), the last n of `tokens` tokens of (layer,
/// seq)) against float64 attention over the rows each query sees of the
/// stored K/V (decoded_kv; k_in, v_in: every token appended), within 1e-3
/// relative L2 per query row. blocks: as decoded_kv.
inline void expect_attention_matches_float64(const kvcomp::Cache& cache, int layer, int seq, const std::vector<float>& q,
                                             const std::vector<uint8_t>& out, const std::vector<float>& k_in,
                                             const std::vector<float>& v_in, int tokens, int n, int window, int sinks,
                                             int blocks = -1) {
  const auto& cfg = cache.config();
  const int H = cfg.kv_heads, D = cfg.head_dim, G = cfg.q_heads / H, L = tokens;
  for (int h = 0; h < H; ++h) {
    std::vector<double> k, v;
    decoded_kv(cache, layer, seq, h, k_in, v_in, L, k, v, window > 0 ? L - n - window + 1 : 0, sinks, blocks);
    if (::testing::Test::HasFatalFailure()) return;
    for (int j = 0; j < n; ++j) {
      const int pos = L - n + j;
      const auto kv = visible_rows(k, pos, window, sinks, D);
      const auto vv = visible_rows(v, pos, window, sinks, D);
      for (int g = 0; g < G; ++g) {
        const size_t row = size_t(j) * cfg.q_heads + h * G + g;
        const auto ref = attention64(&q[row * D], kv.data(), vv.data(), int(kv.size() / D), D);
        double num = 0, den = 0;
        for (int c = 0; c < D; ++c) {
          const float got = kvcomp::load_as_float(kvcomp::DType::F16, out.data(), row * D + c);
          ASSERT_TRUE(std::isfinite(got)) << "layer " << layer << " query " << j << " head " << h * G + g;
          num += (got - ref[c]) * (got - ref[c]);
          den += ref[c] * ref[c];
        }
        ASSERT_LE(std::sqrt(num / std::max(den, 1e-30)), 1e-3)
            << "layer " << layer << " query " << j << " of " << n << ", " << L << " tokens";
      }
    }
  }
}

}  // namespace kvcomp_test
