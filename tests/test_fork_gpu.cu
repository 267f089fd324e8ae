// Cache::fork on the GPU: beams forked from one prompt share its closed
// blocks and hold, bit for bit, what plain sequences given the same tokens
// hold (blocks, attention); stats count shared blocks once; removing the
// parent first or a child first leaves the others intact; the pool returns
// to empty.
#include <memory>
#include <string>
#include <vector>

#include "gpu_util.cuh"
#include "kvcomp/cache.hpp"
#include "test_data.hpp"

using namespace kvcomp;
using namespace kvcomp_test;

namespace {

Config fork_config() {
  Config c;
  c.layers = 2;
  c.kv_heads = 2;
  c.q_heads = 8;
  c.head_dim = 128;
  c.block_tokens = 64;
  c.max_seqs = 8;
  c.max_tokens_per_seq = 2048;
  c.pool_bytes = size_t(16) << 20;
  return c;
}

/// fp16 K/V of n tokens ([n][H][D]) on the device.
struct DeviceTokens {
  DevBuf<uint8_t> k, v;
  DeviceTokens(int n, int H, int D, uint64_t seed)
      : k(size_t(n) * H * D * 2), v(size_t(n) * H * D * 2) {
    k.upload(to_dtype_bytes(DType::F16, make_data(Dist::OutlierChannels, n, H * D, seed)));
    v.upload(to_dtype_bytes(DType::F16, make_data(Dist::Gaussian, n, H * D, seed + 1)));
  }
};

/// Appends `n` tokens of `t` (from token `from`) to `seq` in every layer.
void append_all(Cache& c, int seq, const DeviceTokens& t, int from, int n) {
  const auto& cfg = c.config();
  const size_t off = size_t(from) * cfg.kv_heads * cfg.head_dim * 2;
  for (int l = 0; l < cfg.layers; ++l) c.append(l, {seq}, {n}, t.k.ptr + off, t.v.ptr + off, 0);
}

/// Every closed block and the attention output of `a` in cache `ca` equal
/// those of `b` in `cb` (same tokens appended the same way).
void expect_same_sequence(Cache& ca, int a, Cache& cb, int b, const DevBuf<uint8_t>& q, const char* what) {
  SCOPED_TRACE(what);
  const auto& cfg = ca.config();
  DevBuf<uint8_t> oa(q.n), ob(q.n);
  for (int l = 0; l < cfg.layers; ++l) {
    const int64_t n = ca.tokens(a, l);
    ASSERT_EQ(n, cb.tokens(b, l));
    for (int64_t blk = 0; blk < n / cfg.block_tokens; ++blk)
      for (int h = 0; h < cfg.kv_heads; ++h)
        for (Kind kind : {Kind::Key, Kind::Value})
          ASSERT_EQ(ca.read_block(l, a, h, blk, kind, 0), cb.read_block(l, b, h, blk, kind, 0))
              << "layer " << l << " block " << blk << " head " << h;
    CUDA_OK(cudaMemset(oa.ptr, 0xFF, q.n));
    CUDA_OK(cudaMemset(ob.ptr, 0xFF, q.n));
    ca.attend(l, {a}, q.ptr, oa.ptr, DType::F16, 0);
    cb.attend(l, {b}, q.ptr, ob.ptr, DType::F16, 0);
    CUDA_LAUNCH_OK();
    const auto ra = oa.download(), rb = ob.download();
    ASSERT_EQ(ra, rb) << "layer " << l;
    for (size_t i = 0; i < ra.size() / 2; ++i) ASSERT_TRUE(std::isfinite(load_as_float(DType::F16, ra.data(), i)));
  }
}

}  // namespace

namespace {

void run_beams_share_the_prompt_and_match_plain_sequences_in_either_removal_order(TailFormat tail) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  Config cfg = fork_config();
  cfg.tail_format = tail;
  const int H = cfg.kv_heads, D = cfg.head_dim, T = cfg.block_tokens;
  const int prompt = 4 * T + 37, beams = 4, steps = 2 * T + 9;  // the prompt's tail is copied; beams close blocks
  DeviceTokens p(prompt, H, D, seed);
  std::vector<std::unique_ptr<DeviceTokens>> own;
  for (int b = 0; b < beams; ++b) own.push_back(std::make_unique<DeviceTokens>(steps, H, D, seed + 100 * (b + 1)));
  DevBuf<uint8_t> q(size_t(cfg.q_heads) * D * 2);
  q.upload(to_dtype_bytes(DType::F16, make_data(Dist::Gaussian, cfg.q_heads, D, seed + 7)));

  for (bool parent_first : {true, false}) {
    SCOPED_TRACE(parent_first ? "remove the parent first" : "remove a child first");
    // `forked`: one prompt, beams 1..3 forked from it (beam 0 is the parent). `plain`: each beam a sequence of
    // its own holding the prompt and its tokens. Both build their codebooks from the same first prefill.
    Cache forked(cfg), plain(cfg);
    const int parent = forked.add_sequence();
    append_all(forked, parent, p, 0, prompt);
    const Stats prompt_only = forked.stats();
    std::vector<int> f{parent}, r;
    for (int b = 1; b < beams; ++b) f.push_back(forked.fork(parent));
    for (int b = 0; b < beams; ++b) {
      r.push_back(plain.add_sequence());
      append_all(plain, r[b], p, 0, prompt);
    }
    const Stats after_fork = forked.stats();
    EXPECT_EQ(after_fork.compressed_bytes, prompt_only.compressed_bytes) << "a fork stores nothing new";
    EXPECT_EQ(after_fork.pool_bytes_in_use, prompt_only.pool_bytes_in_use);
    EXPECT_EQ(after_fork.tokens, size_t(beams) * prompt * cfg.layers);
    for (int b = 0; b < beams; ++b) expect_same_sequence(forked, f[b], plain, r[b], q, "right after the fork");
    if (::testing::Test::HasFatalFailure()) return;

    // Diverge: each beam appends its own tokens, one step at a time, batched as a decode would.
    const size_t row = size_t(H) * D * 2;
    for (int t = 0; t < steps; ++t)
      for (int l = 0; l < cfg.layers; ++l)
        for (int b = 0; b < beams; ++b) {
          forked.append(l, {f[b]}, {1}, own[b]->k.ptr + t * row, own[b]->v.ptr + t * row, 0);
          plain.append(l, {r[b]}, {1}, own[b]->k.ptr + t * row, own[b]->v.ptr + t * row, 0);
        }
    CUDA_LAUNCH_OK();
    for (int b = 0; b < beams; ++b) expect_same_sequence(forked, f[b], plain, r[b], q, "after diverging");
    if (::testing::Test::HasFatalFailure()) return;
    // The prompt's closed blocks are held once instead of once a beam.
    const size_t shared = prompt_only.compressed_bytes;
    EXPECT_EQ(forked.stats().compressed_bytes + (beams - 1) * shared, plain.stats().compressed_bytes);

    // Remove the parent (or beam 1) first: the others keep their blocks, shared ones included.
    const int gone = parent_first ? 0 : 1;
    forked.remove_sequence(f[gone]);
    plain.remove_sequence(r[gone]);
    for (int b = 0; b < beams; ++b)
      if (b != gone) expect_same_sequence(forked, f[b], plain, r[b], q, "after the first removal");
    if (::testing::Test::HasFatalFailure()) return;
    EXPECT_GT(forked.stats().pool_bytes_in_use, 0u);
    // A new fork of a remaining beam, and a fresh sequence reusing the freed slot, work too.
    const int keep = parent_first ? 1 : 0;
    const int again = forked.fork(f[keep]);
    expect_same_sequence(forked, again, plain, r[keep], q, "a fork of a fork");
    if (::testing::Test::HasFatalFailure()) return;
    forked.remove_sequence(again);
    for (int b = 0; b < beams; ++b)
      if (b != gone) forked.remove_sequence(f[b]);
    const Stats empty = forked.stats();
    EXPECT_EQ(empty.pool_bytes_in_use, 0u);
    EXPECT_EQ(empty.compressed_bytes, 0u);
    EXPECT_EQ(empty.tokens, 0u);
    // The freed pool holds a whole new prompt again.
    const int s = forked.add_sequence();
    append_all(forked, s, p, 0, prompt);
    EXPECT_EQ(forked.stats().compressed_bytes, prompt_only.compressed_bytes);
    CUDA_LAUNCH_OK();
  }
}

}  // namespace

TEST(ForkGpu, BeamsShareThePromptAndMatchPlainSequencesInEitherRemovalOrder) {
  KVCOMP_REQUIRE_GPU();
  run_beams_share_the_prompt_and_match_plain_sequences_in_either_removal_order(TailFormat::Input);
}

// Codes8 tails: fork copies the parent's tail rows of codes and params.
TEST(ForkGpu, BeamsShareThePromptAndMatchPlainSequencesInEitherRemovalOrderWithCodes8Tails) {
  KVCOMP_REQUIRE_GPU();
  run_beams_share_the_prompt_and_match_plain_sequences_in_either_removal_order(TailFormat::Codes8);
}

TEST(ForkGpu, BeamsShareThePromptAndMatchPlainSequencesInEitherRemovalOrderWithCodes6Tails) {
  KVCOMP_REQUIRE_GPU();
  run_beams_share_the_prompt_and_match_plain_sequences_in_either_removal_order(TailFormat::Codes6);
}

TEST(ForkGpu, ForkOfAnUnknownSequenceOrWithNoFreeSlotIsAClearError) {
  KVCOMP_REQUIRE_GPU();
  Config cfg = fork_config();
  cfg.max_seqs = 2;
  Cache cache(cfg);
  EXPECT_THROW(cache.fork(0), Error);
  const int s = cache.add_sequence();
  const int c = cache.fork(s);
  EXPECT_NE(c, s);
  try {
    cache.fork(s);
    FAIL() << "expected an Error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("fork: all 2 sequence slots are in use"), std::string::npos) << e.what();
  }
  cache.remove_sequence(s);
  cache.remove_sequence(c);
  EXPECT_EQ(cache.stats().pool_bytes_in_use, 0u);
}
