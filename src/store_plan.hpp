// Append planning: what an append to one layer asks of the store kernels,
// worked out on the host from plain data. For each sequence, the blocks its
// new tokens close become StoreJobs (one per kv head; a job's first rows may
// be tail rows held back by earlier appends) and the rows left over become
// TailCopies into the sequence's tail. Once the kernels have measured the
// closed blocks, place_closed_blocks() gives each sequence one pool extent
// for all of them. Pure host logic (no CUDA calls), so it is unit-tested on
// the CPU (tests/test_cache_cpu.cpp).
#pragma once

#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

#include "kernels/store_job.cuh"
#include "kvcomp/format.hpp"
#include "pool_allocator.hpp"

namespace kvcomp {
namespace detail {

/// Where tail rows live: one buffer [layer][K|V][slot][kv head][T][D] of the
/// input's type (elem_bytes per element).
struct TailLayout {
  uint8_t* base;
  int max_seqs;
  int kv_heads;
  int block_tokens;
  int head_dim;
  size_t elem_bytes;
  /// Tail row `row` of (layer, slot, head, kind).
  uint8_t* row_ptr(int layer, int slot, int head, Kind kind, int row = 0) const {
    return base + (((((size_t(layer) * 2 + int(kind)) * max_seqs + slot) * kv_heads + head) * block_tokens + row) *
                   head_dim) * elem_bytes;
  }
};

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
  std::vector<std::pair<size_t, size_t>> seq_jobs;  // [first, end) job range per input sequence
};

StorePlan plan_store(const AppendRequest& r);

/// Pool placement of the closed blocks: extents[i] is sequence i's extent
/// ({0, 0} when it closes none) and bases[i] what its blocks' offsets (from
/// the scan) are shifted by to land in that extent.
struct BlockPlacement {
  std::vector<Extent> extents;
  std::vector<int64_t> bases;
};

/// Places every sequence's blocks in one extent; all or nothing: when the
/// pool cannot hold them, gives back what it took and throws kvcomp::Error.
/// offsets16[2 * j] and offsets16[2 * j + 1] are the K and V offsets (16-byte
/// units) of job j's blocks, offsets16[2 * n_jobs] the total.
BlockPlacement place_closed_blocks(PoolAllocator& alloc, const std::vector<std::pair<size_t, size_t>>& seq_jobs,
                                   const uint32_t* offsets16, size_t pool_capacity);

}  // namespace detail
}  // namespace kvcomp
