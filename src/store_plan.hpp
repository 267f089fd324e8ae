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
  int n_tokens;    // tokens appended
};

/// An append to one layer. The input holds the sequences' new tokens one
/// sequence after the other: row (token t, kv head h) of K starts at
/// k + (t * token_stride + h * head_stride) * elem_bytes, likewise V.
struct AppendRequest {
  int layer;
  int block_tokens;  // T
  int kv_heads;      // H
  int max_seqs;      // block table: [layer][slot][max_blocks][H]
  int max_blocks;
  const void* k;
  const void* v;
  int64_t token_stride;  // elements
  int64_t head_stride;   // elements
  size_t elem_bytes;
  TailLayout tails;
  std::vector<ErrorBound> k_bounds;  // per kv head, this layer
  std::vector<ErrorBound> v_bounds;
  std::vector<SeqAppend> seqs;
};

struct StorePlan {
  std::vector<StoreJob> jobs;      // sequence by sequence, block by block, head by head
  std::vector<TailCopy> copies;    // one per (sequence, head) that keeps rows in its tail
  std::vector<AppendEntry> entries;  // one per input sequence, in order
};

StorePlan plan_store(const AppendRequest& r);

}  // namespace detail
}  // namespace kvcomp
