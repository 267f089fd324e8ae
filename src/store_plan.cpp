#include "store_plan.hpp"

namespace kvcomp {
namespace detail {

size_t count_jobs(const AppendRequest& r) {
  size_t n = 0;
  for (const SeqAppend& q : r.seqs) n += size_t((q.stored % r.block_tokens + q.n_tokens) / r.block_tokens) * r.kv_heads;
  return n;
}

void plan_store(const AppendRequest& r, StorePlan& plan, bool write_jobs) {
  const int T = r.block_tokens, H = r.kv_heads, layer = r.layer;
  const int64_t token_stride = r.token_stride, head_stride = r.head_stride;
  const size_t esz = r.elem_bytes;
  const void* k = r.k;
  const void* v = r.v;
  auto at = [&](const void* base, int64_t token, int head) {
    return static_cast<const void*>(static_cast<const char*>(base) + (token * token_stride + head * head_stride) * esz);
  };
  const AppendGeometry g = r.geometry();
  std::vector<StoreJob>& jobs = plan.jobs;
  std::vector<TailCopy>& copies = plan.copies;
  jobs.clear();
  copies.clear();
  plan.entries.clear();
  plan.tok0.clear();
  if (write_jobs) jobs.reserve(count_jobs(r));  // no reallocation while the jobs are written
  copies.reserve(r.seqs.size() * H);
  plan.entries.reserve(r.seqs.size());
  plan.tok0.reserve(r.seqs.size());
  plan.n_jobs = 0;
  int64_t tok0 = 0;
  for (size_t i = 0; i < r.seqs.size(); ++i) {
    const int slot = r.seqs[i].slot, n = r.seqs[i].n_tokens;
    const int64_t stored = r.seqs[i].stored;
    const int c = int(stored % T);
    const int full = int((c + n) / T);
    const int rest = int((c + n) % T);
    const size_t first = plan.n_jobs;
    if (write_jobs)
      for (int b = 0; b < full; ++b)
        for (int h = 0; h < H; ++h)
          jobs.push_back(append_job(g, slot, stored, tok0, b, h, uint32_t(i), r.k_bounds[h], r.v_bounds[h]));
    plan.n_jobs += size_t(full) * H;
    plan.entries.push_back({slot, n, int32_t(stored), uint32_t(first), uint32_t(plan.n_jobs)});
    plan.tok0.push_back(tok0);
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
}

}  // namespace detail
}  // namespace kvcomp
