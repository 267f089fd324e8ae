// Fused attention vs a CPU float64 attention over the reference-decoded K/V,
// and vs uncompressed attention within the bound that the error bound implies.
#include <algorithm>
#include <cmath>
#include <functional>
#include <cstring>
#include <string>

#include "gpu_util.cuh"
#include "kvcomp/cache.hpp"
#include "kvcomp/reference.hpp"
#include "attention_ref.hpp"
#include "cache_ref.hpp"
#include "test_data.hpp"
#include "src/launch.hpp"

using namespace kvcomp;
using namespace kvcomp_test;

namespace {

struct SeqData {
  std::vector<float> k, v;  // [tokens][H][D], as appended (fp16-exact)
};

/// queries: query tokens per sequence (empty: one each, through the one-query
/// attend); query j of a sequence of L tokens sits at position L - n + j.
void run_attention_case(int H, int G, int D, DType q_type, const std::vector<int>& lengths, uint64_t seed,
                        bool one_append_call, int block_tokens = 64, const std::vector<int>& queries = {},
                        int window = 0, int sinks = 0, const ErrorBound* bounds = nullptr,
                        Dist v_dist = Dist::Gaussian, const std::function<void(const Cache&)>& inspect = {},
                        TailFormat tail_format = TailFormat::Input, int max_rollback = 0,
                        DType kv_type = DType::F16, float q_scale = 1.f) {
  Config cfg;
  cfg.tail_format = tail_format;
  cfg.max_rollback = max_rollback;
  if (bounds) {
    cfg.k_bound = bounds[0];
    cfg.v_bound = bounds[1];
  }
  cfg.window = window;
  cfg.sink_tokens = sinks;
  cfg.layers = 1;
  cfg.block_tokens = block_tokens;
  cfg.kv_heads = H;
  cfg.q_heads = H * G;
  cfg.head_dim = D;
  cfg.dtype = kv_type;
  cfg.max_seqs = int(lengths.size());
  int query_rows = 0;
  for (size_t b = 0; b < lengths.size(); ++b) query_rows += queries.empty() ? 1 : queries[b];
  cfg.max_attend_batch = query_rows;
  int longest = 1;
  for (int n : lengths) longest = std::max(longest, n);
  cfg.max_tokens_per_seq = longest;
  cfg.pool_bytes = size_t(longest) * lengths.size() * H * D * 2 * 2 + (size_t(16) << 20);
  Cache cache(cfg);
  const int B = int(lengths.size());
  std::vector<int> ids;
  std::vector<SeqData> data(B);
  for (int b = 0; b < B; ++b) {
    ids.push_back(cache.add_sequence());
    data[b].k = round_to(kv_type, make_data(Dist::OutlierChannels, lengths[b], H * D, seed + 2 * b));
    // SkewedRows: one large value in every (token, head) row.
    data[b].v = round_to(kv_type, v_dist == Dist::SkewedRows
                                         ? make_data(v_dist, lengths[b] * H, D, seed + 2 * b + 1)
                                         : make_data(v_dist, lengths[b], H * D, seed + 2 * b + 1));
  }
  if (one_append_call) {  // all sequences in one prefill call
    std::vector<float> k_all, v_all;
    for (auto& d : data) { k_all.insert(k_all.end(), d.k.begin(), d.k.end()); v_all.insert(v_all.end(), d.v.begin(), d.v.end()); }
    const auto kb = to_dtype_bytes(kv_type, k_all), vb = to_dtype_bytes(kv_type, v_all);
    DevBuf<uint8_t> dk(kb.size() + 2), dv(vb.size() + 2);
    dk.upload(kb);
    dv.upload(vb);
    cache.append(0, ids, lengths, dk.ptr, dv.ptr, 0);
    CUDA_LAUNCH_OK();
  } else {
    for (int b = 0; b < B; ++b) {
      const auto kb = to_dtype_bytes(kv_type, data[b].k), vb = to_dtype_bytes(kv_type, data[b].v);
      DevBuf<uint8_t> dk(kb.size() + 2), dv(vb.size() + 2);
      dk.upload(kb);
      dv.upload(vb);
      cache.append(0, {ids[b]}, {lengths[b]}, dk.ptr, dv.ptr, 0);
      CUDA_LAUNCH_OK();
    }
  }
  for (int b = 0; b < B; ++b) ASSERT_EQ(cache.tokens(ids[b], 0), lengths[b]);
  if (inspect) inspect(cache);
  if (::testing::Test::HasFatalFailure()) return;

  const int Hq = H * G;
  std::vector<int> n_q = queries.empty() ? std::vector<int>(B, 1) : queries, q_first(B, 0);
  for (int b = 1; b < B; ++b) q_first[b] = q_first[b - 1] + n_q[b - 1];
  const int rows = q_first[B - 1] + n_q[B - 1];
  auto q_raw = make_data(Dist::Gaussian, rows * Hq, D, seed + 99);
  for (float& x : q_raw) x *= q_scale;
  auto q = round_to(q_type, q_raw);
  const auto qb = to_dtype_bytes(q_type, q);
  DevBuf<uint8_t> dq(qb.size()), dout(qb.size());
  dq.upload(qb);
  CUDA_OK(cudaMemset(dout.ptr, 0xFF, qb.size()));  // NaN poison
  if (queries.empty()) cache.attend(0, ids, dq.ptr, dout.ptr, q_type, 0);
  else cache.attend(0, ids, queries, dq.ptr, dout.ptr, q_type, 0);
  CUDA_LAUNCH_OK();
  const auto ob = dout.download();

  // fp16 output rounds at 2^-11 relative, bf16 at 2^-8: the tolerance is the
  // 1e-3 of fp32 accumulation plus the output type's rounding.
  const double tol = q_type == DType::F16 ? 1e-3 : 8e-3;
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h) {
      std::vector<double> k, v;
      // Blocks before the first query's window (kept: the sinks) are not read: their pages may be reused.
      const int first_seen = window > 0 ? lengths[b] - n_q[b] - window + 1 : 0;
      // One append per sequence: blocks close once max_rollback newer tokens follow them (store_job.cuh).
      const int T = block_tokens, R = max_rollback;
      const int closed = lengths[b] >= T + R ? (lengths[b] - R) / T : 0;
      decoded_kv(cache, 0, ids[b], h, data[b].k, data[b].v, lengths[b], k, v, first_seen, sinks, closed);
      if (::testing::Test::HasFatalFailure()) return;
      // Exact (uncompressed) K/V for the error-bound check.
      std::vector<double> ke(size_t(lengths[b]) * D), ve(size_t(lengths[b]) * D);
      double max_v = 0;
      for (int t = 0; t < lengths[b]; ++t)
        for (int c = 0; c < D; ++c) {
          ke[size_t(t) * D + c] = data[b].k[(size_t(t) * H + h) * D + c];
          ve[size_t(t) * D + c] = data[b].v[(size_t(t) * H + h) * D + c];
          max_v = std::max(max_v, std::fabs(ve[size_t(t) * D + c]));
        }
      for (int j = 0; j < n_q[b]; ++j) {
        // Query j's view: the tokens up to its position, in the window (the reference gathers them).
        const int pos = lengths[b] - n_q[b] + j;
        const auto kv = visible_rows(k, pos, window, sinks, D), vv = visible_rows(v, pos, window, sinks, D);
        const auto kev = visible_rows(ke, pos, window, sinks, D), vev = visible_rows(ve, pos, window, sinks, D);
        const int seen = int(kv.size() / D);
        for (int g = 0; g < G; ++g) {
          const int hq = h * G + g;
          const size_t out_row = size_t(q_first[b] + j) * Hq + hq;
          const float* qv = &q[out_row * D];
          const auto ref = attention64(qv, kv.data(), vv.data(), seen, D);
          const auto exact = attention64(qv, kev.data(), vev.data(), seen, D);
          double num = 0, den = 0, max_dev = 0;
          for (int c = 0; c < D; ++c) {
            const float got = load_as_float(q_type, ob.data(), out_row * D + c);
            ASSERT_TRUE(std::isfinite(got)) << "unwritten or non-finite output: seq " << b << " query " << j
                                            << " head " << hq << " c " << c;
            num += (got - ref[c]) * (got - ref[c]);
            den += ref[c] * ref[c];
            max_dev = std::max(max_dev, std::fabs(got - exact[c]));
          }
          ASSERT_LE(std::sqrt(num / std::max(den, 1e-30)), tol)
              << "seq " << b << " (" << lengths[b] << " tokens) query " << j << " of " << n_q[b] << " q head " << hq;
          // The bound that follows from the error bound (attention_ref.hpp), plus rounding.
          const double bound = attention_deviation_bound(qv, kev, vev, kv, vv, seen, D) + 4 * tol * max_v;
          ASSERT_LE(max_dev, bound) << "seq " << b << " query " << j << " q head " << hq;
        }
      }
    }
}

}  // namespace

TEST(AttentionGpu, ContextLengthsAroundBlockEdgesInOneMixedBatch) {
  KVCOMP_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  run_attention_case(4, 4, 128, DType::F16, {1, 63, 64, 65, 1000, 200}, seed, true);
}

TEST(AttentionGpu, GqaGroupsHeadDimsAndBf16) {
  KVCOMP_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  // 3, 6 and 7 (Llama-3.2-3B, Qwen2.5): the mma rows hold up to 8 heads, the unused ones are zero.
  // 9..16 (Qwen3-235B: 16) take 16-row tiles (two mma row tiles on each decoded block).
  for (int G : {1, 2, 3, 6, 7, 8, 9, 12, 16}) {
    SCOPED_TRACE("G " + std::to_string(G));
    run_attention_case(2, G, 64, DType::F16, {130, 700}, seed + G, false);
    if (HasFatalFailure()) return;
  }
  run_attention_case(2, 4, 128, DType::BF16, {129, 513}, seed + 3, false);
  run_attention_case(2, 3, 128, DType::BF16, {129, 513}, seed + 5, false);
  // head_dim 80 (Phi-2, StableLM): 5 channel tiles of 16; the uncompressed tail's lanes 16..31 hold 2 channels, not 3.
  run_attention_case(2, 1, 80, DType::F16, {1, 63, 130, 700}, seed + 29, false);
  if (HasFatalFailure()) return;
  run_attention_case(1, 4, 80, DType::BF16, {129, 1000}, seed + 31, true, 32);
  if (HasFatalFailure()) return;
  // head_dim 96 (Phi-3): 6 channel tiles of 16.
  run_attention_case(2, 4, 96, DType::F16, {1, 64, 130, 700}, seed + 11, false);
  if (HasFatalFailure()) return;
  run_attention_case(2, 3, 96, DType::BF16, {129, 513}, seed + 13, true);
  if (HasFatalFailure()) return;
  // head_dim 256 (Gemma): 16 channel tiles, 3 CTAs per SM; 32- and 128-token blocks.
  run_attention_case(2, 8, 256, DType::F16, {1, 64, 130, 700}, seed + 17, false);
  if (HasFatalFailure()) return;
  run_attention_case(2, 7, 256, DType::BF16, {33, 500}, seed + 19, true, 32);
  if (HasFatalFailure()) return;
  run_attention_case(1, 2, 256, DType::F16, {127, 1300}, seed + 23, false, 128);
}

// Codes8 and Codes6 tails (Config::tail_format): the fused kernel reads the tail's codes; every vector, prefill
// too, went through them before its block was quantized (cache_ref.hpp's decoded_kv applies the same codes).
TEST(AttentionGpu, CodeTailsAroundBlockEdgesGroupsHeadDimsAndQueries) {
  KVCOMP_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  for (const TailFormat codes : {TailFormat::Codes8, TailFormat::Codes6}) {
    SCOPED_TRACE(codes == TailFormat::Codes8 ? "Codes8" : "Codes6");
    run_attention_case(4, 4, 128, DType::F16, {1, 63, 64, 65, 1000, 200}, seed, true, 64, {}, 0, 0, nullptr,
                       Dist::Gaussian, {}, codes);
    if (HasFatalFailure()) return;
    run_attention_case(2, 3, 64, DType::BF16, {5, 130, 700}, seed + 1, false, 32, {}, 0, 0, nullptr,
                       Dist::Gaussian, {}, codes);
    if (HasFatalFailure()) return;
    run_attention_case(2, 7, 96, DType::F16, {33, 500}, seed + 2, true, 64, {}, 0, 0, nullptr, Dist::Gaussian, {},
                       codes);
    if (HasFatalFailure()) return;
    run_attention_case(2, 8, 256, DType::F16, {1, 64, 130, 700}, seed + 3, false, 128, {}, 0, 0, nullptr,
                       Dist::Gaussian, {}, codes);
    if (HasFatalFailure()) return;
    // Multi-token queries over the tail, a window with sinks, and V rows with one large value each.
    run_attention_case(2, 4, 128, DType::F16, {40, 300, 129}, seed + 4, false, 64, {3, 5, 16}, 0, 0, nullptr,
                       Dist::SkewedRows, {}, codes);
    if (HasFatalFailure()) return;
    run_attention_case(2, 2, 128, DType::BF16, {100, 700}, seed + 5, true, 64, {1, 4}, 200, 4, nullptr,
                       Dist::Gaussian, {}, codes);
    if (HasFatalFailure()) return;
    // The tail's params in bf16 and fp32 (K/V of those types), head_dim 80 (lanes 16..31 hold 2 channels).
    run_attention_case(2, 4, 80, DType::BF16, {1, 63, 130, 700}, seed + 6, false, 64, {}, 0, 0, nullptr,
                       Dist::Gaussian, {}, codes, 0, DType::BF16);
    if (HasFatalFailure()) return;
    run_attention_case(2, 3, 128, DType::F16, {37, 600}, seed + 7, true, 32, {}, 0, 0, nullptr, Dist::Gaussian, {},
                       codes, 0, DType::F32);
    if (HasFatalFailure()) return;
  }
}

// Tails are attended on tensor cores (kernels/tail_attention.cuh), in the input's type and as Codes8 / Codes6
// rows with fp16 or bf16 params: fp16 and bf16 K/V, every head_dim, 1 to 16 query heads (16: two row tiles), tails of 1
// to 63 tokens around the chunk's 32, causal multi-token queries and windows with sinks inside the tail, V rows
// of very different ranges (SkewedRows: Codes8's per-token steps), and queries too large for fp16 operands (bf16
// q at 2^16, up to ~27000 in the kernel's log2 units: fp16 operands hold q / 2^e).
TEST(AttentionGpu, TailsOnTensorCoresInBothTypesAndFormatsHeadDimsGroupsAndMasks) {
  KVCOMP_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  int i = 0;
  for (TailFormat in : {TailFormat::Input, TailFormat::Codes8, TailFormat::Codes6})
    for (DType kv : {DType::BF16, DType::F16}) {
      SCOPED_TRACE(std::string(in == TailFormat::Codes8 ? "Codes8 " : in == TailFormat::Codes6 ? "Codes6 " : "Input ") +
                   (kv == DType::BF16 ? "bf16 K/V" : "fp16 K/V"));
      for (int D : {64, 80, 96, 128, 256}) {
        SCOPED_TRACE("D " + std::to_string(D));
        run_attention_case(2, 4, D, DType::BF16, {1, 31, 32, 33, 95, 127}, seed + ++i, true, 64, {}, 0, 0, nullptr,
                           Dist::Gaussian, {}, in, 0, kv);
        if (HasFatalFailure()) return;
      }
      for (int G : {1, 7, 16}) {
        SCOPED_TRACE("G " + std::to_string(G));
        run_attention_case(2, G, 128, DType::F16, {63, 600}, seed + ++i, false, 64, {}, 0, 0, nullptr,
                           Dist::Gaussian, {}, in, 0, kv);
        if (HasFatalFailure()) return;
      }
      run_attention_case(2, 4, 128, DType::F16, {60, 700, 129}, seed + ++i, false, 64, {3, 16, 2}, 0, 0, nullptr,
                         Dist::SkewedRows, {}, in, 0, kv);
      if (HasFatalFailure()) return;
      run_attention_case(2, 2, 128, DType::F16, {100, 1000}, seed + ++i, true, 128, {1, 4}, 40, 3, nullptr,
                         Dist::Gaussian, {}, in, 0, kv);
      if (HasFatalFailure()) return;
      run_attention_case(2, 4, 128, DType::BF16, {50, 700}, seed + ++i, false, 64, {}, 0, 0, nullptr,
                         Dist::Gaussian, {}, in, 0, kv, 65536.f);
      if (HasFatalFailure()) return;
    }
}

// Tails longer than a block (max_rollback = T = 128: up to 255 tokens, 8 chunks of 32): the chunks are spread
// over the CTA's warps, two a warp in a CTA of 4; exact, Codes8 and Codes6 tails.
TEST(AttentionGpu, TailsOfManyChunksSpreadOverTheWarps) {
  KVCOMP_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  for (TailFormat tail : {TailFormat::Input, TailFormat::Codes8, TailFormat::Codes6}) {
    SCOPED_TRACE(tail == TailFormat::Codes8 ? "Codes8" : tail == TailFormat::Codes6 ? "Codes6" : "Input");
    run_attention_case(2, 4, 128, DType::F16, {255, 500, 129, 300, 33}, seed, false, 128, {}, 0, 0, nullptr,
                       Dist::Gaussian, {}, tail, 128);
    if (HasFatalFailure()) return;
    run_attention_case(2, 3, 64, DType::BF16, {250, 700}, seed + 1, true, 128, {2, 3}, 0, 0, nullptr, Dist::Gaussian,
                       {}, tail, 100, DType::BF16);
    if (HasFatalFailure()) return;
    // Heavy-tailed V (Student t): a warp's second chunk has per-token steps of other powers of two than its first.
    run_attention_case(2, 4, 128, DType::F16, {254, 190}, seed + 2, false, 128, {}, 0, 0, nullptr, Dist::HeavyTailed,
                       {}, tail, 128);
    if (HasFatalFailure()) return;
  }
}

TEST(AttentionGpu, MultiQueryModelsWithManyQueryHeadsPerKvHead) {
  KVCOMP_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  // More than 16 query heads on a KV head take several row tiles (each decodes the blocks again): Falcon-7B
  // (71 on 1, head_dim 64; the last tile holds 7 rows), StarCoder (48 on 1, head_dim 128), the largest ratio
  // (128), head_dim 256 (tiles of 8 rows: 20 -> 3 tiles), and 3 query tokens of 48 heads (144 rows, 9 tiles).
  run_attention_case(1, 71, 64, DType::F16, {130, 700}, seed, false);
  if (HasFatalFailure()) return;
  run_attention_case(1, 48, 128, DType::BF16, {1, 129, 513}, seed + 1, true);
  if (HasFatalFailure()) return;
  run_attention_case(1, 128, 64, DType::F16, {65, 300}, seed + 2, true);
  if (HasFatalFailure()) return;
  run_attention_case(2, 20, 256, DType::F16, {33, 300}, seed + 3, false, 32);
  if (HasFatalFailure()) return;
  run_attention_case(1, 48, 128, DType::F16, {200, 64, 700}, seed + 4, true, 64, {3, 1, 2});
}

TEST(AttentionGpu, SlowValueChunksAreReplayedAndDecodedAgain) {
  KVCOMP_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  // V rows near their minimum with one large value each (code ~25 at eb 0.02): the V codebooks pick k = 0
  // and about 1.6% of V's pairs are PAIR_ESC, so every 32-token chunk is slow. A warp's first V chunk then
  // goes through the unchecked pass, its replay with p negated and the checked pass (kernels/attention.cuh);
  // later chunks run checked. The output must still match float64 attention.
  const ErrorBound bounds[2] = {{BoundMode::Relative, 0.05f}, {BoundMode::Relative, 0.02f}};
  auto v_at_k0 = [](const Cache& c) {
    for (int h = 0; h < c.config().kv_heads; ++h)
      ASSERT_EQ(c.codebook(0, h, Kind::Value).low_bits(), 0) << "kv head " << h << ": V runs checked from the "
                                                                 "start, the case would not take the replay path";
  };
  run_attention_case(2, 4, 128, DType::F16, {700, 130, 64}, seed, true, 64, {}, 0, 0, bounds, Dist::SkewedRows,
                     v_at_k0);
  if (HasFatalFailure()) return;
  run_attention_case(1, 7, 64, DType::BF16, {1000, 33}, seed + 1, false, 32, {}, 0, 0, bounds, Dist::SkewedRows,
                     v_at_k0);
}

TEST(AttentionGpu, MultiTokenQueriesAreCausalInMixedBatches) {
  KVCOMP_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  // Speculative verification (n up to 16) and prefill chunks next to plain decode in one call: queries
  // whose last tokens fall in the tail, straddle a block edge or fill whole blocks; n x G over 8 rows
  // takes several row tiles.
  run_attention_case(4, 4, 128, DType::F16, {1000, 65, 64, 3, 700, 130}, seed, true, 64, {4, 16, 1, 3, 7, 2});
  if (HasFatalFailure()) return;
  for (int G : {1, 3, 7, 16}) {
    SCOPED_TRACE("G " + std::to_string(G));
    run_attention_case(2, G, 64, DType::F16, {300, 33, 129}, seed + G, false, 32, {5, 33, 16});
    if (HasFatalFailure()) return;
  }
  run_attention_case(2, 2, 256, DType::BF16, {257, 40}, seed + 5, true, 128, {12, 40});
  if (HasFatalFailure()) return;
  run_attention_case(2, 4, 80, DType::F16, {300, 77}, seed + 7, false, 64, {3, 9});  // 16-row tiles at D = 80
  if (HasFatalFailure()) return;
  run_attention_case(2, 6, 96, DType::F16, {1500, 200}, seed + 6, false, 64, {128, 3});  // a prefill chunk
}

TEST(AttentionGpu, SlidingWindowWithSinks) {
  KVCOMP_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  // Windows inside a block, across blocks and longer than the sequence; sinks that share the window's
  // first block or lie blocks before it; multi-token queries whose windows differ.
  run_attention_case(2, 4, 128, DType::F16, {1, 50, 1000, 3000, 200}, seed, true, 64, {}, 100, 4);
  if (HasFatalFailure()) return;
  run_attention_case(2, 4, 128, DType::F16, {1000, 3000, 77}, seed + 1, false, 64, {8, 3, 5}, 300, 0);
  if (HasFatalFailure()) return;
  run_attention_case(2, 2, 64, DType::BF16, {5000, 100}, seed + 2, true, 32, {16, 2}, 40, 70);
  if (HasFatalFailure()) return;
  run_attention_case(1, 8, 256, DType::F16, {4000}, seed + 3, false, 128, {4}, 1024, 1);
}

// Format v4: V blocks with more tokens than channels (T 128, D 64/80/96) hold V's params per channel; the
// fused kernel divides o by each channel's step at a block's start and multiplies it back (plus the
// channel's min x the block's sum of p) at its end. Every phase: plain decode, GQA and 16-row tiles, bf16,
// multi-token queries with windows and sinks, code tails, escapes (raw values and 8-bit fields) and the
// unchecked pass replayed with p negated (SkewedRows at eb 0.02), constant channels (step 0).
TEST(AttentionGpu, ValueParamsPerChannelInBlocksOfMoreTokensThanChannels) {
  KVCOMP_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  run_attention_case(2, 4, 64, DType::F16, {1, 127, 128, 129, 700, 3000}, seed, true, 128);
  if (HasFatalFailure()) return;
  run_attention_case(2, 7, 80, DType::BF16, {129, 1000}, seed + 1, false, 128, {}, 0, 0, nullptr, Dist::Gaussian,
                     {}, TailFormat::Input, 0, DType::BF16);
  if (HasFatalFailure()) return;
  run_attention_case(1, 12, 96, DType::F16, {300, 257}, seed + 2, true, 128, {3, 1});  // 16-row tiles
  if (HasFatalFailure()) return;
  run_attention_case(2, 4, 64, DType::F16, {1000, 3000, 77}, seed + 3, false, 128, {8, 3, 5}, 300, 2);
  if (HasFatalFailure()) return;
  run_attention_case(2, 4, 64, DType::F16, {200, 900}, seed + 4, true, 128, {}, 0, 0, nullptr, Dist::Gaussian, {},
                     TailFormat::Codes6);
  if (HasFatalFailure()) return;
  const ErrorBound tight[2] = {{BoundMode::Absolute, 0.05f}, {BoundMode::Absolute, 0.01f}};
  run_attention_case(2, 4, 64, DType::F16, {1, 300, 700}, seed + 5, true, 128, {}, 0, 0, tight, Dist::HeavyTailed);
  if (HasFatalFailure()) return;
  const ErrorBound skew[2] = {{BoundMode::Relative, 0.05f}, {BoundMode::Relative, 0.02f}};
  run_attention_case(2, 4, 96, DType::F16, {700, 130}, seed + 6, true, 128, {}, 0, 0, skew, Dist::SkewedRows);
  if (HasFatalFailure()) return;
  run_attention_case(1, 4, 64, DType::F16, {600}, seed + 7, true, 128, {}, 0, 0, nullptr, Dist::ConstantChannels);
}

TEST(AttentionGpu, EscapedValuesTakeTheSlowPathInEveryPhase) {
  KVCOMP_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  // Absolute bounds far below the data's spread: codes of 15 and more (PAIR_ESC pairs with 8-bit fields)
  // everywhere, and codes over 8 bits (raw fp32 escapes) in K's outlier channels and V's heavy tail. The
  // warp decodes such groups out of line and adds the raw values' exact K score and V output terms.
  const ErrorBound tight[2] = {{BoundMode::Absolute, 0.05f}, {BoundMode::Absolute, 0.01f}};
  run_attention_case(2, 4, 128, DType::F16, {1, 100, 700}, seed, true, 64, {}, 0, 0, tight, Dist::HeavyTailed);
  if (HasFatalFailure()) return;
  run_attention_case(2, 12, 64, DType::BF16, {300, 65}, seed + 1, false, 32, {3, 1}, 0, 0, tight,
                     Dist::HeavyTailed);  // 16-row tiles
  if (HasFatalFailure()) return;
  const ErrorBound mild[2] = {{BoundMode::Absolute, 0.2f}, {BoundMode::Absolute, 0.1f}};  // rarer escapes
  run_attention_case(2, 3, 96, DType::F16, {1000, 129}, seed + 2, true, 128, {}, 0, 0, mild, Dist::HeavyTailed);
}

TEST(AttentionGpu, BlockSizesAndManyBlocksPerWarp) {
  KVCOMP_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  // Warps run K of one chunk with V of the previous one, across block edges:
  // 32- and 128-token blocks, and contexts that give each warp several blocks.
  for (int T : {32, 128}) {
    SCOPED_TRACE("T " + std::to_string(T));
    run_attention_case(2, 4, 128, DType::F16, {1, T - 1, T, T + 1, 9 * T + 3, 40 * T}, seed + T, true, T);
    if (HasFatalFailure()) return;
  }
}

TEST(AttentionGpu, LongContextSplitsAcrossTheChip) {
  KVCOMP_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  run_attention_case(2, 4, 128, DType::F16, {70000}, seed, false);
}

// Calls that fill the chip run in CTAs larger than 4 warps (plan_attention):
// a batch of 8 sequences of ~4k tokens over 8 KV heads (on an H100 one CTA
// an SM: 16 warps, 12 at head_dim 256, 8 with two row tiles at G = 16), one
// sequence of 32k tokens (two CTAs an SM: 8 warps); bf16 q too.
TEST(AttentionGpu, LargeCtasAtFullLoad) {
  KVCOMP_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  int dev = 0, sms = 0;
  CUDA_OK(cudaGetDevice(&dev));
  CUDA_OK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  const std::vector<int> batch8 = {4096, 4000, 3969, 4161, 4033, 4100, 3900, 4097}, one = {32768 + 37};
  // ride8's longest, 4159 tokens, is 64 blocks and a tail: the plan cuts the blocks into 2 splits of 2 blocks
  // a warp and the tail rides with the last (AttendParams::tail_rides); as a unit of its own it would give
  // split 0's warps a third block (batch8's 4161 tokens are 65 blocks and one token: no gain in riding).
  const std::vector<int> ride8 = {4159, 4000, 3969, 4100, 4033, 4096, 3900, 4097};
  struct Case {
    int D, G;
    const std::vector<int>* lengths;
    int size;  // the CTA size expected on an H100 (fused_cta_warps index)
    DType q_type;
    bool rides = false;  // the plan expected on an H100 (AttendParams::tail_rides)
    TailFormat tail = TailFormat::Input;
    DType kv = DType::F16;
  };
  const Case cases[] = {{128, 4, &batch8, 2, DType::F16}, {128, 4, &one, 1, DType::F16}, {64, 4, &batch8, 2, DType::F16},
                        {96, 4, &batch8, 2, DType::F16},  {256, 4, &batch8, 2, DType::F16}, {128, 16, &batch8, 2, DType::F16},
                        {128, 4, &batch8, 2, DType::BF16}, {128, 4, &ride8, 2, DType::F16, true},
                        {128, 7, &ride8, 2, DType::BF16, true}, {128, 4, &ride8, 2, DType::F16, true, TailFormat::Codes8},
                        {128, 4, &ride8, 2, DType::F16, false, TailFormat::Codes8, DType::F32},
                        {256, 4, &ride8, 2, DType::F16}};
  // Not riding: a tail on CUDA cores (Codes8 with fp32 params) costs a block (a third block is no worse); at
  // D = 256 (12 warps a CTA) 2 splits of 3 blocks a warp either way.
  for (const Case& c : cases) {
    const int rows = detail::attention_tile_rows(c.D, c.G);
    const int longest = *std::max_element(c.lengths->begin(), c.lengths->end());
    int warps[3], ctas[3];
    for (int i = 0; i < 3; ++i) {
      warps[i] = detail::fused_cta_warps(c.D, rows, i);
      ctas[i] = warps[i] > 0 ? detail::attention_ctas_per_sm(c.D, c.G, rows, warps[i]) : 0;
    }
    const int tail_q = longest % 64 ? detail::tail_cost_quarters(int(c.kv)) : 0;
    const detail::SplitPlan plan = detail::plan_attention(
        (longest + 63) / 64, int(c.lengths->size()) * ((c.G + rows - 1) / rows), 8, sms, warps, ctas, tail_q);
    SCOPED_TRACE("D " + std::to_string(c.D) + " G " + std::to_string(c.G) + " batch " +
                 std::to_string(c.lengths->size()) + ": CTAs of " + std::to_string(plan.warps) + " warps" +
                 (plan.tail_rides ? ", the tail riding" : "") + (c.tail == TailFormat::Codes8 ? ", Codes8 " : " ") +
                 dtype_name(c.kv));
    if (sms == 132) {  // the H100 the plan's constants were measured on
      EXPECT_EQ(plan.warps, warps[c.size]);
      EXPECT_EQ(plan.tail_rides, c.rides);
    }
    run_attention_case(8, c.G, c.D, c.q_type, *c.lengths, seed + c.D + c.G, true, 64, {}, 0, 0, nullptr,
                       Dist::Gaussian, {}, c.tail, 0, c.kv);
    if (HasFatalFailure()) return;
  }
}

// The baselines are measured against kvcomp, so they are checked too.
#include "src/baselines.hpp"

TEST(BaselinesGpu, FlashDecodeAndCublasMatchFloat64Attention) {
  KVCOMP_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  struct Shape { int G, D, N; };  // every head_dim and group size the flash kernel has; partial 16-token tiles
  for (const Shape sh : {Shape{4, 128, 777}, Shape{1, 64, 300}, Shape{8, 64, 1000}, Shape{8, 128, 65}, Shape{1, 128, 31},
                         Shape{4, 128, 1}, Shape{4, 64, 33}, Shape{8, 128, 1000}, Shape{4, 128, 4099}}) {
    SCOPED_TRACE("G " + std::to_string(sh.G) + " D " + std::to_string(sh.D) + " N " + std::to_string(sh.N));
    const int B = 2, H = 2, G = sh.G, D = sh.D, N = sh.N;
    const auto k = round_to(DType::F16, make_data(Dist::OutlierChannels, B * H * N, D, seed));
    const auto v = round_to(DType::F16, make_data(Dist::Gaussian, B * H * N, D, seed + 1));
    const auto q = round_to(DType::F16, make_data(Dist::Gaussian, B * H * G, D, seed + 2));
    DevBuf<uint8_t> dk(DType::F16, k), dv(DType::F16, v), dq(DType::F16, q), dout(q.size() * 2);
    const baseline::Fp16Attention a{reinterpret_cast<const __half*>(dk.ptr), reinterpret_cast<const __half*>(dv.ptr),
                                    B, H, H * G, D, N};
    DevBuf<float> ws(baseline::flash_workspace_floats(a, 132));
    DevBuf<uint8_t> cws(baseline::cublas_workspace_bytes(a));
    cublasHandle_t handle;
    ASSERT_EQ(cublasCreate(&handle), CUBLAS_STATUS_SUCCESS);
    for (int variant = 0; variant < 2; ++variant) {
      CUDA_OK(cudaMemset(dout.ptr, 0xFF, dout.n));
      if (variant == 0)
        baseline::flash_decode_fp16(a, reinterpret_cast<const __half*>(dq.ptr), reinterpret_cast<__half*>(dout.ptr),
                                    ws.ptr, 132, 0);
      else
        baseline::cublas_attention(handle, a, reinterpret_cast<const __half*>(dq.ptr),
                                   reinterpret_cast<__half*>(dout.ptr), cws.ptr, 0);
      CUDA_LAUNCH_OK();
      const auto ob = dout.download();
      for (int b = 0; b < B; ++b)
        for (int h = 0; h < H; ++h) {
          std::vector<double> kk(size_t(N) * D), vv(size_t(N) * D);
          for (size_t i = 0; i < kk.size(); ++i) {
            kk[i] = k[(size_t(b) * H + h) * N * D + i];
            vv[i] = v[(size_t(b) * H + h) * N * D + i];
          }
          for (int g = 0; g < G; ++g) {
            const size_t row = (size_t(b) * H * G + h * G + g) * D;
            const auto ref = attention64(&q[row], kk.data(), vv.data(), N, D);
            double num = 0, den = 0;
            for (int c = 0; c < D; ++c) {
              const float got = load_as_float(DType::F16, ob.data(), row + c);
              ASSERT_TRUE(std::isfinite(got));
              num += (got - ref[c]) * (got - ref[c]);
              den += ref[c] * ref[c];
            }
            // cuBLAS rounds P to fp16 before P.V: allow 3e-3 there.
            ASSERT_LE(std::sqrt(num / den), variant == 0 ? 1e-3 : 3e-3) << (variant == 0 ? "flash" : "cublas");
          }
        }
    }
    cublasDestroy(handle);
  }
}

namespace {

constexpr int kSeqDefault = -1, kSeqShared = -2;  // check_flash's seq_extra besides >= 0

/// flash_decode_fp16 against float64 attention for B sequences of N tokens, planned for `sms`
/// multiprocessors (sms = 1: one split, the kernel writes the output; 132: many, merge_kernel). Layout:
/// spare < 0: the default head stride N D, else (N + spare) D (spare rows hold values a stray read
/// would show); seq_extra: kSeqDefault (H head strides), kSeqShared (seq_stride 0: every query reads
/// sequence 0) or that many elements beyond H head strides.
void check_flash(int B, int H, int G, int D, int N, int sms, int spare, int seq_extra, uint64_t seed) {
  SCOPED_TRACE("B " + std::to_string(B) + " H " + std::to_string(H) + " G " + std::to_string(G) + " D " +
               std::to_string(D) + " N " + std::to_string(N) + " sms " + std::to_string(sms) + " spare " +
               std::to_string(spare) + " seq_extra " + std::to_string(seq_extra));
  const int cap = N + std::max(spare, 0);
  const int64_t head_stride = int64_t(cap) * D;
  const int64_t seq_stride = seq_extra == kSeqShared ? 0 : head_stride * H + std::max(seq_extra, 0);
  const size_t elems = seq_extra == kSeqShared ? size_t(head_stride) * H : size_t(seq_stride) * B;
  const int rows = int((elems + D - 1) / D);
  auto k = round_to(DType::F16, make_data(Dist::OutlierChannels, rows, D, seed));
  auto v = round_to(DType::F16, make_data(Dist::Gaussian, rows, D, seed + 1));
  const int kv_seqs = seq_extra == kSeqShared ? 1 : B;
  for (int s = 0; s < kv_seqs; ++s)
    for (int h = 0; h < H; ++h)
      for (int t = N; t < cap; ++t)
        for (int c = 0; c < D; ++c) {
          const size_t i = size_t(s * seq_stride + h * head_stride) + size_t(t) * D + c;
          k[i] = 30000.f;
          v[i] = -30000.f;
        }
  const auto q = round_to(DType::F16, make_data(Dist::Gaussian, B * H * G, D, seed + 2));
  DevBuf<uint8_t> dk(DType::F16, k), dv(DType::F16, v), dq(DType::F16, q), dout(q.size() * 2);
  const baseline::Fp16Attention a{reinterpret_cast<const __half*>(dk.ptr), reinterpret_cast<const __half*>(dv.ptr),
                                  B, H, H * G, D, N, seq_extra == kSeqDefault ? -1 : seq_stride,
                                  spare < 0 ? -1 : head_stride};
  DevBuf<float> ws(std::max<size_t>(baseline::flash_workspace_floats(a, sms), 1));
  CUDA_OK(cudaMemset(dout.ptr, 0xFF, dout.n));  // NaN poison
  baseline::flash_decode_fp16(a, reinterpret_cast<const __half*>(dq.ptr), reinterpret_cast<__half*>(dout.ptr), ws.ptr,
                              sms, 0);
  CUDA_LAUNCH_OK();
  const auto ob = dout.download();
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h) {
      const size_t at = size_t(b) * seq_stride + size_t(h) * head_stride;
      for (int g = 0; g < G; ++g) {
        const size_t row = (size_t(b) * H * G + h * G + g) * D;
        const auto ref = attention64(&q[row], &k[at], &v[at], N, D);
        double num = 0, den = 0;
        for (int c = 0; c < D; ++c) {
          const float got = load_as_float(DType::F16, ob.data(), row + c);
          ASSERT_TRUE(std::isfinite(got)) << "seq " << b << " q head " << h * G + g << " c " << c;
          num += (got - ref[c]) * (got - ref[c]);
          den += ref[c] * ref[c];
        }
        ASSERT_LE(std::sqrt(num / den), 1e-3) << "seq " << b << " q head " << h * G + g;
      }
    }
}

}  // namespace

TEST(BaselinesGpu, FlashDecodeTokenCountsSplitsAndStrides) {
  KVCOMP_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  // Token counts around the 16-token tiles and the warps' interleaving (4 tiles a round); sms 1 plans one
  // split up to 4096 tokens (the kernel writes the output; each warp's ring wraps many times at 1000),
  // 2 at 4099; sms 132 plans many.
  for (int N : {1, 15, 16, 17, 31, 33, 64, 65, 1000, 4099})
    for (int sms : {1, 132}) {
      check_flash(2, 2, 4, 128, N, sms, -1, kSeqDefault, seed + N);
      if (HasFatalFailure()) return;
    }
  check_flash(3, 2, 8, 64, 1000, 7, -1, kSeqDefault, seed + 1);
  if (HasFatalFailure()) return;
  check_flash(1, 1, 1, 128, 4099, 132, -1, kSeqDefault, seed + 2);  // 264 splits wanted, 65 made (4 tiles each)
  if (HasFatalFailure()) return;
  // Spare capacity per head and between sequences; every query reading one sequence (seq_stride 0).
  check_flash(2, 3, 4, 128, 1000, 132, 24, 320, seed + 3);
  if (HasFatalFailure()) return;
  check_flash(2, 2, 8, 64, 77, 1, 8, 0, seed + 4);
  if (HasFatalFailure()) return;
  check_flash(3, 2, 4, 128, 333, 132, 0, kSeqShared, seed + 5);
  if (HasFatalFailure()) return;
  check_flash(2, 2, 1, 64, 40, 132, 16, kSeqShared, seed + 6);
}

TEST(BaselinesGpu, FlashDecodeLongContextSplits) {
  KVCOMP_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  check_flash(1, 2, 4, 128, 70000, 132, -1, kSeqDefault, seed);  // 4375 full tiles, 34 a split: 129 splits a head
  if (HasFatalFailure()) return;
  check_flash(1, 2, 8, 128, 70001, 132, -1, kSeqDefault, seed + 1);  // and one token more
}
