#include "store_plan.hpp"

#include <string>

#include "kvcomp/error.hpp"

namespace kvcomp {
namespace detail {

StorePlan plan_store(const AppendRequest& r) {
  const int T = r.block_tokens, H = r.kv_heads, layer = r.layer;
  const int64_t token_stride = r.token_stride, head_stride = r.head_stride;
  const size_t esz = r.elem_bytes;
  const void* k = r.k;
  const void* v = r.v;
  auto at = [&](const void* base, int64_t token, int head) {
    return static_cast<const void*>(static_cast<const char*>(base) + (token * token_stride + head * head_stride) * esz);
  };
  StorePlan plan;
  std::vector<StoreJob>& jobs = plan.jobs;
  std::vector<TailCopy>& copies = plan.copies;
  std::vector<std::pair<size_t, size_t>>& seq_jobs = plan.seq_jobs;
  int64_t tok0 = 0;
  for (size_t i = 0; i < r.seqs.size(); ++i) {
    const int slot = r.seqs[i].slot, n = r.seqs[i].n_tokens;
    const int64_t stored = r.seqs[i].stored;
    const int c = int(stored % T);
    const int full = int((c + n) / T);
    const int rest = int((c + n) % T);
    const size_t first = jobs.size();
    for (int b = 0; b < full; ++b) {
      const int64_t in_first = b == 0 ? 0 : int64_t(b) * T - c;
      const int64_t block_index = stored / T + b;
      for (int h = 0; h < H; ++h) {
        StoreJob j{};
        j.k_in = at(k, tok0 + in_first, h);
        j.v_in = at(v, tok0 + in_first, h);
        j.k_tail = r.tails.row_ptr(layer, slot, h, Kind::Key);
        j.v_tail = r.tails.row_ptr(layer, slot, h, Kind::Value);
        j.in_token_stride = token_stride;
        j.eb_k = r.k_bounds[h];
        j.eb_v = r.v_bounds[h];
        j.tail_tokens = b == 0 ? c : 0;
        j.codebook = uint32_t((layer * H + h) * 2);
        j.table_index = uint32_t(((size_t(layer) * r.max_seqs + slot) * r.max_blocks + block_index) * H + h);
        j.extent = uint32_t(seq_jobs.size());
        jobs.push_back(j);
      }
    }
    seq_jobs.push_back({first, jobs.size()});
    const int rows = full > 0 ? rest : n;
    const int dst_row = full > 0 ? 0 : c;
    const int64_t src_tok = tok0 + (n - rows);
    if (rows > 0)
      for (int h = 0; h < H; ++h)
        copies.push_back({at(k, src_tok, h), at(v, src_tok, h), r.tails.row_ptr(layer, slot, h, Kind::Key, dst_row),
                          r.tails.row_ptr(layer, slot, h, Kind::Value, dst_row), token_stride, rows});
    tok0 += n;
  }
  return plan;
}

BlockPlacement place_closed_blocks(PoolAllocator& alloc, const std::vector<std::pair<size_t, size_t>>& seq_jobs,
                                   const uint32_t* offsets16, size_t pool_capacity) {
  const uint32_t* offsets = offsets16;
  BlockPlacement placed;
  std::vector<Extent>& new_extents = placed.extents;
  std::vector<int64_t>& bases = placed.bases;
  new_extents.assign(seq_jobs.size(), Extent{0, 0});
  bases.assign(seq_jobs.size(), 0);
  for (size_t i = 0; i < seq_jobs.size(); ++i) {
    const auto [first, end] = seq_jobs[i];
    if (first == end) continue;
    const uint64_t units = offsets[2 * end] - offsets[2 * first];
    uint64_t where = 0;
    if (!alloc.allocate(units, where)) {
      for (size_t j = 0; j < i; ++j)
        if (new_extents[j].units16) alloc.release(new_extents[j].at16, new_extents[j].units16);
      throw Error("append: the pool is full (" + std::to_string((long long)(alloc.used() * 16)) + " of " +
                  std::to_string((long long)(pool_capacity)) + " bytes in use, " +
                  std::to_string((long long)(units * 16)) + " more needed); remove sequences or raise config.pool_bytes");
    }
    new_extents[i] = {where, units};
    bases[i] = int64_t(where) - int64_t(offsets[2 * first]);
  }
  return placed;
}

}  // namespace detail
}  // namespace kvcomp
