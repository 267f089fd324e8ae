// Cache checks that need no GPU: configuration errors are reported before
// any device work, with messages that name the problem; append planning and
// pool placement (src/store_plan.hpp) give the expected jobs and extents.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <iterator>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "kvcomp/cache.hpp"
#include "kernels/attention_params.cuh"
#include "src/pool_pages.hpp"
#include "src/store_plan.hpp"
#include "test_data.hpp"

using namespace kvcomp;

namespace {

void expect_error(const Config& c, const std::string& needle) {
  try {
    Cache cache(c);
    FAIL() << "expected kvcomp::Error containing '" << needle << "'";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

}  // namespace

TEST(CacheConfig, BadConfigurationsAreRejectedWithClearMessages) {
  Config c;
  c.head_dim = 72;
  expect_error(c, "head_dim must be 64, 80, 96, 128 or 256, got 72");
  c = Config{};
  c.max_attend_batch = 300;
  expect_error(c, "max_attend_batch must be 0");
  c = Config{};
  c.block_tokens = 48;
  expect_error(c, "block_tokens must be 32, 64 or 128");
  c = Config{};
  c.q_heads = 12;
  c.kv_heads = 8;
  expect_error(c, "multiple of kv_heads");
  c = Config{};
  c.q_heads = 3 * 129;
  c.kv_heads = 3;
  expect_error(c, "must be 1..128, got 129");
  c = Config{};
  c.k_bound.value = -1.f;
  expect_error(c, "K error bound must be positive");
  c = Config{};
  c.v_bound.value = std::nanf("");
  expect_error(c, "V error bound must be positive");
  c = Config{};
  c.overrides.push_back({5, 0, {}, {}});
  c.layers = 2;
  expect_error(c, "override names layer 5");
  c = Config{};
  c.overrides.push_back({0, 9, {}, {}});
  expect_error(c, "override names kv head 9");
  c = Config{};
  c.layers = 0;
  expect_error(c, "layers must be positive");
  c = Config{};
  c.max_seqs = 0;
  expect_error(c, "max_seqs must be positive");
  c = Config{};
  c.transform = Transform(7);
  expect_error(c, "transform must be Transform::None or Transform::Hadamard, got 7");
  c = Config{};
  c.transform = Transform::Hadamard;
  c.head_dim = 96;
  expect_error(c, "transform Hadamard needs head_dim a power of two, got 96");
  c = Config{};
  c.pool_bytes = 64 * 1024;  // less than one worst-case pair (T = 64, D = 128)
  expect_error(c, "pool_bytes (65536) must hold at least one pool page of " +
                      std::to_string(detail::worst_pair_bytes(64, 128)) + " bytes");
  c = Config{};
  c.pool_page_bytes = 64 * 1024;
  expect_error(c, "pool_page_bytes must be 0 (automatic) or a multiple of 16 of at least");
  c.pool_page_bytes = detail::worst_pair_bytes(64, 128) + 8;
  expect_error(c, "pool_page_bytes must be 0 (automatic) or a multiple of 16");
  c = Config{};
  c.window = -1;
  expect_error(c, "window must be 0 (full attention) or positive, got -1");
  c = Config{};
  c.layers = 3;
  c.layer_windows = {4096, 0};
  expect_error(c, "layer_windows has 2 entries for 3 layers");
  c.layer_windows = {4096, 0, -5};
  expect_error(c, "layer_windows[2] must be 0 (full attention) or positive, got -5");
  c = Config{};
  c.sink_tokens = -4;
  expect_error(c, "sink_tokens must be 0 or positive, got -4");
  c = Config{};
  c.max_rollback = 65;
  expect_error(c, "max_rollback must be 0..block_tokens (64), got 65");
  c.max_rollback = -1;
  expect_error(c, "max_rollback must be 0..block_tokens (64), got -1");
}

// The units a tile of query rows needs (kernels/attention_params.cuh): every
// unit holding a token some row sees, each once, in order; no other. The tail
// (the last unit) holds up to T + max_rollback - 1 tokens.
TEST(AttentionUnits, UnitRangeListsExactlyTheUnitsTheRowsSee) {
  std::mt19937 rng(1234);
  for (int trial = 0; trial < 20000; ++trial) {
    const int T = 32 << (trial % 3);
    const int L = 1 + int(rng() % 2000);
    const int rollback = trial % 5 < 2 ? 0 : 1 + int(rng() % T);  // Config::max_rollback
    const int blocks = detail::blocks_to_close(L, T, rollback);
    const int units = blocks + (L > blocks * T);
    const int hi_max = 1 + int(rng() % L);
    const int window = trial % 4 == 0 ? 0 : 1 + int(rng() % 600);
    const int lo_min = window ? hi_max - int(rng() % 17) - window : 0;  // the first row's (a few queries before)
    const int sinks = window && trial % 2 ? int(rng() % 300) : 0;
    const detail::UnitRange r = detail::unit_range(lo_min, hi_max, sinks, T, blocks);
    std::vector<int> got, want;
    for (int v = 0; v < r.count; ++v) got.push_back(r.unit(v));
    for (int u = 0; u < units; ++u) {
      bool seen = false;
      const int end = u < blocks ? u * T + T : L;
      for (int t = u * T; t < end && !seen; ++t) seen = t < hi_max && (t >= lo_min || t < sinks);
      if (seen) want.push_back(u);
    }
    ASSERT_EQ(got, want) << "T " << T << " L " << L << " blocks " << blocks << " lo " << lo_min << " hi " << hi_max
                         << " sinks " << sinks;
  }
}

// The split plan (kernels/attention_params.cuh): covers every unit with
// whole-warp splits, and no split count, tried one by one, gives fewer
// waves x (blocks per warp + the CTA's fixed cost); a split that fits one
// wave is never passed over for one that spills into a second.
TEST(AttentionSplits, PlanCoversTheUnitsAndMinimizesWavesTimesWork) {
  using detail::kAttnWarps;
  auto cost = [](int units, int splits, long long items, long long places) {
    const int per = (units + splits - 1) / splits;
    const long long per_warp = (per + kAttnWarps - 1) / kAttnWarps;
    const long long waves = (splits * items + places - 1) / places;
    return waves * (4 * per_warp + detail::kCtaCostQuarters);
  };
  std::mt19937 rng(99);
  for (int trial = 0; trial < 3000; ++trial) {
    const int units = 1 + int(rng() % (trial % 3 == 0 ? 20 : 9000));
    const int batch = 1 + int(rng() % 64), heads = 1 + int(rng() % 16);
    const int sms = 1 + int(rng() % 140), ctas = 1 + int(rng() % 4);
    const detail::SplitPlan p = detail::plan_splits(units, batch, heads, sms, ctas);
    ASSERT_GE(p.splits, 1);
    ASSERT_EQ(p.units_per_split % kAttnWarps, 0);
    ASSERT_GE(1LL * p.splits * p.units_per_split, units);
    ASSERT_LT(1LL * (p.splits - 1) * p.units_per_split, units) << "an empty split";
    const long long items = 1LL * batch * heads, places = 1LL * sms * ctas;
    const long long got = cost(units, p.splits, items, places);
    for (int s = 1; s <= units; ++s)
      ASSERT_LE(got, cost(units, s, items, places))
          << "units " << units << " items " << items << " places " << places << ": " << p.splits << " vs " << s;
  }
  // 32k tokens (513 units) x 8 KV heads on an H100 (132 SMs, 4 CTAs each): 2 blocks a warp in one wave,
  // not 1 a warp in two (the plan before: 92 vs 73 us); at batch 8 one wave (was 1088 CTAs, 2.06 waves).
  EXPECT_EQ(detail::plan_splits(513, 1, 8, 132, 4).splits, 65);
  EXPECT_EQ(detail::plan_splits(513, 8, 8, 132, 4).splits, 8);
  EXPECT_EQ(detail::plan_splits(17, 1, 8, 132, 4).splits, 5);  // 1k x 1: a block a warp
}

// The fused kernel's cut of a sequence's units (kernels/attention.cuh): every
// block once, the tail once, and the busiest warp's work as split_load (the
// plan's model) says, with the tail as a unit of its own or riding with the
// last block's split.
TEST(AttentionSplits, TailRidesWithTheLastBlocksSplitWhereThatKeepsABlockOffTheBusiestWarps) {
  // The kernel's rule, unit by unit: which warp of which split attends each block and the tail.
  auto kernel_load = [](int blocks, bool tail, bool rides, int ups, int splits, int warps, int tail_q) {
    const int count = blocks + (tail ? 1 : 0), v_tail = count - 1;
    const int cut = rides && tail ? v_tail : count;
    const int per = std::max(ups, (cut + splits - 1) / splits);
    long long worst = 0;
    int blocks_seen = 0, tails_seen = 0;
    for (int split = 0; split < splits; ++split) {
      const int v_begin = split * per, v_end = std::min(cut, v_begin + per);
      const bool tail_here =
          tail && (rides ? split == std::max(0, v_tail - 1) / per : v_tail >= v_begin && v_tail < v_end);
      const int v_blocks_end = std::min(v_end, tail ? v_tail : count);
      std::vector<long long> load(warps, 0);
      for (int v = v_begin; v < v_blocks_end; ++v, ++blocks_seen) load[(v - v_begin) % warps] += 4;
      if (tail_here) {
        load[(v_tail - v_begin) % warps] += tail_q;
        ++tails_seen;
      }
      worst = std::max(worst, *std::max_element(load.begin(), load.end()));
    }
    EXPECT_EQ(blocks_seen, blocks);
    EXPECT_EQ(tails_seen, tail ? 1 : 0);
    return worst;
  };
  std::mt19937 rng(5);
  for (int trial = 0; trial < 20000; ++trial) {
    const int blocks = int(rng() % (trial % 2 ? 40 : 3000)), warps = 4 << (rng() % 3);
    const bool tail = blocks == 0 || rng() % 4 != 0, rides = rng() % 2;
    // The plan's splits of `ups` units (a multiple of the warps, or not: the kernel's max(ups, ceil(u / splits))).
    const int ups = trial % 3 ? warps * (1 + int(rng() % 64)) : 1 + int(rng() % 300), tail_q = 1 + int(rng() % 6);
    const detail::SplitLoad s = detail::split_load(blocks, tail, rides, ups, warps, tail_q);
    ASSERT_EQ(s.quarters, kernel_load(blocks, tail, rides, ups, s.splits, warps, tail_q))
        << blocks << " blocks, tail " << tail << ", rides " << rides << ", " << ups << " a split of " << warps;
    if (HasFailure()) return;
    // The kernel's choice for a launch that cuts a sequence into at most `splits` splits (AttendParams::spread;
    // CUDA-graph plans fix it for the longest possible sequence and the chip, with ups = 1): riding only where
    // its busiest warp does less.
    if (!tail) continue;
    const int splits = rng() % 2 ? 1 + int(rng() % 40) : (blocks + 1 + ups - 1) / ups + int(rng() % 3);
    const long long own = kernel_load(blocks, true, false, ups, splits, warps, tail_q);
    const long long ride = kernel_load(blocks, true, true, ups, splits, warps, tail_q);
    ASSERT_EQ(detail::tail_rides(blocks, ups, splits, warps, tail_q), ride < own)
        << blocks << " blocks, " << ups << " a split of " << warps << ", " << splits << " splits";
  }
  // 32831 x 8 (512 blocks and a tail, 16-warp CTAs on 132 SMs): 2 splits of 16 blocks a warp, the tail with
  // the second; as a unit of its own, 2 splits of 17 a warp (3 of 16 would take two waves).
  const detail::SplitPlan ride = detail::plan_splits(513, 8, 8, 132, 1, 16, 1);
  EXPECT_TRUE(ride.tail_rides);
  EXPECT_EQ(ride.units_per_split, 256);
  EXPECT_EQ(ride.splits, 2);
  EXPECT_EQ(ride.load_quarters, 65);
  const detail::SplitPlan own = detail::plan_splits(513, 8, 8, 132, 1, 16, 0);
  EXPECT_FALSE(own.tail_rides);
  EXPECT_EQ(own.units_per_split, 272);
  // A tail on CUDA cores (fp32, or Codes8 with fp32 params: a little more than a block) stays a unit of its own;
  // Codes8 with fp16 or bf16 params goes on tensor cores as fp16 and bf16 rows do.
  EXPECT_FALSE(detail::plan_splits(513, 8, 8, 132, 1, 16, detail::tail_cost_quarters(int(DType::F32))).tail_rides);
  EXPECT_EQ(detail::tail_cost_quarters(int(DType::F16)), 1);
  EXPECT_EQ(detail::tail_cost_quarters(int(DType::BF16)), 1);
  // 4159 x 8: 2 blocks a warp instead of 3; 4159 x 1: the tail in a CTA of its own beside the blocks' (the chip
  // has room), not after a block.
  EXPECT_TRUE(detail::plan_splits(65, 8, 8, 132, 1, 16, 1).tail_rides);
  EXPECT_EQ(detail::plan_splits(65, 8, 8, 132, 1, 16, 1).units_per_split, 32);
  EXPECT_FALSE(detail::plan_splits(65, 1, 8, 132, 4, 4, 1).tail_rides);
  EXPECT_EQ(detail::plan_splits(65, 1, 8, 132, 4, 4, 1).splits, 17);
}

// The CTA size (kernels/attention_params.cuh, plan_attention): larger CTAs
// only where their first wave fills the chip, and each choice is a plan of
// plan_splits for that size, cheapest by the stated cost.
TEST(AttentionSplits, CtaSizeLargeAtFullLoadSmallForShortCalls) {
  const int warps[3] = {4, 8, 16}, h100[3] = {4, 2, 1};  // CTAs an SM of 4, 8, 16 warps at D = 128
  for (int i = 0; i < 3; ++i) EXPECT_EQ(detail::fused_cta_warps(128, 8, i), warps[i]);
  EXPECT_EQ(detail::fused_cta_warps(128, 16, 1), 0);  // two row tiles: 4 or 8 warps
  EXPECT_EQ(detail::fused_cta_warps(128, 16, 2), 8);
  EXPECT_EQ(detail::fused_cta_warps(256, 8, 2), 12);
  auto plan = [&](int units, int batch) { return detail::plan_attention(units, batch, 8, 132, warps, h100); };
  EXPECT_EQ(plan(17, 1).warps, 4);      // 1k x 1: 16 CTAs of 16 warps would sit on 16 SMs
  EXPECT_EQ(plan(513, 1).warps, 8);     // 32k x 1: 264 CTAs of 8 warps, 2 blocks a warp, one wave
  EXPECT_EQ(plan(513, 8).warps, 16);    // 32k x 8: 128 CTAs of 16 warps
  EXPECT_EQ(plan(65, 8).warps, 16);     // 4k x 8
  EXPECT_EQ(plan(2049, 1).warps, 8);    // 128k x 1: 120 CTAs of 16 warps cost more than 264 of 8
  const int only4[3] = {4, 0, 0};  // a shape with 4-warp CTAs only
  EXPECT_EQ(detail::plan_attention(513, 8, 8, 132, warps, only4).warps, 4);
  EXPECT_EQ(detail::plan_attention(513, 8, 8, 132, only4, h100).warps, 4);
  std::mt19937 rng(7);
  for (int trial = 0; trial < 2000; ++trial) {
    const int units = 1 + int(rng() % (trial % 3 == 0 ? 20 : 9000));
    const int batch = 1 + int(rng() % 64), heads = 1 + int(rng() % 16), sms = 1 + int(rng() % 140);
    const int ctas[3] = {1 + int(rng() % 4), int(rng() % 3), int(rng() % 2)};
    const detail::SplitPlan p = detail::plan_attention(units, batch, heads, sms, warps, ctas);
    int i = 0;
    while (warps[i] != p.warps) ASSERT_LT(++i, 3) << "a CTA size not offered: " << p.warps;
    ASSERT_GT(ctas[i], 0) << "a CTA size not built";
    const detail::SplitPlan s = detail::plan_splits(units, batch, heads, sms, ctas[i], p.warps);
    EXPECT_EQ(p.splits, s.splits);
    EXPECT_EQ(p.units_per_split, s.units_per_split);
    EXPECT_EQ(p.ctas_per_sm, ctas[i]);
    ASSERT_GE(1LL * p.splits * p.units_per_split, units);
    if (i > 0) EXPECT_GE(10LL * p.splits * batch * heads, 9LL * ctas[i] * sms) << "a large CTA for a call that leaves SMs idle";
  }
}

// CUDA-graph plans (Cache::make_plan) are made for max_tokens_per_seq; the kernel cuts each replayed
// sequence into at most plan_spread() splits of ceil(units / spread) units (AttendParams::spread).
TEST(AttentionSplits, GraphPlansSpreadShortSequencesOverOneWave) {
  const int warps[3] = {4, 8, 16}, h100[3] = {4, 2, 1};  // D = 128, one row tile
  for (const int batch : {1, 2, 8, 32}) {
    SCOPED_TRACE("batch " + std::to_string(batch));
    const long long items = 8LL * batch;  // 8 kv heads, one row tile a sequence
    const detail::SplitPlan plan = detail::plan_attention(2049, batch, 8, 132, warps, h100);  // 128k tokens
    int i = 0;
    while (warps[i] != plan.warps) ASSERT_LT(++i, 3);
    EXPECT_EQ(plan.ctas_per_sm, h100[i]);  // what make_plan passes on
    const int spread = detail::plan_spread(plan.splits, plan.ctas_per_sm, 132, items);
    ASSERT_GE(spread, 1);
    ASSERT_LE(spread, plan.splits);
    const long long places = 132LL * h100[i];
    if (items <= places) EXPECT_LE(items * spread, places) << "more CTAs with work than one wave holds";
    if (items * plan.splits <= places) EXPECT_EQ(spread, plan.splits) << "a one-wave plan's own splits";
    for (int units = 1; units <= 2049; ++units) {
      const int per = (units + spread - 1) / spread, used = (units + per - 1) / per;
      ASSERT_LE(used, spread) << units << " units";
      ASSERT_GE(1LL * used * per, units) << units << " units";
    }
  }
  // Batch 1 at 128k: 8-warp CTAs, 2 an SM, 33 places a kv head: 1k tokens (17 units) take 17 CTAs of one block.
  EXPECT_EQ(detail::plan_spread(detail::plan_attention(2049, 1, 8, 132, warps, h100).splits, 2, 132, 8), 33);
  EXPECT_EQ(detail::plan_spread(40, 1, 132, 1000), 1);  // more items than places: one split each
  EXPECT_EQ(detail::plan_spread(3, 2, 132, 8), 3);      // never more than the plan's splits
}

TEST(CacheConfig, ValidConfigEitherWorksOrFailsClearlyWithoutAGpu) {
  Config c;
  c.pool_bytes = 1 << 20;
  c.max_seqs = 2;
  c.max_tokens_per_seq = 256;
  try {
    Cache cache(c);
    const int s = cache.add_sequence();
    EXPECT_THROW(cache.tokens(s + 1, 0), Error);
    EXPECT_THROW(cache.tokens(s, 7), Error);
    EXPECT_THROW(cache.append(0, {s}, {1, 2}, nullptr, nullptr, nullptr), Error);
    EXPECT_THROW(cache.append(0, {s}, {1}, nullptr, nullptr, nullptr), Error);
    EXPECT_THROW(cache.append(0, {s}, {257}, nullptr, nullptr, nullptr), Error);
    EXPECT_THROW(cache.append(0, {s, s}, {1, 1}, nullptr, nullptr, nullptr), Error);
    EXPECT_THROW(cache.attend(0, {s}, {1, 2}, nullptr, nullptr, DType::F16, nullptr), Error);  // counts
    EXPECT_THROW(cache.attend(0, {s}, {2}, reinterpret_cast<void*>(16), reinterpret_cast<void*>(16), DType::F16,
                              nullptr),
                 Error);  // 2 queries are the sequence's last 2 tokens: it has none
    {  // counts below 1 cannot hide a batch over the limit (the launch's tables hold at most 256 entries)
      std::vector<int> counts(300, 1);
      counts.back() = -1000;
      EXPECT_THROW(cache.attend(0, std::vector<int>(300, s), counts, reinterpret_cast<void*>(16),
                                reinterpret_cast<void*>(16), DType::F16, nullptr),
                   Error);
    }
    EXPECT_EQ(cache.tokens(s, 0), 0);
    cache.add_sequence();
    EXPECT_THROW(cache.add_sequence(), Error);
  } catch (const Error& e) {
    // No device here: the message must say what failed.
    EXPECT_NE(std::string(e.what()).find("kvcomp:"), std::string::npos);
    std::printf("no GPU: %s\n", e.what());
  }
}

// Append planning (src/store_plan.hpp) is host logic over plain data: check
// the jobs and tail copies of one append against values worked out by hand.
namespace {

constexpr int kT = 64, kH = 2, kD = 64, kLayers = 2, kMaxSeqs = 4, kMaxBlocks = 4;
constexpr size_t kEsz = 2;  // F16

// Tails are [layer][K|V][slot][head][T][D]; the block table [layer][slot][max_blocks][head].
size_t tail_row_offset(int layer, Kind kind, int slot, int head, int row) {
  return ((((size_t(layer) * 2 + int(kind)) * kMaxSeqs + slot) * kH + head) * kT + row) * kD * kEsz;
}
uint32_t table_index(int layer, int slot, int64_t block, int head) {
  return uint32_t(((size_t(layer) * kMaxSeqs + slot) * kMaxBlocks + block) * kH + head);
}
ptrdiff_t offset(const void* p, const void* base) {
  return static_cast<const char*>(p) - static_cast<const char*>(base);
}

}  // namespace

TEST(StorePlan, JobsAndTailCopiesOfAnAppendOfThreeSequences) {
  const int layer = 1;
  const int64_t token_stride = 160, head_stride = 70;  // elements; not the default [tokens][H][D]
  const int total = 1 + 130 + 64;
  std::vector<uint8_t> k(size_t(total) * token_stride * kEsz), v(k.size());
  std::vector<uint8_t> tails(size_t(kLayers) * 2 * kMaxSeqs * kH * kT * kD * kEsz);
  detail::AppendRequest r{layer, kT, kH, kMaxSeqs, kMaxBlocks, 0, k.data(), v.data(), token_stride, head_stride,
                          kEsz, detail::TailLayout{tails.data(), kMaxSeqs, kH, kT, kD, kEsz, kT},
                          {{BoundMode::Relative, 0.01f}, {BoundMode::Absolute, 0.02f}},
                          {{BoundMode::Relative, 0.03f}, {BoundMode::Absolute, 0.04f}},
                          // slot, stored tokens, closed blocks, new tokens
                          {{2, 0, 0, 1}, {0, 63, 0, 130}, {3, 64, 1, 64}}};
  const detail::StorePlan plan = detail::plan_store(r);

  // Slot 2 (0 + 1): no block closes. Slot 0 (63 + 130 = 193): blocks 0, 1, 2
  // close; block 0 takes 63 tail rows and input token 1 (its first), block 1
  // input tokens 2..65, block 2 tokens 66..129. Slot 3 (64 + 64): block 1,
  // input tokens 131..194.
  struct Expected {
    int slot;
    int64_t block;
    int tail_tokens;
    int64_t in_token;
    uint32_t entry;
  };
  const Expected want[] = {{0, 0, 63, 1, 1}, {0, 1, 0, 2, 1}, {0, 2, 0, 66, 1}, {3, 1, 0, 131, 2}};
  ASSERT_EQ(plan.jobs.size(), std::size(want) * kH);
  for (size_t b = 0; b < std::size(want); ++b)
    for (int h = 0; h < kH; ++h) {
      SCOPED_TRACE("block " + std::to_string(b) + " head " + std::to_string(h));
      const detail::StoreJob& j = plan.jobs[b * kH + h];
      const Expected& e = want[b];
      const ptrdiff_t in = (e.in_token * token_stride + h * head_stride) * ptrdiff_t(kEsz);
      EXPECT_EQ(offset(j.k_in, k.data()), in);
      EXPECT_EQ(offset(j.v_in, v.data()), in);
      EXPECT_EQ(offset(j.k_tail, tails.data()), ptrdiff_t(tail_row_offset(layer, Kind::Key, e.slot, h, 0)));
      EXPECT_EQ(offset(j.v_tail, tails.data()), ptrdiff_t(tail_row_offset(layer, Kind::Value, e.slot, h, 0)));
      EXPECT_EQ(j.in_token_stride, token_stride);
      EXPECT_EQ(j.eb_k.value, h == 0 ? 0.01f : 0.02f);
      EXPECT_EQ(j.eb_v.value, h == 0 ? 0.03f : 0.04f);
      EXPECT_EQ(j.eb_k.mode, h == 0 ? BoundMode::Relative : BoundMode::Absolute);
      EXPECT_EQ(j.tail_tokens, e.tail_tokens);
      EXPECT_EQ(j.codebook, uint32_t((layer * kH + h) * 2));
      EXPECT_EQ(j.table_index, table_index(layer, e.slot, e.block, h));
      EXPECT_EQ(j.entry, e.entry);
    }
  // One entry per sequence: slot, new tokens, tokens and blocks held before, blocks it closes, its jobs.
  ASSERT_EQ(plan.entries.size(), 3u);
  const detail::AppendEntry want_entries[] = {
      {2, 1, 0, 0, 0, 0, 0}, {0, 130, 63, 0, 3, 0, 3 * kH}, {3, 64, 64, 1, 1, 3 * kH, 4 * kH}};
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(plan.entries[i].slot, want_entries[i].slot);
    EXPECT_EQ(plan.entries[i].n_tokens, want_entries[i].n_tokens);
    EXPECT_EQ(plan.entries[i].expected, want_entries[i].expected);
    EXPECT_EQ(plan.entries[i].closed, want_entries[i].closed);
    EXPECT_EQ(plan.entries[i].new_blocks, want_entries[i].new_blocks);
    EXPECT_EQ(plan.entries[i].job_begin, want_entries[i].job_begin);
    EXPECT_EQ(plan.entries[i].job_end, want_entries[i].job_end);
  }

  // Tail copies: slot 2 keeps its 1 token in tail row 0 (input token 0); slot
  // 0 keeps its last token (input token 130) in tail row 0; slot 3 keeps none.
  struct ExpectedCopy {
    int slot;
    int64_t in_token;
    int dst_row;
    int rows;
  };
  const ExpectedCopy want_copies[] = {{2, 0, 0, 1}, {0, 130, 0, 1}};
  ASSERT_EQ(plan.copies.size(), std::size(want_copies) * kH);
  for (size_t c = 0; c < std::size(want_copies); ++c)
    for (int h = 0; h < kH; ++h) {
      SCOPED_TRACE("copy " + std::to_string(c) + " head " + std::to_string(h));
      const detail::TailCopy& t = plan.copies[c * kH + h];
      const ExpectedCopy& e = want_copies[c];
      const ptrdiff_t in = (e.in_token * token_stride + h * head_stride) * ptrdiff_t(kEsz);
      EXPECT_EQ(offset(t.k_in, k.data()), in);
      EXPECT_EQ(offset(t.v_in, v.data()), in);
      EXPECT_EQ(offset(t.k_dst, tails.data()), ptrdiff_t(tail_row_offset(layer, Kind::Key, e.slot, h, e.dst_row)));
      EXPECT_EQ(offset(t.v_dst, tails.data()), ptrdiff_t(tail_row_offset(layer, Kind::Value, e.slot, h, e.dst_row)));
      EXPECT_EQ(t.in_token_stride, token_stride);
      EXPECT_EQ(t.rows, e.rows);
      EXPECT_EQ(t.entry, uint32_t(c));  // copy c belongs to input sequence c
    }
}

TEST(StorePlan, TailRowsAppendAfterTheHeldOnesWhenNoBlockCloses) {
  std::vector<uint8_t> k(size_t(10) * kH * kD * kEsz), v(k.size());
  std::vector<uint8_t> tails(size_t(kLayers) * 2 * kMaxSeqs * kH * kT * kD * kEsz);
  detail::AppendRequest r{0, kT, kH, kMaxSeqs, kMaxBlocks, 0, k.data(), v.data(), kH * kD, kD, kEsz,
                          detail::TailLayout{tails.data(), kMaxSeqs, kH, kT, kD, kEsz, kT},
                          {{}, {}}, {{}, {}}, {{1, 70, 1, 10}}};  // 6 tail rows held, 10 more: 16, no block closes
  const detail::StorePlan plan = detail::plan_store(r);
  EXPECT_TRUE(plan.jobs.empty());
  ASSERT_EQ(plan.copies.size(), size_t(kH));
  EXPECT_EQ(offset(plan.copies[1].k_in, k.data()), ptrdiff_t(kD * kEsz));
  EXPECT_EQ(offset(plan.copies[1].v_dst, tails.data()), ptrdiff_t(tail_row_offset(0, Kind::Value, 1, 1, 6)));
  EXPECT_EQ(plan.copies[1].rows, 10);
}

// What Cache::append does for a prefill (jobs made on the device) must plan
// everything else as the full plan does: plan_store without jobs gives the
// same entries, tail copies, first input tokens and job count (count_jobs
// agrees), and a plan reused across appends (its vectors keep their
// capacity) equals a fresh one.
TEST(StorePlan, WithoutJobsAndReusedPlansAgreeWithAFreshFullPlan) {
  const uint64_t seed = kvcomp_test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  auto pick = [&](int lo, int hi) { return lo + int(rng() % uint64_t(hi - lo + 1)); };
  std::vector<uint8_t> k(16), v(16), tails(16);  // addresses only: plans never read them
  detail::StorePlan reused;
  for (int round = 0; round < 200; ++round) {
    SCOPED_TRACE("round " + std::to_string(round));
    const int rollback = pick(0, 1) ? 0 : pick(1, kT);
    const int rows = rollback ? 2 * kT : kT;
    detail::AppendRequest r{pick(0, kLayers - 1), kT, kH, kMaxSeqs, kMaxBlocks, rollback, k.data(), v.data(),
                            int64_t(kH) * kD + pick(0, 3) * 8, kD, kEsz,
                            detail::TailLayout{tails.data(), kMaxSeqs, kH, kT, kD, kEsz, rows},
                            {{BoundMode::Relative, 0.01f}, {BoundMode::Absolute, 0.02f}},
                            {{BoundMode::Relative, 0.03f}, {BoundMode::Absolute, 0.04f}}, {}};
    for (int i = 0, n = pick(0, kMaxSeqs); i < n; ++i) {
      const int closed = pick(0, 3), held = pick(0, kT + rollback - 1);  // a tail as the cache leaves it
      r.seqs.push_back({i, int64_t(closed) * kT + held, closed, pick(0, 3) == 0 ? 0 : pick(1, 5 * kT)});
    }
    const detail::StorePlan full = detail::plan_store(r);
    detail::StorePlan no_jobs;
    detail::plan_store(r, no_jobs, false);
    detail::plan_store(r, reused, pick(0, 1) == 1);
    EXPECT_TRUE(no_jobs.jobs.empty());
    EXPECT_EQ(full.n_jobs, full.jobs.size());
    EXPECT_EQ(no_jobs.n_jobs, full.jobs.size());
    EXPECT_EQ(detail::count_jobs(r), full.jobs.size());
    for (const detail::StorePlan* p : {&no_jobs, &reused}) {
      ASSERT_EQ(p->entries.size(), full.entries.size());
      for (size_t i = 0; i < full.entries.size(); ++i) {
        const detail::AppendEntry &a = p->entries[i], &b = full.entries[i];
        EXPECT_TRUE(a.slot == b.slot && a.n_tokens == b.n_tokens && a.expected == b.expected &&
                    a.closed == b.closed && a.new_blocks == b.new_blocks && a.job_begin == b.job_begin &&
                    a.job_end == b.job_end)
            << "entry " << i;
      }
      EXPECT_EQ(p->tok0, full.tok0);
      ASSERT_EQ(p->copies.size(), full.copies.size());
      for (size_t i = 0; i < full.copies.size(); ++i) {
        const detail::TailCopy &a = p->copies[i], &b = full.copies[i];
        EXPECT_TRUE(a.k_in == b.k_in && a.v_in == b.v_in && a.k_dst == b.k_dst && a.v_dst == b.v_dst &&
                    a.in_token_stride == b.in_token_stride && a.rows == b.rows && a.entry == b.entry)
            << "copy " << i;
      }
    }
    if (!reused.jobs.empty()) {
      ASSERT_EQ(reused.jobs.size(), full.jobs.size());
      for (size_t i = 0; i < full.jobs.size(); ++i)
        EXPECT_TRUE(reused.jobs[i].k_in == full.jobs[i].k_in && reused.jobs[i].table_index == full.jobs[i].table_index &&
                    reused.jobs[i].entry == full.jobs[i].entry && reused.jobs[i].tail_tokens == full.jobs[i].tail_tokens)
            << "job " << i;
    }
  }
}

// Appends and rollbacks carried out on plain memory as the store kernels do
// (a job's rows: its tail rows, then input rows; then the tail copies), token
// ids in place of values: every closed block holds its T tokens in order, the
// tail ring holds every token past the closed blocks in row t % rows, blocks
// close only max_rollback tokens behind the newest, and a rollback (as
// Cache::rollback allows it) never reaches into a closed block.
TEST(StorePlan, AppendsAndRollbacksKeepEveryTokenInItsBlockOrTailRow) {
  const uint64_t seed = kvcomp_test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  auto pick = [&](int lo, int hi) { return lo + int(rng() % uint64_t(hi - lo + 1)); };
  constexpr int T = 32, H = 2, D = 8, S = 3, kBlocks = 200;
  constexpr int64_t kStride = H * D + 8;  // input token stride, elements
  for (int rollback : {0, 1, 7, T}) {
    SCOPED_TRACE("max_rollback " + std::to_string(rollback));
    const int rows = rollback ? 2 * T : T;
    std::vector<uint8_t> tails(size_t(2) * S * H * rows * D * kEsz);
    std::vector<int64_t> ring(size_t(2) * S * H * rows, -1);  // token id in each tail row
    std::vector<std::vector<int64_t>> blocks(size_t(S) * kBlocks * H);  // token ids of each closed block
    std::vector<std::vector<int64_t>> content(S);                       // each sequence's token ids
    std::vector<int32_t> closed(S, 0), high(S, 0);
    int64_t next_id = 0;
    const detail::TailLayout tl{tails.data(), S, H, T, D, kEsz, rows};
    auto ring_index = [&](const void* row_ptr) {
      const ptrdiff_t off = offset(row_ptr, tails.data());
      EXPECT_EQ(off % ptrdiff_t(D * kEsz), 0);
      return size_t(off / ptrdiff_t(D * kEsz));
    };
    for (int step = 0; step < 300; ++step) {
      SCOPED_TRACE("step " + std::to_string(step));
      if (rollback && pick(0, 2) == 0) {  // take back what Cache::rollback allows, or less
        const int s = pick(0, S - 1);
        const int32_t L = int32_t(content[s].size());
        high[s] = std::max(high[s], L);
        const int room = std::min(L, rollback - (high[s] - L));
        if (room <= 0) continue;
        const int n = pick(1, room);
        ASSERT_GE(L - n, closed[s] * T) << "a rollback the cache allows reaches into a closed block";
        content[s].resize(size_t(L - n));
        continue;
      }
      // An append: a few sequences, each a few tokens (sometimes several blocks' worth).
      std::vector<detail::SeqAppend> seqs;
      int total = 0;
      for (int s = 0; s < S; ++s)
        if (pick(0, 1)) {
          const int n = pick(0, 3) == 0 ? pick(T, 3 * T) : pick(0, 5);
          if (int(content[s].size()) + n + 2 * T > kBlocks * T) continue;
          seqs.push_back({s, int64_t(content[s].size()), closed[s], n});
          total += n;
        }
      std::vector<uint8_t> k(size_t(std::max(total, 1)) * kStride * kEsz), v(k.size());
      std::vector<int64_t> in_id(size_t(std::max(total, 1)));
      for (int i = 0; i < total; ++i) in_id[i] = next_id++;
      detail::AppendRequest r{0, T, H, S, kBlocks, rollback, k.data(), v.data(), kStride, D, kEsz, tl,
                              {{}, {}}, {{}, {}}, seqs};
      const detail::StorePlan plan = detail::plan_store(r);
      auto input_token = [&](const void* row_ptr, int h) {
        const ptrdiff_t off = offset(row_ptr, k.data()) - ptrdiff_t(h) * D * kEsz;
        EXPECT_EQ(off % ptrdiff_t(kStride * kEsz), 0);
        return int64_t(off / ptrdiff_t(kStride * kEsz));
      };
      // The jobs read the ring as it is before the append (the copies run after them).
      for (const detail::StoreJob& j : plan.jobs) {
        const detail::AppendEntry& e = plan.entries[j.entry];
        const int h = int(j.table_index % H);
        const int64_t block = int64_t(j.table_index / H) % kBlocks;
        ASSERT_EQ(int64_t(j.table_index / H / kBlocks), e.slot);
        std::vector<int64_t>& ids = blocks[(size_t(e.slot) * kBlocks + block) * H + h];
        ids.clear();
        for (int row = 0; row < T; ++row) {
          if (row < j.tail_tokens) {
            ids.push_back(ring[ring_index(j.k_tail) + row]);
            EXPECT_EQ(offset(j.v_tail, j.k_tail), ptrdiff_t(S) * H * rows * D * kEsz);  // V: the next kind
          } else {
            ids.push_back(in_id[input_token(j.k_in, h) + (row - j.tail_tokens)]);
          }
        }
        EXPECT_EQ(offset(j.v_in, v.data()), offset(j.k_in, k.data()));
      }
      for (const detail::TailCopy& c : plan.copies) {
        const size_t head_row0 = ring_index(c.k_dst);
        const int h = int(head_row0 / rows % H);
        for (int i = 0; i < c.rows; ++i) ring[head_row0 + i] = in_id[input_token(c.k_in, h) + i];
        EXPECT_LE(int(head_row0 % rows) + c.rows, rows) << "a copy runs past its ring";
      }
      // What the sequences hold now, and where every token must be.
      int64_t t0 = 0;
      for (size_t i = 0; i < seqs.size(); ++i) {
        const int s = seqs[i].slot, n = seqs[i].n_tokens;
        for (int t = 0; t < n; ++t) content[s].push_back(in_id[t0 + t]);
        t0 += n;
        closed[s] += plan.entries[i].new_blocks;
      }
      for (int s = 0; s < S; ++s) {
        const int64_t L = int64_t(content[s].size()), held = L - int64_t(closed[s]) * T;
        ASSERT_GE(held, 0);
        ASSERT_LT(held, T + rollback) << "a block that could close stayed open";
        for (int h = 0; h < H; ++h) {
          for (int32_t b = 0; b < closed[s]; ++b)
            for (int row = 0; row < T; ++row)
              ASSERT_EQ(blocks[(size_t(s) * kBlocks + b) * H + h][row], content[s][size_t(b) * T + row])
                  << "seq " << s << " head " << h << " block " << b << " row " << row;
          const size_t ring0 = ring_index(tl.row_ptr(0, s, h, Kind::Key));
          for (int64_t t = int64_t(closed[s]) * T; t < L; ++t)
            ASSERT_EQ(ring[ring0 + size_t(tl.ring_row(t))], content[s][size_t(t)])
                << "seq " << s << " head " << h << " tail token " << t;
        }
      }
    }
  }
}

TEST(PoolPages, PairsFillTheOpenPageThenOpenANewOne) {
  // Pages of 10 units; pairs of 4, 5, 0 (idle), 2, 7, 10 units.
  detail::PageCursor c{-1, 0};
  const uint32_t units[] = {4, 5, 0, 2, 7, 10};
  const bool fresh_want[] = {true, false, false, true, false, true};
  const uint32_t at_want[] = {0, 4, 0, 0, 2, 0};
  const uint32_t fill_want[] = {4, 9, 9, 2, 9, 10};
  int page = -1;
  for (size_t i = 0; i < std::size(units); ++i) {
    SCOPED_TRACE("pair " + std::to_string(i));
    uint32_t at = 99;
    const bool fresh = detail::place_pair(c, units[i], 10, at);
    EXPECT_EQ(fresh, fresh_want[i]);
    if (fresh) c.page = ++page;
    if (units[i]) EXPECT_EQ(at, at_want[i]);
    else EXPECT_EQ(at, 99u);  // an idle job is not placed
    EXPECT_EQ(c.fill16, fill_want[i]);
  }
  EXPECT_EQ(page, 2);
}

TEST(PoolPages, WalkPairsCountsAndPlacesAsPlacePairDoes) {
  // The place kernel's first pass against place_pair, pair by pair: idle
  // jobs, pairs larger than a page, sums that wrap, no page open or one open.
  std::mt19937 rng(7);
  auto pick = [&](uint32_t n) { return uint32_t(rng() % n); };
  for (int trial = 0; trial < 2000; ++trial) {
    SCOPED_TRACE("trial " + std::to_string(trial));
    const uint32_t P = std::vector<uint32_t>{1, 10, 37, 1024}[pick(4)];
    std::vector<uint32_t> units(pick(70));
    for (uint32_t& u : units) {
      const uint32_t kind = pick(20);
      u = kind < 4 ? 0 : kind < 18 ? 1 + pick(P) : kind == 18 ? P + pick(3) : UINT32_MAX - pick(2 * P + 2);
    }
    const detail::PageCursor start = pick(3) ? detail::PageCursor{-1, pick(2) ? 0u : pick(P + 1)}
                                             : detail::PageCursor{int32_t(pick(5)), pick(P + 2)};
    detail::PageCursor want = start;
    int32_t want_fresh = 0;
    std::vector<uint32_t> want_at(units.size(), 12345u);
    for (size_t j = 0; j < units.size(); ++j) {
      if (detail::place_pair(want, units[j], P, want_at[j])) {
        ++want_fresh;
        want.page = 0;
      }
    }
    std::vector<uint32_t> at(units.size(), 12345u);
    detail::PageCursor c = start;
    const int32_t fresh = detail::walk_pairs<8>([&](uint32_t j) { return units[j]; }, 0, uint32_t(units.size()), c, P,
                                                at.data());
    EXPECT_EQ(fresh, want_fresh);
    EXPECT_EQ(at, want_at);
    EXPECT_EQ(c.fill16, want.fill16);
    EXPECT_EQ(c.page >= 0, want.page >= 0);
    // In two parts, N dividing neither: the cursor carries over.
    std::fill(at.begin(), at.end(), 12345u);
    c = start;
    const uint32_t half = uint32_t(units.size() / 2);
    const int32_t fresh2 = detail::walk_pairs<3>([&](uint32_t j) { return units[j]; }, 0, half, c, P, at.data()) +
                           detail::walk_pairs<3>([&](uint32_t j) { return units[j]; }, half, uint32_t(units.size()),
                                                 c, P, at.data());
    EXPECT_EQ(fresh2, want_fresh);
    EXPECT_EQ(at, want_at);
    EXPECT_EQ(c.fill16, want.fill16);
  }
}

// Sliding windows (kernels/pool_state.cuh): the blocks trim_kernel drops are
// exactly those no query of any later attend call can see. Such a query sits
// at position p >= L - max_queries (an attend call's queries are a sequence's
// last ones) and sees tokens t with p - W < t <= p, or t < sinks.
TEST(PoolPages, DeadBlocksAreThoseNoLaterQueryCanSee) {
  std::mt19937 rng(99);
  for (int trial = 0; trial < 20000; ++trial) {
    const int T = 32 << (trial % 3), L = 1 + int(rng() % 3000), W = 1 + int(rng() % 700);
    const int max_queries = 1 + int(rng() % 256), sinks = trial % 2 ? int(rng() % 200) : 0;
    const int first = detail::first_live_block(L, W, max_queries, T);
    const int sink = detail::sink_blocks(sinks, T);
    for (int b = 0; b < L / T; ++b) {
      // The earliest query position gives the lowest window start; later queries see later tokens only.
      const int lowest = std::max(0, L - max_queries) - W + 1;
      bool seen = false;
      for (int t = b * T; t < (b + 1) * T && !seen; ++t) seen = t >= lowest || t < sinks;
      const bool dead = b < first && b >= sink;
      ASSERT_EQ(dead, !seen) << "T " << T << " L " << L << " W " << W << " max_queries " << max_queries
                             << " sinks " << sinks << " block " << b;
    }
  }
  EXPECT_EQ(detail::first_live_block(5000, 0, 4, 64), 0);  // full attention: nothing dies
}

TEST(PoolPages, APageHoldsAWorstCasePairAndLargePoolsGetQuarterMegabytePages) {
  const size_t worst = detail::worst_pair_bytes(64, 128);
  EXPECT_EQ(worst, format::block_bytes(Kind::Key, 64, 128, uint64_t(32) * format::max_lane_bits(64, 128)) +
                       format::block_bytes(Kind::Value, 64, 128, uint64_t(32) * format::max_lane_bits(64, 128)));
  const auto big = detail::plan_pages(size_t(1) << 30, 64, 64, 128);
  EXPECT_EQ(size_t(big.page_units16) * 16, size_t(256) << 10);
  EXPECT_EQ(big.pages, 4096);
  const auto small = detail::plan_pages(size_t(2) << 20, 16, 64, 128);  // 2 MiB / 32 = 64 KiB < worst
  EXPECT_EQ(small.page_units16, (worst + 15) / 16);
  EXPECT_EQ(small.pages, int((size_t(2) << 20) / (size_t(small.page_units16) * 16)));
  EXPECT_EQ(detail::plan_pages(worst - 16, 1, 64, 128).pages, 0);
}
