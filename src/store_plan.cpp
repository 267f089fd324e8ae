#include "store_plan.hpp"

#include <algorithm>

namespace kvcomp {
namespace detail {

namespace {
int32_t new_blocks(const AppendRequest& r, const SeqAppend& q) {
  return blocks_to_close(q.stored - int64_t(q.closed) * r.block_tokens + q.n_tokens, r.block_tokens, r.max_rollback);
}
}  // namespace

size_t count_jobs(const AppendRequest& r) {
  size_t n = 0;
  for (const SeqAppend& q : r.seqs) n += size_t(new_blocks(r, q)) * r.kv_heads;
  return n;
}

void plan_store(const AppendRequest& r, StorePlan& plan, bool write_jobs) {
  const int T = r.block_tokens, H = r.kv_heads;
  const AppendGeometry g = r.geometry();
  std::vector<StoreJob>& jobs = plan.jobs;
  std::vector<TailCopy>& copies = plan.copies;
  jobs.clear();
  copies.clear();
  plan.entries.clear();
  plan.tok0.clear();
  if (write_jobs) jobs.reserve(count_jobs(r));  // no reallocation while the jobs are written
  copies.reserve(r.seqs.size() * H * 2);
  plan.entries.reserve(r.seqs.size());
  plan.tok0.reserve(r.seqs.size());
  plan.n_jobs = 0;
  int64_t tok0 = 0;
  for (size_t i = 0; i < r.seqs.size(); ++i) {
    const SeqAppend& q = r.seqs[i];
    const int slot = q.slot, n = q.n_tokens;
    const int64_t stored = q.stored;
    const int full = new_blocks(r, q);
    const size_t first = plan.n_jobs;
    if (write_jobs)
      for (int b = 0; b < full; ++b)
        for (int h = 0; h < H; ++h)
          jobs.push_back(append_job(g, slot, stored, q.closed, tok0, b, h, uint32_t(i), r.k_bounds[h], r.v_bounds[h]));
    plan.n_jobs += size_t(full) * H;
    plan.entries.push_back({slot, n, int32_t(stored), q.closed, full, uint32_t(first), uint32_t(plan.n_jobs)});
    plan.tok0.push_back(tok0);
    // The new tokens past the blocks closed stay in the tail ring: one copy a head, or two where they wrap.
    const int64_t kept_from = std::max(stored, int64_t(q.closed + full) * T);
    for (int run = 0; run < 2; ++run)  // the first runs of every head, then the wrapped rests
      for (int h = 0; h < H; ++h) {
        TailCopy runs[2];
        tail_copy_runs(g, slot, h, uint32_t(i), stored, tok0, kept_from, stored + n, runs);
        if (runs[run].rows > 0) copies.push_back(runs[run]);
      }
    tok0 += n;
  }
}

}  // namespace detail
}  // namespace kvcomp
