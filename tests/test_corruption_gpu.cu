// Corrupt compressed data on the GPU: bit flips in the pool and garbage in
// the block tables. Attention may compute wrong numbers but must never read
// outside the pool or write outside its output (run under compute-sanitizer
// memcheck by scripts/device_session.sh, stage san), and must write every output element.
// Blocks of 64 and 128 tokens (the decoders' worst-case overread grows with T).
#include <random>
#include <utility>
#include <string>

#include "gpu_util.cuh"
#include "kvcomp/cache.hpp"
#include "src/cache_internals.hpp"
#include "test_data.hpp"

using namespace kvcomp;
using namespace kvcomp_test;

TEST(CorruptionGpu, BitFlipsInPoolAndTablesStayInBounds) {
  KVCOMP_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  Config cfg;
  cfg.layers = 1; cfg.kv_heads = 2; cfg.q_heads = 8;
  cfg.max_seqs = 4; cfg.max_tokens_per_seq = 2048; cfg.pool_bytes = size_t(4) << 20;
  const int H = cfg.kv_heads;
  const std::vector<int> lengths = {300, 1000, 64, 5};
  // (T, D): 128 x 64 has V params per channel (format.hpp), read at each block's start and end.
  for (const auto shape : {std::pair<int, int>{64, 128}, std::pair<int, int>{128, 128}, std::pair<int, int>{128, 64}}) {
    const int T = shape.first, D = shape.second;
    SCOPED_TRACE("T " + std::to_string(T) + " D " + std::to_string(D));
    cfg.block_tokens = T;
    cfg.head_dim = D;
    Cache cache(cfg);
    std::vector<int> ids;
    for (size_t i = 0; i < lengths.size(); ++i) {
      ids.push_back(cache.add_sequence());
      const auto k = to_dtype_bytes(DType::F16, make_data(Dist::OutlierChannels, lengths[i], H * D, seed + 2 * i));
      const auto v = to_dtype_bytes(DType::F16, make_data(Dist::HeavyTailed, lengths[i], H * D, seed + 2 * i + 1));
      DevBuf<uint8_t> dk(k.size()), dv(v.size());
      dk.upload(k); dv.upload(v);
      cache.append(0, {ids.back()}, {lengths[i]}, dk.ptr, dv.ptr, 0);
    }
    CUDA_LAUNCH_OK();
    const auto q = to_dtype_bytes(DType::F16, make_data(Dist::Gaussian, int(ids.size()) * cfg.q_heads, D, seed + 9));
    DevBuf<uint8_t> dq(q.size()), dout(q.size());
    dq.upload(q);
    auto attend = [&](std::vector<uint8_t>& out) {
      CUDA_OK(cudaMemset(dout.ptr, 0xFF, q.size()));  // poison: 0xFFFF is never written (NaN comes out as 0x7FFF)
      cache.attend(0, ids, dq.ptr, dout.ptr, DType::F16, 0);
      CUDA_LAUNCH_OK();
      out = dout.download();
    };
    std::vector<uint8_t> clean, out;
    attend(clean);
    if (HasFatalFailure()) return;

    uint8_t* pool = detail::CacheInternals::pool(cache);
    format::BlockRef* table = detail::CacheInternals::table(cache, 0);
    const size_t pool_bytes = detail::CacheInternals::pool_bytes(cache);
    const size_t used = cache.stats().pool_bytes_in_use;
    const size_t entries = detail::CacheInternals::table_entries(cache);
    std::vector<uint8_t> pool_copy(pool_bytes);
    std::vector<format::BlockRef> table_copy(entries);
    CUDA_OK(cudaMemcpy(pool_copy.data(), pool, pool_bytes, cudaMemcpyDeviceToHost));
    CUDA_OK(cudaMemcpy(table_copy.data(), table, entries * sizeof(format::BlockRef), cudaMemcpyDeviceToHost));

    std::mt19937_64 rng(seed);
    for (int round = 0; round < 24; ++round) {
      SCOPED_TRACE("round " + std::to_string(round));
      auto bad_pool = pool_copy;
      auto bad_table = table_copy;
      const int flips = 1 << (round % 12);  // 1 .. 2048 bit flips in the blocks in use
      for (int f = 0; f < flips; ++f) bad_pool[rng() % used] ^= uint8_t(1u << (rng() % 8));
      if (round % 3 == 2) {  // garbage block references: offsets and sizes past the pool
        for (int f = 0; f < 8; ++f) {
          auto& r = bad_table[rng() % entries];
          switch (rng() % 3) {
            case 0: r.offset16 = uint32_t(rng()); break;
            case 1: r.k_size16 = uint16_t(rng()); break;
            default: r.v_size16 = uint16_t(rng()); break;
          }
        }
      }
      CUDA_OK(cudaMemcpy(pool, bad_pool.data(), pool_bytes, cudaMemcpyHostToDevice));
      CUDA_OK(cudaMemcpy(table, bad_table.data(), entries * sizeof(format::BlockRef), cudaMemcpyHostToDevice));
      attend(out);
      if (HasFatalFailure()) return;
      for (size_t i = 0; i < out.size() / 2; ++i)
        ASSERT_FALSE(out[2 * i] == 0xFF && out[2 * i + 1] == 0xFF) << "output element " << i << " not written";
    }
    // Restored data gives the clean result again: nothing else was touched.
    CUDA_OK(cudaMemcpy(pool, pool_copy.data(), pool_bytes, cudaMemcpyHostToDevice));
    CUDA_OK(cudaMemcpy(table, table_copy.data(), entries * sizeof(format::BlockRef), cudaMemcpyHostToDevice));
    attend(out);
    ASSERT_EQ(out, clean);
  }
}
