// Sliding windows on the GPU: a long decode keeps only the pool pages that
// hold blocks a query can still see (eager appends and plan-based steps),
// attention over what is left matches float64 over the window and the sinks,
// a full-attention layer keeps its pages while a windowed one beside it (own
// pages) frees its own, and the pool ends empty.
#include <algorithm>
#include <string>
#include <vector>

#include "gpu_util.cuh"
#include "kvcomp/cache.hpp"
#include "src/pool_pages.hpp"
#include "attention_ref.hpp"
#include "cache_ref.hpp"
#include "test_data.hpp"

using namespace kvcomp;
using namespace kvcomp_test;

namespace {

Config window_config(int window, int sinks) {
  Config c;
  c.layers = 2;
  c.kv_heads = 2;
  c.q_heads = 8;
  c.head_dim = 128;
  c.block_tokens = 32;
  c.window = window;
  c.sink_tokens = sinks;
  c.max_seqs = 2;
  c.max_attend_batch = 4;
  c.max_tokens_per_seq = 4096;
  c.pool_bytes = size_t(32) << 20;
  // The smallest pages (one worst-case pair, a few real ones): pages die soon after their blocks.
  c.pool_page_bytes = (detail::worst_pair_bytes(c.block_tokens, c.head_dim) + 15) / 16 * 16;
  return c;
}

/// Query rows of `n` queries against `seq`'s last n tokens in `layer` vs
/// float64 attention over the rows each sees (window, sinks) of the stored K/V.
void check_attention(Cache& cache, int layer, int seq, const std::vector<float>& k_in, const std::vector<float>& v_in,
                     int n, uint64_t seed) {
  const auto& cfg = cache.config();
  const int D = cfg.head_dim, L = int(cache.tokens(seq, layer));
  const int window = cfg.layer_windows.empty() ? cfg.window : cfg.layer_windows[layer];
  const auto q = round_to(DType::F16, make_data(Dist::Gaussian, n * cfg.q_heads, D, seed));
  const auto qb = to_dtype_bytes(DType::F16, q);
  DevBuf<uint8_t> dq(qb.size()), dout(qb.size());
  dq.upload(qb);
  CUDA_OK(cudaMemset(dout.ptr, 0xFF, qb.size()));
  cache.attend(layer, {seq}, {n}, dq.ptr, dout.ptr, DType::F16, 0);
  CUDA_LAUNCH_OK();
  expect_attention_matches_float64(cache, layer, seq, q, dout.download(), k_in, v_in, L, n, window, cfg.sink_tokens);
}

}  // namespace

TEST(WindowGpu, PagesBehindTheWindowAreFreedThroughEagerAndPlanAppends) {
  KVCOMP_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  const int window = 96, sinks = 4;
  size_t windowed_after_eager = 0;
  for (bool global_layer : {false, true}) {
    SCOPED_TRACE(global_layer ? "layer 1 has full attention" : "both layers windowed");
    Config cfg = window_config(window, sinks);
    if (global_layer) cfg.layer_windows = {window, 0};
    const int H = cfg.kv_heads, D = cfg.head_dim, T = cfg.block_tokens;
    const int eager = 1500, steps = 300, total = eager + steps;
    const auto kf = round_to(DType::F16, make_data(Dist::OutlierChannels, total, H * D, seed));
    const auto vf = round_to(DType::F16, make_data(Dist::Gaussian, total, H * D, seed + 1));
    DevBuf<uint8_t> dk(kf.size() * 2), dv(vf.size() * 2);
    dk.upload(to_dtype_bytes(DType::F16, kf));
    dv.upload(to_dtype_bytes(DType::F16, vf));
    const size_t row = size_t(H) * D * 2;
    Cache cache(cfg);
    const int s = cache.add_sequence();
    const size_t page = cache.stats().pool_page_bytes;
    // Live blocks per layer and head: the sinks', the window's (and max_attend_batch before it), plus one
    // each side; a page holding a live pair stays, and the open page.
    const int live_blocks = (sinks + T - 1) / T + (window + cfg.max_attend_batch + T - 1) / T + 2;
    const size_t windowed_bound = (size_t(cfg.layers) * H * live_blocks + 1) * page;
    size_t peak = 0;
    // Eager: chunks of 37 tokens, every layer.
    for (int at = 0; at < eager; at += 37) {
      const int n = std::min(37, eager - at);
      for (int l = 0; l < cfg.layers; ++l) cache.append(l, {s}, {n}, dk.ptr + at * row, dv.ptr + at * row, 0);
      peak = std::max(peak, cache.stats().pool_bytes_in_use);
    }
    CUDA_LAUNCH_OK();
    const size_t after_eager = cache.stats().pool_bytes_in_use;
    if (!global_layer) {
      EXPECT_LE(peak, windowed_bound + size_t(cfg.layers) * H * ((37 + T - 1) / T) * page) << "eager peak";
      EXPECT_LE(after_eager, windowed_bound);
      windowed_after_eager = after_eager;
    } else {
      // Layer 1 keeps every block; layer 0 (windowed) fills pages of its own, which are freed behind
      // its window: about half of what two full-attention layers hold, plus a windowed layer's live pages.
      EXPECT_GT(after_eager, 2 * windowed_after_eager);
      Config full_cfg = cfg;
      full_cfg.layer_windows = {0, 0};
      Cache full(full_cfg);
      const int f = full.add_sequence();
      for (int at = 0; at < eager; at += 37) {
        const int n = std::min(37, eager - at);
        for (int l = 0; l < cfg.layers; ++l) full.append(l, {f}, {n}, dk.ptr + at * row, dv.ptr + at * row, 0);
      }
      const size_t both_full = full.stats().pool_bytes_in_use;
      EXPECT_LE(after_eager, both_full / 2 + windowed_after_eager + 2 * page)
          << "two full layers " << both_full << ", two windowed " << windowed_after_eager;
      const Stats st = cache.stats();
      EXPECT_LT(st.per_layer[0].compressed_bytes, st.per_layer[1].compressed_bytes / 2)
          << "the windowed layer's dead blocks were not freed";
    }
    check_attention(cache, 0, s, kf, vf, 3, seed + 2);
    if (HasFatalFailure()) return;

    // Plan-based decode, a token a step (frees every T tokens).
    const DecodePlan plan = cache.make_plan(1);
    cache.set_plan(plan, {s}, 0);
    for (int t = eager; t < total; ++t)
      for (int l = 0; l < cfg.layers; ++l) cache.append(plan, l, dk.ptr + t * row, dv.ptr + t * row, 0);
    cache.check(0);
    EXPECT_EQ(cache.tokens(s, 1), total);
    if (!global_layer) {
      EXPECT_LE(cache.stats().pool_bytes_in_use, windowed_bound + size_t(cfg.layers) * H * page) << "plan";
    } else {
      const Stats st = cache.stats();
      EXPECT_LT(st.per_layer[0].compressed_bytes, st.per_layer[1].compressed_bytes / 2) << "plan";
    }
    for (int l = 0; l < cfg.layers; ++l) {
      check_attention(cache, l, s, kf, vf, 4, seed + 3 + l);
      if (HasFatalFailure()) return;
    }
    // Blocks behind the window are refused by read_block; those in it and the sinks' are read.
    EXPECT_THROW(cache.read_block(0, s, 0, 5, Kind::Key, 0), Error);
    EXPECT_NO_THROW(cache.read_block(0, s, 0, 0, Kind::Key, 0));
    EXPECT_NO_THROW(cache.read_block(0, s, 0, total / T - 1, Kind::Value, 0));
    cache.remove_sequence(s);
    const Stats empty = cache.stats();
    EXPECT_EQ(empty.pool_bytes_in_use, 0u);
    EXPECT_EQ(empty.compressed_bytes, 0u);
  }
}
