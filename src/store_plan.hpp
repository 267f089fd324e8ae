// Append planning: what an append to one layer asks of the store kernels,
// worked out on the host from plain data. For each sequence, the blocks its
// new tokens close become StoreJobs (one per kv head; a job's first rows may
// be tail rows held back by earlier appends) and the rows left over become
// TailCopies into the sequence's tail, and each sequence an AppendEntry (the
// place kernel puts its blocks in the pool on the device). Pure host logic
// (no CUDA calls), so it is unit-tested on the CPU (tests/test_cache_cpu.cpp).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "kernels/store_job.cuh"
#include "kvcomp/format.hpp"

namespace kvcomp {
namespace detail {

/// One sequence of an append.
struct SeqAppend {
  int slot;        // sequence id
  int64_t stored;  // tokens the layer holds for it before the append
  int32_t closed;  // blocks it holds (closed) before the append: stored - closed T tokens are in its tail
  int n_tokens;    // tokens appended
};

/// An append to one layer. The input holds the sequences' new tokens one
/// sequence after the other: row (token t, kv head h) of K starts at
/// k + (t * token_stride + h * head_stride) * elem_bytes, likewise V.
struct AppendRequest {  // (the input and tails: as AppendGeometry, which geometry() makes)
  int layer;
  int block_tokens;  // T
  int kv_heads;      // H
  int max_seqs;      // block table: [layer][slot][max_blocks][H]
  int max_blocks;
  int max_rollback;  // Config::max_rollback: blocks close when that many newer tokens follow (blocks_to_close)
  const void* k;
  const void* v;
  int64_t token_stride;  // elements
  int64_t head_stride;   // elements
  size_t elem_bytes;
  TailLayout tails;
  std::vector<ErrorBound> k_bounds;  // per kv head, this layer
  std::vector<ErrorBound> v_bounds;
  std::vector<SeqAppend> seqs;
  AppendGeometry geometry() const {
    return {static_cast<const uint8_t*>(k), static_cast<const uint8_t*>(v), token_stride, head_stride, elem_bytes,
            tails, layer, max_blocks};
  }
};

struct StorePlan {
  std::vector<StoreJob> jobs;      // sequence by sequence, block by block, head by head (if written)
  size_t n_jobs = 0;               // jobs of the append, written or not
  std::vector<int64_t> tok0;       // per entry: its first input token
  std::vector<TailCopy> copies;    // per (sequence, head) that keeps rows in its tail: one, or two
                                   // where the rows wrap around the tail ring
  std::vector<AppendEntry> entries;  // one per input sequence, in order
};

/// Fills `plan` (its vectors are cleared first and keep their capacity: an
/// engine's appends reuse one plan). write_jobs = false leaves plan.jobs
/// empty (Cache::append makes them on the device: append_jobs_kernel, the
/// same append_job formula); everything else is filled either way.
void plan_store(const AppendRequest& r, StorePlan& plan, bool write_jobs = true);
/// Jobs (blocks closed x kv heads) of an append.
size_t count_jobs(const AppendRequest& r);
inline StorePlan plan_store(const AppendRequest& r) {
  StorePlan plan;
  plan_store(r, plan);
  return plan;
}

}  // namespace detail
}  // namespace kvcomp
