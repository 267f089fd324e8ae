// Plan-based decode: the jobs of one decode append, worked out on the device
// from the token counts in device memory, so a captured CUDA graph appends
// the right tokens on every replay.
//
// Slot b (a sequence, or -1 idle) appends its n = tokens_per_slot input rows
// (b n .. b n + n - 1) to `layer` only while the layer holds as many tokens
// as the last layer and (layer > 0) at least n fewer than layer - 1: a step
// replayed after a partial failure stores only what is missing. n <= T, so
// at most one block closes (append_job's block: tail rows, then input rows);
// the rows past it are copied to the tail ring in at most two runs (it
// wraps; one run when n = 1). Everything not used is idle (tail_tokens = -1,
// rows = 0), so the launches that follow have fixed sizes: batch * H jobs,
// batch * H * copy_runs copies, batch entries.
#pragma once

#include <cstdint>

#include "kvcomp/format.hpp"
#include "store_job.cuh"

namespace kvcomp {
namespace detail {

__global__ void decode_jobs_kernel(const DecodeJobsParams p) {
  const TailLayout& tl = p.g.tails;
  const int H = tl.kv_heads, T = tl.block_tokens, S = tl.max_seqs, layer = p.g.layer;
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= p.batch * H) return;
  const int b = i / H, h = i % H;
  const int slot = p.slots[b];
  int32_t have = 0, n = 0, closed = 0;
  if (slot >= 0) {
    have = p.tokens[size_t(layer) * S + slot];
    closed = p.closed[size_t(layer) * S + slot];
    const int32_t last = p.tokens[size_t(p.layers - 1) * S + slot];
    const bool due = have == last && (layer == 0 || p.tokens[size_t(layer - 1) * S + slot] >= have + p.tokens_per_slot);
    n = due ? p.tokens_per_slot : 0;
  }
  const int32_t held = have - closed * T;
  const int32_t new_blocks = n > 0 ? blocks_to_close(held + n, T, p.max_rollback) : 0;  // 0 or 1 (n <= T)
  const int64_t tok0 = int64_t(b) * p.tokens_per_slot;
  if (h == 0) p.entries[b] = {slot, n, have, closed, new_blocks, uint32_t(b * H), uint32_t(b * H + H)};
  StoreJob j{};
  j.tail_tokens = -1;
  j.entry = uint32_t(b);
  if (new_blocks > 0) {
    j = append_job(p.g, slot, have, closed, tok0, 0, h, uint32_t(b), p.bounds[2 * h], p.bounds[2 * h + 1]);
    // A block past max_blocks is never encoded: place_kernel fails the entry (max_tokens_per_seq).
    j.table_index = table_slot(layer, slot, min(int64_t(closed), int64_t(p.g.max_blocks - 1)), h, S, p.g.max_blocks, H);
  }
  p.jobs[i] = j;
  // The new tokens past the closed block stay in the tail ring.
  TailCopy runs[2];
  tail_copy_runs(p.g, slot, h, uint32_t(b), have, tok0, max(int64_t(have), int64_t(closed + new_blocks) * T),
                 int64_t(have) + n, runs);
  for (int run = 0; run < p.copy_runs; ++run) p.copies[i * p.copy_runs + run] = runs[run];
}

}  // namespace detail
}  // namespace kvcomp
