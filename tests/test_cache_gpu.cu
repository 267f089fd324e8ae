// The Cache on the GPU: decode-phase appends match a prefill; a mixed batch
// driven through prefill + 3T decode steps attends within the error bound's
// reach of exact attention; pools empty after removal; a full pool fails
// cleanly and recovers; long appends place their blocks as the greedy page
// fill does, pair by pair; the jobs an eager append makes on the device are
// the host plan's.
#include <random>
#include <string>

#include "gpu_util.cuh"
#include "kernels/pool_state.cuh"
#include "kvcomp/cache.hpp"
#include "src/cache_internals.hpp"
#include "src/launch.hpp"
#include "src/pool_pages.hpp"
#include "src/store_plan.hpp"
#include "attention_ref.hpp"
#include "test_data.hpp"

using namespace kvcomp;
using namespace kvcomp_test;

namespace {

Config small_config() {
  Config c;
  c.layers = 2;
  c.kv_heads = 2;
  c.q_heads = 8;
  c.head_dim = 128;
  c.block_tokens = 64;
  c.max_seqs = 4;
  c.max_tokens_per_seq = 1024;
  c.pool_bytes = size_t(8) << 20;
  return c;
}

struct Tokens {
  std::vector<float> kf, vf;  // [n][H][D], fp16-exact
  std::vector<uint8_t> k, v;  // the same as fp16
  Tokens(int n, int H, int D, uint64_t seed) {
    kf = round_to(DType::F16, make_data(Dist::OutlierChannels, n, H * D, seed));
    vf = round_to(DType::F16, make_data(Dist::Gaussian, n, H * D, seed + 1));
    k = to_dtype_bytes(DType::F16, kf);
    v = to_dtype_bytes(DType::F16, vf);
  }
};

}  // namespace

// Codes8 and Codes6 tails too: every vector goes through the tail codes, prefill or not, so the blocks agree.
TEST(CacheGpu, DecodeStepsGiveTheSameBlocksAsOnePrefill) {
  KVCOMP_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  for (TailFormat tail : {TailFormat::Input, TailFormat::Codes8, TailFormat::Codes6}) {
    SCOPED_TRACE(tail == TailFormat::Codes8 ? "Codes8 tails" : tail == TailFormat::Codes6 ? "Codes6 tails" : "Input tails");
    Config cfg = small_config();
    cfg.tail_format = tail;
    const int H = cfg.kv_heads, D = cfg.head_dim, T = cfg.block_tokens;
    const int n = 3 * T + 5;
    Tokens prime(2 * T, H, D, seed), toks(n, H, D, seed + 7);
    DevBuf<uint8_t> dpk(prime.k.size()), dpv(prime.v.size()), dk(toks.k.size()), dv(toks.v.size());
    dpk.upload(prime.k); dpv.upload(prime.v); dk.upload(toks.k); dv.upload(toks.v);
    const size_t row = size_t(H) * D * 2;

    Cache a(cfg), b(cfg);
    for (Cache* c : {&a, &b}) {  // same codebooks in both: built from the same first prefill
      const int p = c->add_sequence();
      for (int l = 0; l < cfg.layers; ++l) c->append(l, {p}, {2 * T}, dpk.ptr, dpv.ptr, 0);
    }
    const int sa = a.add_sequence(), sb = b.add_sequence();
    for (int l = 0; l < cfg.layers; ++l) a.append(l, {sa}, {n}, dk.ptr, dv.ptr, 0);
    for (int t = 0; t < n; ++t)
      for (int l = 0; l < cfg.layers; ++l) b.append(l, {sb}, {1}, dk.ptr + t * row, dv.ptr + t * row, 0);
    CUDA_LAUNCH_OK();
    for (int l = 0; l < cfg.layers; ++l) {
      ASSERT_EQ(a.tokens(sa, l), n);
      ASSERT_EQ(b.tokens(sb, l), n);
      for (int blk = 0; blk < n / T; ++blk)
        for (int h = 0; h < H; ++h)
          for (Kind kind : {Kind::Key, Kind::Value})
            ASSERT_EQ(a.read_block(l, sa, h, blk, kind, 0), b.read_block(l, sb, h, blk, kind, 0))
                << "layer " << l << " block " << blk << " head " << h;
    }
    // Same attention output too (tails included).
    const auto q = to_dtype_bytes(DType::F16, make_data(Dist::Gaussian, cfg.q_heads, D, seed + 3));
    DevBuf<uint8_t> dq(q.size()), oa(q.size()), ob(q.size());
    dq.upload(q);
    CUDA_OK(cudaMemset(oa.ptr, 0xFF, q.size()));
    CUDA_OK(cudaMemset(ob.ptr, 0xFF, q.size()));
    a.attend(1, {sa}, dq.ptr, oa.ptr, DType::F16, 0);
    b.attend(1, {sb}, dq.ptr, ob.ptr, DType::F16, 0);
    CUDA_LAUNCH_OK();
    const auto ra = oa.download(), rb = ob.download();
    ASSERT_EQ(ra, rb);
    for (size_t i = 0; i < ra.size() / 2; ++i) ASSERT_TRUE(std::isfinite(load_as_float(DType::F16, ra.data(), i)));
  }
}

TEST(CacheGpu, MixedBatchDecodeThenRemoveEmptiesThePool) {
  KVCOMP_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  Config cfg = small_config();
  // The worst-case bound grows like e^(2 x score error): a tight K bound keeps it informative.
  cfg.k_bound = {BoundMode::Relative, 0.002f};
  const int H = cfg.kv_heads, D = cfg.head_dim, T = cfg.block_tokens;
  Cache cache(cfg);
  const std::vector<int> prompt = {10, 64, 150};
  std::vector<int> ids;
  std::vector<std::vector<float>> hk(prompt.size()), hv(prompt.size());  // every token appended, [t][H][D]
  for (int p : prompt) {
    ids.push_back(cache.add_sequence());
    Tokens t(p, H, D, seed + p);
    hk[ids.size() - 1] = t.kf;
    hv[ids.size() - 1] = t.vf;
    DevBuf<uint8_t> dk(t.k.size()), dv(t.v.size());
    dk.upload(t.k); dv.upload(t.v);
    for (int l = 0; l < cfg.layers; ++l) cache.append(l, {ids.back()}, {p}, dk.ptr, dv.ptr, 0);
  }
  const auto q = to_dtype_bytes(DType::F16, make_data(Dist::Gaussian, 3 * cfg.q_heads, D, seed + 3));
  DevBuf<uint8_t> dq(q.size()), dout(q.size());
  dq.upload(q);
  for (int step = 0; step < 3 * T; ++step) {
    Tokens t(3, H, D, seed + 1000 + step);  // one token for each sequence
    for (int i = 0; i < 3; ++i) {
      hk[i].insert(hk[i].end(), t.kf.begin() + size_t(i) * H * D, t.kf.begin() + size_t(i + 1) * H * D);
      hv[i].insert(hv[i].end(), t.vf.begin() + size_t(i) * H * D, t.vf.begin() + size_t(i + 1) * H * D);
    }
    DevBuf<uint8_t> dk(t.k.size()), dv(t.v.size());
    dk.upload(t.k); dv.upload(t.v);
    for (int l = 0; l < cfg.layers; ++l) {
      cache.append(l, ids, {1, 1, 1}, dk.ptr, dv.ptr, 0);
      cache.attend(l, ids, dq.ptr, dout.ptr, DType::F16, 0);
    }
  }
  CUDA_LAUNCH_OK();
  // Attention over everything appended vs exact float64 attention, within the
  // bound that follows from the error bound (attention_ref.hpp) plus fp16 output rounding.
  const auto qf = round_to(DType::F16, make_data(Dist::Gaussian, 3 * cfg.q_heads, D, seed + 3));
  CUDA_OK(cudaMemset(dout.ptr, 0xFF, q.size()));
  cache.attend(0, ids, dq.ptr, dout.ptr, DType::F16, 0);
  CUDA_LAUNCH_OK();
  const auto out = dout.download();
  const int G = cfg.q_heads / H;
  for (size_t i = 0; i < ids.size(); ++i) {
    const int n = prompt[i] + 3 * T;
    ASSERT_EQ(cache.tokens(ids[i], 0), n);
    for (int h = 0; h < H; ++h) {
      std::vector<double> k(size_t(n) * D), v(size_t(n) * D), dk, dv;
      for (int t = 0; t < n; ++t)
        for (int c = 0; c < D; ++c) {
          k[size_t(t) * D + c] = hk[i][(size_t(t) * H + h) * D + c];
          v[size_t(t) * D + c] = hv[i][(size_t(t) * H + h) * D + c];
        }
      allowed_deviation(k, v, n, D, T, cfg.k_bound.value, cfg.v_bound.value, dk, dv);
      for (int g = 0; g < G; ++g) {
        const size_t row = (i * cfg.q_heads + size_t(h) * G + g) * D;
        const auto exact = attention64(&qf[row], k.data(), v.data(), n, D);
        double max_out = 0;
        for (double x : exact) max_out = std::max(max_out, std::fabs(x));
        const auto bound = attention_bound_from_allowed(&qf[row], k, v, dk, dv, n, D);
        for (int c = 0; c < D; ++c) {
          const float got = load_as_float(DType::F16, out.data(), row + c);
          ASSERT_TRUE(std::isfinite(got)) << "unwritten output: seq " << i << " head " << h * G + g;
          // plus fp32 accumulation and fp16 output rounding
          ASSERT_LE(std::fabs(got - exact[c]), bound[c] + 2e-3 * max_out + 1e-4)
              << "seq " << i << " head " << h * G + g << " channel " << c;
        }
      }
    }
  }
  Stats st = cache.stats();
  EXPECT_GT(st.compressed_bytes, 0u);
  EXPECT_GT(st.ratio_vs_fp16, 2.0);
  std::printf("stats: %zu compressed bytes, %zu tail bytes, ratio vs fp16 %.2f\n", st.compressed_bytes, st.tail_bytes,
              st.ratio_vs_fp16);
  for (int id : ids) cache.remove_sequence(id);
  st = cache.stats();
  EXPECT_EQ(st.pool_bytes_in_use, 0u);
  EXPECT_EQ(st.compressed_bytes, 0u);
  EXPECT_EQ(st.tokens, 0u);
  EXPECT_THROW(cache.tokens(ids[0], 0), Error);
}

TEST(CacheGpu, FullPoolFailsCleanlyAndRecoversAfterRemove) {
  KVCOMP_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  Config cfg = small_config();
  cfg.layers = 1;
  cfg.max_tokens_per_seq = 2048;
  // Three pages of one worst-case pair each (the pool is too small for bigger ones).
  cfg.pool_bytes = 3 * detail::worst_pair_bytes(cfg.block_tokens, cfg.head_dim) + 16;
  const int H = cfg.kv_heads, D = cfg.head_dim;
  Cache cache(cfg);
  ASSERT_EQ(cache.stats().pool_capacity, 3 * cache.stats().pool_page_bytes);
  Tokens t(2048, H, D, seed);
  DevBuf<uint8_t> dk(t.k.size()), dv(t.v.size());
  dk.upload(t.k); dv.upload(t.v);
  const int a = cache.add_sequence();
  cache.append(0, {a}, {256}, dk.ptr, dv.ptr, 0);
  cache.check(0);
  const int b = cache.add_sequence();
  const Stats before = cache.stats();
  const auto block0 = cache.read_block(0, a, 0, 0, Kind::Key, 0);
  // 64 pairs of at least 4 KiB (compression below 16x) cannot fit the two pages left.
  cache.append(0, {b}, {2048}, dk.ptr, dv.ptr, 0);  // the failure is seen on the device
  try {
    cache.check(0);
    FAIL() << "expected kvcomp::Error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("the pool is full: sequence " + std::to_string(b) + " (layer 0)"),
              std::string::npos)
        << e.what();
  }
  cache.check(0);  // the throw cleared the record
  const Stats after = cache.stats();
  EXPECT_EQ(cache.tokens(b, 0), 0);
  EXPECT_EQ(before.pool_bytes_in_use, after.pool_bytes_in_use);
  EXPECT_EQ(before.compressed_bytes, after.compressed_bytes);
  EXPECT_EQ(before.tail_bytes, after.tail_bytes);
  EXPECT_EQ(block0, cache.read_block(0, a, 0, 0, Kind::Key, 0));
  // The next eager call reports a failure too (no check() needed).
  cache.append(0, {b}, {2048}, dk.ptr, dv.ptr, 0);
  CUDA_OK(cudaDeviceSynchronize());
  EXPECT_THROW(cache.append(0, {b}, {1}, dk.ptr, dv.ptr, 0), Error);
  EXPECT_EQ(cache.tokens(b, 0), 0);
  cache.remove_sequence(a, 0);
  cache.append(0, {b}, {256}, dk.ptr, dv.ptr, 0);
  cache.check(0);
  CUDA_LAUNCH_OK();
  EXPECT_EQ(cache.tokens(b, 0), 256);
  // b's blocks are a's (same data, same codebook).
  EXPECT_EQ(block0, cache.read_block(0, b, 0, 0, Kind::Key, 0));
}

TEST(CacheGpu, LayersOutOfOrderAreRejectedAndLeaveTheCacheAsItWas) {
  KVCOMP_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  const Config cfg = small_config();
  Cache cache(cfg);
  Tokens t(100, cfg.kv_heads, cfg.head_dim, seed);
  DevBuf<uint8_t> dk(t.k.size()), dv(t.v.size());
  dk.upload(t.k); dv.upload(t.v);
  const int s = cache.add_sequence();
  cache.append(0, {s}, {70}, dk.ptr, dv.ptr, 0);
  cache.append(1, {s}, {64}, dk.ptr, dv.ptr, 0);
  CUDA_LAUNCH_OK();
  const Stats before = cache.stats();
  const auto block = cache.read_block(1, s, 0, 0, Kind::Value, 0);
  try {
    cache.append(1, {s}, {7}, dk.ptr, dv.ptr, 0);  // layer 1 would pass layer 0
    FAIL() << "expected kvcomp::Error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("append the layers of a token in order"), std::string::npos) << e.what();
  }
  EXPECT_EQ(cache.tokens(s, 1), 64);
  EXPECT_EQ(cache.stats().pool_bytes_in_use, before.pool_bytes_in_use);
  EXPECT_EQ(cache.stats().tail_bytes, before.tail_bytes);
  EXPECT_EQ(cache.read_block(1, s, 0, 0, Kind::Value, 0), block);
  cache.append(1, {s}, {6}, dk.ptr, dv.ptr, 0);  // catching up is fine
  CUDA_LAUNCH_OK();
  EXPECT_EQ(cache.tokens(s, 1), 70);
}

// The place kernel's pass for long entries (more than kWalkAlone jobs among
// the first 32 entries: the CTA walks them over prefix sums) and for the
// others (a thread each) against place_pair, the greedy fill,
// pair after pair: each pair's offset in its page, and a new page exactly
// where the greedy fill opens one. Two appends per sequence (the second
// continues the open page), sizes that vary (four distributions) and sizes
// that repeat (constant data: the fill is periodic), page sizes from the
// smallest allowed to the automatic one.
TEST(CacheGpu, LongAppendsPlaceBlocksAsTheGreedyPageFill) {
  KVCOMP_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  for (const size_t page_bytes : {size_t(24) << 10, size_t(40) << 10, size_t(0)}) {
    SCOPED_TRACE("pool_page_bytes " + std::to_string(page_bytes));
    Config cfg;
    cfg.layers = 1;
    cfg.kv_heads = 8;
    cfg.q_heads = 8;
    cfg.head_dim = 64;
    cfg.block_tokens = 32;
    cfg.max_seqs = 40;
    cfg.max_tokens_per_seq = 4096;
    cfg.pool_bytes = size_t(96) << 20;
    cfg.pool_page_bytes = page_bytes;
    const int H = cfg.kv_heads, D = cfg.head_dim, T = cfg.block_tokens;
    Cache cache(cfg);
    // Sequences 0..2: long (walked by the CTA); 3..32: one block per head (thread-walked); 33: long, but past
    // the first 32 entries (thread-walked).
    const int n_seqs = 34;
    std::vector<int> seqs;
    for (int i = 0; i < n_seqs; ++i) seqs.push_back(cache.add_sequence());
    auto long_seq = [](int i) { return i < 3 || i == 33; };
    for (int round = 0; round < 2; ++round) {
      std::vector<int> counts;
      std::vector<float> kf, vf;
      for (int i = 0; i < n_seqs; ++i) {
        const int n = long_seq(i) ? (round == 0 ? 1000 + 37 * i : 900 + 11 * i) : T;
        counts.push_back(n);
        std::vector<float> k, v;
        if (i == 1) {  // constant rows: every block the same size
          k.assign(size_t(n) * H * D, 0.5f);
          v.assign(size_t(n) * H * D, -0.25f);
        } else {
          const Dist d = kAllDists[(i + round) % 4];
          k = make_data(d, n, H * D, seed + 100 * round + 2 * i);
          v = make_data(d, n, H * D, seed + 100 * round + 2 * i + 1);
        }
        kf.insert(kf.end(), k.begin(), k.end());
        vf.insert(vf.end(), v.begin(), v.end());
      }
      const auto kb = to_dtype_bytes(DType::F16, round_to(DType::F16, kf));
      const auto vb = to_dtype_bytes(DType::F16, round_to(DType::F16, vf));
      DevBuf<uint8_t> dk(kb.size()), dv(vb.size());
      dk.upload(kb);
      dv.upload(vb);
      cache.append(0, seqs, counts, dk.ptr, dv.ptr, 0);
      CUDA_LAUNCH_OK();
    }
    cache.check(0);
    const uint32_t P = uint32_t(cache.stats().pool_page_bytes / format::kBlockAlign);
    const size_t entries = detail::CacheInternals::table_entries(cache);
    const size_t max_blocks = entries / (size_t(cfg.max_seqs) * H);
    std::vector<format::BlockRef> table(entries);
    CUDA_OK(cudaMemcpy(table.data(), detail::CacheInternals::table(cache, 0), entries * sizeof(format::BlockRef),
                       cudaMemcpyDeviceToHost));
    std::vector<bool> page_used(cache.stats().pool_capacity / (size_t(P) * format::kBlockAlign) + 1, false);
    for (int i = 0; i < n_seqs; ++i) {
      SCOPED_TRACE("sequence " + std::to_string(i));
      const int64_t blocks = cache.tokens(seqs[i], 0) / T;
      detail::PageCursor want{-1, 0};
      int64_t page = -1, opened = 0;
      for (int64_t b = 0; b < blocks; ++b)
        for (int h = 0; h < H; ++h) {
          const format::BlockRef r = table[(size_t(seqs[i]) * max_blocks + size_t(b)) * H + h];
          ASSERT_GT(r.k_size16, 0) << "block " << b << " head " << h;
          uint32_t at16 = 0;
          const bool fresh = detail::place_pair(want, uint32_t(r.k_size16) + r.v_size16, P, at16);
          want.page = 0;
          ASSERT_EQ(r.offset16 % P, at16) << "block " << b << " head " << h;
          if (fresh) {
            page = r.offset16 / P;
            ASSERT_LT(size_t(page), page_used.size());
            ASSERT_FALSE(page_used[size_t(page)]) << "a page opened twice, block " << b << " head " << h;
            page_used[size_t(page)] = true;
            ++opened;
          } else {
            ASSERT_EQ(int64_t(r.offset16 / P), page) << "block " << b << " head " << h;
          }
        }
      if (long_seq(i)) EXPECT_GT(opened, 2) << "a long sequence should fill several pages";
    }
  }
}

// append_jobs_kernel (what Cache::append runs) against plan_store's jobs
// (the host plan, unit-tested on the CPU), field by field, for random
// appends: several sequences (some appending nothing, some closing no block,
// some many), tails partly filled (longer than a block with rollback room),
// strides and bounds of every kind.
TEST(CacheGpu, AppendJobsMadeOnTheDeviceAreTheHostPlans) {
  KVCOMP_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  auto pick = [&](int lo, int hi) { return lo + int(rng() % uint64_t(hi - lo + 1)); };
  for (int round = 0; round < 40; ++round) {
    SCOPED_TRACE("round " + std::to_string(round));
    const int T = 32 << pick(0, 2), H = pick(1, 8), D = 64, S = 16;
    detail::AppendRequest r{};
    r.layer = pick(0, 3);
    r.block_tokens = T;
    r.kv_heads = H;
    r.max_seqs = S;
    r.max_blocks = 4096 / 32;
    r.k = reinterpret_cast<const void*>(uintptr_t(0x100000000ull) + 16 * pick(0, 1000));  // never dereferenced
    r.v = reinterpret_cast<const void*>(uintptr_t(0x300000000ull) + 16 * pick(0, 1000));
    r.elem_bytes = size_t(2) << pick(0, 1);
    r.head_stride = pick(0, 1) ? D : 3 * D;
    r.token_stride = pick(0, 1) ? H * r.head_stride : H * r.head_stride + 8 * pick(1, 4);
    r.max_rollback = pick(0, 1) ? 0 : pick(1, T);
    r.tails = {reinterpret_cast<uint8_t*>(uintptr_t(0x500000000ull)), S, H, T, D, r.elem_bytes,
               r.max_rollback ? 2 * T : T};
    std::vector<ErrorBound> bounds;  // [H][K|V], as the Cache holds them on the device
    for (int h = 0; h < H; ++h) {
      r.k_bounds.push_back({pick(0, 1) ? BoundMode::Relative : BoundMode::Absolute, 0.001f * pick(1, 100)});
      r.v_bounds.push_back({pick(0, 1) ? BoundMode::Relative : BoundMode::Absolute, 0.001f * pick(1, 100)});
      bounds.push_back(r.k_bounds.back());
      bounds.push_back(r.v_bounds.back());
    }
    const int n_seqs = pick(1, S);
    for (int i = 0; i < n_seqs; ++i) {
      const int kind = pick(0, 3);  // nothing, a few tokens, a block or so, many
      const int n = kind == 0 ? 0 : kind == 1 ? pick(1, T - 1) : kind == 2 ? pick(T - 2, 2 * T) : pick(2 * T, 40 * T);
      const int closed = pick(0, 20), held = pick(0, T + r.max_rollback - 1);  // a tail as the cache leaves it
      r.seqs.push_back({i, int64_t(closed) * T + held, closed, n});
    }
    const detail::StorePlan want = detail::plan_store(r);
    detail::StorePlan plan;
    detail::plan_store(r, plan, false);
    ASSERT_TRUE(plan.jobs.empty());
    ASSERT_EQ(plan.n_jobs, want.jobs.size());
    if (plan.n_jobs == 0) continue;
    DevBuf<detail::AppendEntry> d_entries(plan.entries.size());
    DevBuf<int64_t> d_tok0(plan.tok0.size());
    DevBuf<ErrorBound> d_bounds(bounds.size());
    DevBuf<detail::StoreJob> d_jobs(plan.n_jobs);
    d_entries.upload(plan.entries);
    d_tok0.upload(plan.tok0);
    d_bounds.upload(bounds);
    CUDA_OK(cudaMemset(d_jobs.ptr, 0xFF, plan.n_jobs * sizeof(detail::StoreJob)));
    detail::launch_append_jobs({r.geometry(), d_bounds.ptr, d_entries.ptr, d_tok0.ptr, int32_t(plan.entries.size()),
                                uint32_t(plan.n_jobs), d_jobs.ptr},
                               0);
    CUDA_LAUNCH_OK();
    const std::vector<detail::StoreJob> got = d_jobs.download();
    for (size_t i = 0; i < got.size(); ++i) {
      const detail::StoreJob &g = got[i], &w = want.jobs[i];
      ASSERT_TRUE(g.k_in == w.k_in && g.v_in == w.v_in && g.k_tail == w.k_tail && g.v_tail == w.v_tail &&
                  g.in_token_stride == w.in_token_stride && g.eb_k.mode == w.eb_k.mode &&
                  g.eb_k.value == w.eb_k.value && g.eb_v.mode == w.eb_v.mode && g.eb_v.value == w.eb_v.value &&
                  g.tail_tokens == w.tail_tokens && g.codebook == w.codebook && g.table_index == w.table_index &&
                  g.entry == w.entry)
          << "job " << i << " of " << got.size();
    }
  }
}

TEST(CacheGpu, AllocationFailureAtConstructionIsClearAndLeaksNothing) {
  KVCOMP_REQUIRE_GPU();
  { Cache warm(small_config()); }  // the runtime's first-use allocations stay out of the count
  size_t free_before = 0, total = 0;
  CUDA_OK(cudaMemGetInfo(&free_before, &total));
  Config huge_pool = small_config();
  huge_pool.pool_bytes = size_t(1) << 44;  // 16 TiB: the first allocation fails
  Config huge_table = small_config();
  huge_table.max_seqs = 256;
  huge_table.max_tokens_per_seq = 1 << 30;  // the pool fits, the block tables (~32 GiB x 2 layers) do not
  huge_table.kv_heads = 8;
  huge_table.q_heads = 32;
  for (const Config& c : {huge_pool, huge_table}) {
    try {
      Cache cache(c);
      FAIL() << "expected kvcomp::Error";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("cannot allocate"), std::string::npos) << e.what();
    }
    cudaGetLastError();
    size_t free_after = 0;
    CUDA_OK(cudaMemGetInfo(&free_after, &total));
    EXPECT_EQ(free_after, free_before) << "device memory leaked by a failed construction";
  }
}
