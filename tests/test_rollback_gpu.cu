// Cache::rollback on the GPU (speculative decoding): draft tokens appended,
// attended as multi-token queries and partly taken back leave a cache whose
// closed blocks equal, bit for bit, those of a cache given only the accepted
// tokens; attention over tails longer than a block (Config::max_rollback)
// matches float64, with and without a sliding window; plan-based steps with
// rollback room store what eager appends store; a fork copies the tail ring;
// rollbacks past the room are clear errors that change nothing.
#include <algorithm>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "attention_ref.hpp"
#include "cache_ref.hpp"
#include "gpu_util.cuh"
#include "kvcomp/cache.hpp"
#include "test_data.hpp"

using namespace kvcomp;
using namespace kvcomp_test;

namespace {

Config rollback_config(int max_rollback) {
  Config c;
  c.layers = 2;
  c.kv_heads = 2;
  c.q_heads = 6;  // G = 3
  c.head_dim = 128;
  c.block_tokens = 32;
  c.max_rollback = max_rollback;
  c.layer_windows = {0, 40};  // layer 1: a sliding window (with sinks) over tails longer than a block
  c.sink_tokens = 4;
  c.max_seqs = 4;
  c.max_attend_batch = 16;
  c.max_tokens_per_seq = 4096;
  c.pool_bytes = size_t(32) << 20;
  return c;
}

/// A pool of fp16 tokens on the host (values exactly representable): K with
/// outlier channels, V Gaussian, [n][H][D].
struct TokenPool {
  int H, D;
  std::vector<float> k, v;
  TokenPool(int n, int H_, int D_, uint64_t seed)
      : H(H_), D(D_), k(round_to(DType::F16, make_data(Dist::OutlierChannels, n, H_ * D_, seed))),
        v(round_to(DType::F16, make_data(Dist::Gaussian, n, H_ * D_, seed + 1))) {}
  /// Rows `ids` one after the other, [ids][H][D].
  std::vector<float> rows(const std::vector<float>& x, const std::vector<int>& ids) const {
    std::vector<float> out;
    const size_t row = size_t(H) * D;
    for (int id : ids) out.insert(out.end(), x.begin() + id * row, x.begin() + (id + 1) * row);
    return out;
  }
};

/// Appends tokens `ids` of the pool to `seq` in every layer.
void append_ids(Cache& c, int seq, const TokenPool& p, const std::vector<int>& ids) {
  if (ids.empty()) return;
  DevBuf<uint8_t> k(ids.size() * p.H * p.D * 2), v(k.n);
  k.upload(to_dtype_bytes(DType::F16, p.rows(p.k, ids)));
  v.upload(to_dtype_bytes(DType::F16, p.rows(p.v, ids)));
  for (int l = 0; l < c.config().layers; ++l) c.append(l, {seq}, {int(ids.size())}, k.ptr, v.ptr, 0);
  CUDA_OK(cudaDeviceSynchronize());
}

/// Closed blocks of the one live sequence of `c` in `layer` (stats: tokens minus tail tokens).
int closed_blocks(const Cache& c, int layer) {
  const LayerStats s = c.stats().per_layer[layer];
  return int((s.tokens - s.tail_tokens) / c.config().block_tokens);
}

/// The last n tokens of `seq` (its content: pool ids) as queries, every
/// layer, against float64 attention over the rows each sees of the stored
/// K/V (blocks through the reference decoder, the tail exact).
void check_attention(Cache& cache, int seq, const TokenPool& p, const std::vector<int>& content, int n,
                     uint64_t seed) {
  const auto& cfg = cache.config();
  const int D = cfg.head_dim, L = int(content.size());
  const auto q = round_to(DType::F16, make_data(Dist::Gaussian, n * cfg.q_heads, D, seed));
  const auto qb = to_dtype_bytes(DType::F16, q);
  DevBuf<uint8_t> dq(qb.size()), dout(qb.size());
  dq.upload(qb);
  const std::vector<float> k_in = p.rows(p.k, content), v_in = p.rows(p.v, content);
  for (int layer = 0; layer < cfg.layers; ++layer) {
    SCOPED_TRACE("layer " + std::to_string(layer));
    ASSERT_EQ(cache.tokens(seq, layer), L);
    const int window = cfg.layer_windows[layer], sinks = window > 0 ? cfg.sink_tokens : 0;
    CUDA_OK(cudaMemset(dout.ptr, 0xFF, qb.size()));
    cache.attend(layer, {seq}, {n}, dq.ptr, dout.ptr, DType::F16, 0);
    CUDA_LAUNCH_OK();
    expect_attention_matches_float64(cache, layer, seq, q, dout.download(), k_in, v_in, L, n, window, sinks,
                                     closed_blocks(cache, layer));
    if (::testing::Test::HasFatalFailure()) return;
  }
}

}  // namespace

namespace {

void run_speculative_steps_match_a_cache_given_only_the_accepted_tokens(TailFormat tail) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  auto pick = [&](int lo, int hi) { return lo + int(rng() % uint64_t(hi - lo + 1)); };
  const int R = 8;
  Config cfg = rollback_config(R);
  cfg.tail_format = tail;
  const int T = cfg.block_tokens;
  TokenPool pool(1200, cfg.kv_heads, cfg.head_dim, seed);
  int next = 0;
  auto fresh = [&](int n) {
    std::vector<int> ids(n);
    for (int& id : ids) id = next++;
    return ids;
  };
  // `spec`: each step appends k <= R drafts, attends them (k queries), takes back the rejected ones.
  // `plain`: the same prompt, then only the accepted tokens.
  Cache spec(cfg), plain(cfg);
  const int s = spec.add_sequence(), r = plain.add_sequence();
  std::vector<int> content = fresh(70);  // closes one block (70 - 8 >= 32): both build codebooks from it
  append_ids(spec, s, pool, content);
  append_ids(plain, r, pool, content);
  int max_tail = 0;
  for (int step = 0; step < 60; ++step) {
    SCOPED_TRACE("step " + std::to_string(step));
    const int k = pick(1, R), accepted = pick(0, k);
    const std::vector<int> drafts = fresh(k);
    append_ids(spec, s, pool, drafts);
    std::vector<int> with_drafts = content;
    with_drafts.insert(with_drafts.end(), drafts.begin(), drafts.end());
    const int b0 = closed_blocks(spec, 0);
    max_tail = std::max(max_tail, int(with_drafts.size()) - b0 * T);
    if (step % 4 == 0 || step < 3) check_attention(spec, s, pool, with_drafts, k, seed + step);
    if (::testing::Test::HasFatalFailure()) return;
    spec.rollback(s, k - accepted);
    content.insert(content.end(), drafts.begin(), drafts.begin() + accepted);
    append_ids(plain, r, pool, std::vector<int>(drafts.begin(), drafts.begin() + accepted));
    ASSERT_EQ(closed_blocks(spec, 0), b0) << "a rollback never reopens a block";
  }
  EXPECT_GT(max_tail, T) << "tails longer than a block were attended";
  // Both hold the accepted tokens; every block both have closed is the same, bit for bit.
  for (int l = 0; l < cfg.layers; ++l) {
    ASSERT_EQ(spec.tokens(s, l), int64_t(content.size()));
    ASSERT_EQ(plain.tokens(r, l), int64_t(content.size()));
    const int a = closed_blocks(spec, l), b = closed_blocks(plain, l);
    EXPECT_GE(a, b);  // spec may close a block a few tokens earlier (at the drafts' peak)
    EXPECT_LE(a, b + 1);
    for (int blk = 0; blk < std::min(a, b); ++blk)
      for (int h = 0; h < cfg.kv_heads; ++h)
        for (Kind kind : {Kind::Key, Kind::Value}) {
          if (cfg.layer_windows[l] > 0 && (blk + 1) * T + cfg.max_attend_batch + R + cfg.layer_windows[l] - 1 <=
                                              int(content.size()) && blk * T >= cfg.sink_tokens)
            continue;  // behind the window: read_block refuses it
          ASSERT_EQ(spec.read_block(l, s, h, blk, kind, 0), plain.read_block(l, r, h, blk, kind, 0))
              << "layer " << l << " block " << blk << " head " << h;
        }
  }
  check_attention(spec, s, pool, content, 4, seed + 1000);
  check_attention(plain, r, pool, content, 4, seed + 1000);
  if (::testing::Test::HasFatalFailure()) return;

  // A fork copies the tail ring: the child attends as its parent does, bit for bit, and rolls back on its own.
  const int child = spec.fork(s);
  const auto qb = to_dtype_bytes(DType::F16, round_to(DType::F16, make_data(Dist::Gaussian, cfg.q_heads,
                                                                            cfg.head_dim, seed + 5)));
  DevBuf<uint8_t> dq(qb.size()), o1(qb.size()), o2(qb.size());
  dq.upload(qb);
  for (int l = 0; l < cfg.layers; ++l) {
    spec.attend(l, {s}, dq.ptr, o1.ptr, DType::F16, 0);
    spec.attend(l, {child}, dq.ptr, o2.ptr, DType::F16, 0);
    CUDA_LAUNCH_OK();
    ASSERT_EQ(o1.download(), o2.download()) << "layer " << l;
  }
  // The parent goes; the child appends drafts, attends them, takes them back, attends again.
  spec.remove_sequence(s);
  const std::vector<int> more = fresh(R);
  append_ids(spec, child, pool, more);
  std::vector<int> with_more = content;
  with_more.insert(with_more.end(), more.begin(), more.end());
  check_attention(spec, child, pool, with_more, R, seed + 2000);
  spec.rollback(child, R);
  check_attention(spec, child, pool, content, 2, seed + 3000);
  if (::testing::Test::HasFatalFailure()) return;
  spec.remove_sequence(child);
  EXPECT_EQ(spec.stats().pool_bytes_in_use, 0u);
  CUDA_LAUNCH_OK();
}

}  // namespace

TEST(RollbackGpu, SpeculativeStepsMatchACacheGivenOnlyTheAcceptedTokens) {
  KVCOMP_REQUIRE_GPU();
  run_speculative_steps_match_a_cache_given_only_the_accepted_tokens(TailFormat::Input);
}

// Codes8 tails longer than a block (rollback room), windows with sinks.
TEST(RollbackGpu, SpeculativeStepsMatchACacheGivenOnlyTheAcceptedTokensWithCodes8Tails) {
  KVCOMP_REQUIRE_GPU();
  run_speculative_steps_match_a_cache_given_only_the_accepted_tokens(TailFormat::Codes8);
}

TEST(RollbackGpu, SpeculativeStepsMatchACacheGivenOnlyTheAcceptedTokensWithCodes6Tails) {
  KVCOMP_REQUIRE_GPU();
  run_speculative_steps_match_a_cache_given_only_the_accepted_tokens(TailFormat::Codes6);
}

// Plan-based decode (the device makes the jobs: kernels/decode_jobs.cuh) with
// rollback room closes the same blocks at the same tokens as eager appends of
// one token, and attends the same (bit for bit, through plans of the same
// splits); rollbacks between steps included.
TEST(RollbackGpu, PlanStepsWithRollbackRoomStoreWhatEagerAppendsStore) {
  KVCOMP_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  for (int R : {1, 5, 32}) {
    SCOPED_TRACE("max_rollback " + std::to_string(R));
    Config cfg = rollback_config(R);
    cfg.layer_windows = {};
    const int H = cfg.kv_heads, D = cfg.head_dim, T = cfg.block_tokens, B = 2;
    TokenPool pool(600, H, D, seed + R);
    Cache planned(cfg), eager(cfg);
    std::vector<int> ps, es;
    for (int b = 0; b < B; ++b) {
      ps.push_back(planned.add_sequence());
      es.push_back(eager.add_sequence());
    }
    const DecodePlan plan = planned.make_plan(B);
    planned.set_plan(plan, ps, 0);
    const DecodePlan eplan = eager.make_plan(B);  // attends only: the same splits as `plan`
    eager.set_plan(eplan, es, 0);
    DevBuf<uint8_t> k(size_t(B) * H * D * 2), v(k.n), q(size_t(B) * cfg.q_heads * D * 2), o1(q.n), o2(q.n);
    int next = 0;
    for (int step = 0; step < 3 * T + 11; ++step) {
      SCOPED_TRACE("step " + std::to_string(step));
      const std::vector<int> ids{next, next + 1};
      next += 2;
      k.upload(to_dtype_bytes(DType::F16, pool.rows(pool.k, ids)));
      v.upload(to_dtype_bytes(DType::F16, pool.rows(pool.v, ids)));
      q.upload(to_dtype_bytes(DType::F16, round_to(DType::F16, make_data(Dist::Gaussian, B * cfg.q_heads, D,
                                                                         seed + step))));
      const size_t row = size_t(H) * D * 2;
      for (int l = 0; l < cfg.layers; ++l) {
        planned.append(plan, l, k.ptr, v.ptr, 0);
        for (int b = 0; b < B; ++b) eager.append(l, {es[b]}, {1}, k.ptr + b * row, v.ptr + b * row, 0);
        planned.attend(plan, l, q.ptr, o1.ptr, DType::F16, 0);
        eager.attend(eplan, l, q.ptr, o2.ptr, DType::F16, 0);
        CUDA_LAUNCH_OK();
        ASSERT_EQ(o1.download(), o2.download()) << "layer " << l;
      }
      planned.check(0);
      if (step % 7 == 6) {  // take back one or two tokens of sequence 0 (within the room: one a step is appended)
        const int n = std::min(R, 1 + int(rng() % 2));
        planned.rollback(ps[0], n);
        eager.rollback(es[0], n);
      }
    }
    for (int b = 0; b < B; ++b)
      for (int l = 0; l < cfg.layers; ++l) {
        ASSERT_EQ(planned.tokens(ps[b], l), eager.tokens(es[b], l));
        for (int64_t blk = 0; blk < (planned.tokens(ps[b], l) - R) / T; ++blk)
          for (int h = 0; h < H; ++h)
            for (Kind kind : {Kind::Key, Kind::Value})
              ASSERT_EQ(planned.read_block(l, ps[b], h, blk, kind, 0), eager.read_block(l, es[b], h, blk, kind, 0))
                  << "sequence " << b << " layer " << l << " block " << blk;
      }
    CUDA_LAUNCH_OK();
  }
}

TEST(RollbackGpu, RollbackPastItsRoomIsAClearErrorAndChangesNothing) {
  KVCOMP_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  auto expect_error = [](auto&& call, const std::string& needle) {
    try {
      call();
      ADD_FAILURE() << "no error; wanted one containing: " << needle;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  {
    Config cfg = rollback_config(0);
    Cache c(cfg);
    TokenPool pool(16, cfg.kv_heads, cfg.head_dim, seed);
    const int s = c.add_sequence();
    append_ids(c, s, pool, {0, 1, 2});
    expect_error([&] { c.rollback(s, 1); }, "can take back at most 0 tokens");
    EXPECT_EQ(c.tokens(s, 0), 3);
    c.rollback(s, 0);  // nothing to do
  }
  const int R = 4;
  Config cfg = rollback_config(R);
  Cache c(cfg);
  TokenPool pool(64, cfg.kv_heads, cfg.head_dim, seed);
  const int s = c.add_sequence();
  std::vector<int> ids(10);
  for (int i = 0; i < 10; ++i) ids[i] = i;
  append_ids(c, s, pool, ids);
  expect_error([&] { c.rollback(s, 5); }, "can take back at most 4 tokens");
  expect_error([&] { c.rollback(s, -1); }, "negative token count");
  expect_error([&] { c.rollback(s + 1, 1); }, "unknown or removed sequence id");
  c.rollback(s, 3);
  c.rollback(s, 1);  // 10 held at most: down to 6 is the room
  expect_error([&] { c.rollback(s, 1); }, "can take back at most 0 tokens");
  for (int l = 0; l < cfg.layers; ++l) EXPECT_EQ(c.tokens(s, l), 6);
  append_ids(c, s, pool, {20, 21});
  expect_error([&] { c.rollback(s, 3); }, "can take back at most 2 tokens");
  c.rollback(s, 2);
  for (int l = 0; l < cfg.layers; ++l) EXPECT_EQ(c.tokens(s, l), 6);
  {  // mid-step (layer 0 appended, layer 1 not yet): the layers' counts differ, so no rollback
    DevBuf<uint8_t> k(size_t(cfg.kv_heads) * cfg.head_dim * 2), v(k.n);
    k.upload(to_dtype_bytes(DType::F16, pool.rows(pool.k, {30})));
    v.upload(to_dtype_bytes(DType::F16, pool.rows(pool.v, {30})));
    c.append(0, {s}, {1}, k.ptr, v.ptr, 0);
    expect_error([&] { c.rollback(s, 1); }, "holds 7 tokens in layer 0 but 6 in layer 1: finish the step first");
    c.append(1, {s}, {1}, k.ptr, v.ptr, 0);
    c.rollback(s, 1);  // the step finished: 7 in both, back to 6
  }
  for (int l = 0; l < cfg.layers; ++l) EXPECT_EQ(c.tokens(s, l), 6);
  // The cache still works: 6 tokens, then a long append that closes blocks, then attention vs float64.
  std::vector<int> content(ids.begin(), ids.begin() + 6), tail(50);
  for (int i = 0; i < 50; ++i) tail[i] = 10 + i;
  tail[10] = 20;  // (any fresh rows will do; two repeat earlier ids)
  tail[11] = 21;
  append_ids(c, s, pool, tail);
  content.insert(content.end(), tail.begin(), tail.end());
  check_attention(c, s, pool, content, 3, seed + 3);
  CUDA_LAUNCH_OK();
}

// Speculative verification in a CUDA graph: a plan of n tokens per slot
// (append n, attend n causal queries, roll back the rejected drafts by counts
// in device memory) captured once and replayed, stores what eager
// appends of the same tokens store and attends the same, bit for bit
// (through a plan of the same splits); a windowed layer is trimmed as the
// counts pass multiples of T.
TEST(RollbackGpu, VerifyStepsOfSeveralTokensThroughAGraphMatchEagerAppends) {
  KVCOMP_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const int R = 4, n = 4, B = 2;
  Config cfg = rollback_config(R);
  const int H = cfg.kv_heads, D = cfg.head_dim, HQ = cfg.q_heads, T = cfg.block_tokens, L = cfg.layers;
  TokenPool pool(2000, H, D, seed);
  Cache planned(cfg), eager(cfg);
  std::vector<int> ps, es;
  int next = 0;
  for (int b = 0; b < B; ++b) {
    ps.push_back(planned.add_sequence());
    es.push_back(eager.add_sequence());
    std::vector<int> prompt(37 + 20 * b);
    for (int& id : prompt) id = next++;
    append_ids(planned, ps[b], pool, prompt);
    append_ids(eager, es[b], pool, prompt);
  }
  const DecodePlan plan = planned.make_plan(B, n), eplan = eager.make_plan(B, n);
  EXPECT_EQ(plan.tokens, n);
  planned.set_plan(plan, ps, 0);
  eager.set_plan(eplan, es, 0);  // attends only: the same splits as `plan`
  const size_t q_elems = size_t(B) * n * HQ * D;
  DevBuf<uint8_t> k(size_t(B) * n * H * D * 2), v(k.n), q(q_elems * 2), o1(L * q_elems * 2), o2(o1.n);
  DevBuf<int32_t> rejected_d(B);  // the captured rollback reads each step's counts from here
  cudaStream_t st = nullptr;
  CUDA_OK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  CUDA_OK(cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal));
  for (int l = 0; l < L; ++l) {
    planned.append(plan, l, k.ptr, v.ptr, st);
    planned.attend(plan, l, q.ptr, o1.ptr + l * q_elems * 2, DType::F16, st);
  }
  planned.rollback(plan, rejected_d.ptr, st);  // after the verification: the rejected drafts go
  CUDA_OK(cudaStreamEndCapture(st, &graph));
  CUDA_OK(cudaGraphInstantiate(&exec, graph, 0));
  for (int step = 0; step < 60; ++step) {
    SCOPED_TRACE("step " + std::to_string(step));
    std::vector<int> ids(size_t(B) * n);
    for (int& id : ids) id = next++ % 2000;
    k.upload(to_dtype_bytes(DType::F16, pool.rows(pool.k, ids)));
    v.upload(to_dtype_bytes(DType::F16, pool.rows(pool.v, ids)));
    q.upload(to_dtype_bytes(DType::F16, round_to(DType::F16, make_data(Dist::Gaussian, B * n * HQ, D, seed + step))));
    std::vector<int32_t> rejected(B);  // the target model rejects some drafts
    for (int32_t& r : rejected) r = int32_t(rng() % (n + 1));
    rejected_d.upload(rejected);
    CUDA_OK(cudaGraphLaunch(exec, st));
    planned.check(st);
    for (int l = 0; l < L; ++l) {
      eager.append(l, es, {n, n}, k.ptr, v.ptr, st);
      eager.attend(eplan, l, q.ptr, o2.ptr + l * q_elems * 2, DType::F16, st);
    }
    CUDA_OK(cudaStreamSynchronize(st));
    CUDA_LAUNCH_OK();
    ASSERT_EQ(o1.download(), o2.download());
    for (int b = 0; b < B; ++b) eager.rollback(es[b], rejected[b], st);
  }
  for (int b = 0; b < B; ++b)
    for (int l = 0; l < L; ++l) {
      const int64_t tokens = eager.tokens(es[b], l);
      ASSERT_EQ(planned.tokens(ps[b], l), tokens);
      for (int64_t blk = 0; blk < (tokens - R) / T; ++blk)
        for (int h = 0; h < H; ++h)
          for (Kind kind : {Kind::Key, Kind::Value}) {
            const int W = cfg.layer_windows[l];
            if (W > 0 && (blk + 1) * T + cfg.max_attend_batch + R + W - 1 <= tokens && blk * T >= cfg.sink_tokens)
              continue;  // behind the window
            ASSERT_EQ(planned.read_block(l, ps[b], h, blk, kind, 0), eager.read_block(l, es[b], h, blk, kind, 0))
                << "sequence " << b << " layer " << l << " block " << blk;
          }
    }
  EXPECT_GE(planned.stats().pool_bytes_in_use, eager.stats().pool_bytes_in_use);  // plan appends trim lazily
  // A count past the room is refused on the device: check() names the sequence, nothing is taken back.
  const int64_t before = planned.tokens(ps[0], 0);
  rejected_d.upload({R + 1, 0});
  planned.rollback(plan, rejected_d.ptr, st);
  try {
    planned.check(st);
    ADD_FAILURE() << "a rollback of max_rollback + 1 tokens was not refused";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("rollback refused: sequence " + std::to_string(ps[0])), std::string::npos)
        << e.what();
  }
  for (int l = 0; l < L; ++l) EXPECT_EQ(planned.tokens(ps[0], l), before);
  EXPECT_THROW(planned.rollback(plan, nullptr, st), Error);
  EXPECT_THROW(planned.make_plan(1, T + 1), Error);
  EXPECT_THROW(planned.make_plan(cfg.max_attend_batch, 2), Error);
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(st);
  CUDA_LAUNCH_OK();
}
