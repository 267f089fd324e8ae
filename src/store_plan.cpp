#include "store_plan.hpp"

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
        j.table_index = table_slot(layer, slot, block_index, h, r.max_seqs, r.max_blocks, H);
        j.entry = uint32_t(plan.entries.size());
        jobs.push_back(j);
      }
    }
    plan.entries.push_back({slot, n, int32_t(stored), uint32_t(first), uint32_t(jobs.size())});
    const int rows = full > 0 ? rest : n;
    const int dst_row = full > 0 ? 0 : c;
    const int64_t src_tok = tok0 + (n - rows);
    if (rows > 0)
      for (int h = 0; h < H; ++h)
        copies.push_back({at(k, src_tok, h), at(v, src_tok, h), r.tails.row_ptr(layer, slot, h, Kind::Key, dst_row),
                          r.tails.row_ptr(layer, slot, h, Kind::Value, dst_row), token_stride, rows,
                          uint32_t(i)});
    tok0 += n;
  }
  return plan;
}

}  // namespace detail
}  // namespace kvcomp
