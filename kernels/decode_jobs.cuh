// Plan-based decode: the jobs of one decode append, worked out on the device
// from the token counts in device memory, so a captured CUDA graph appends
// the right token on every replay.
//
// Slot b (a sequence, or -1 idle) appends input row b to `layer` only while
// the layer holds as many tokens as the last layer and (layer > 0) fewer than
// layer - 1: a step replayed after a partial failure stores only what is
// missing. A token that closes a block makes H block jobs (the T - 1 tail
// rows then the token; with max_rollback > 0, T tail rows, and the token is
// copied to the tail too); otherwise H one-row tail copies. Everything not used
// is idle (tail_tokens = -1, rows = 0), so the launches that follow have
// fixed sizes: batch * H jobs and copies, batch entries.
#pragma once

#include <cstdint>

#include "kvcomp/format.hpp"
#include "store_job.cuh"

namespace kvcomp {
namespace detail {

__global__ void decode_jobs_kernel(const DecodeJobsParams p) {
  const int H = p.tails.kv_heads, T = p.tails.block_tokens, S = p.tails.max_seqs;
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= p.batch * H) return;
  const int b = i / H, h = i % H;
  const int slot = p.slots[b];
  int32_t have = 0, n = 0, closed = 0;
  if (slot >= 0) {
    have = p.tokens[size_t(p.layer) * S + slot];
    closed = p.closed[size_t(p.layer) * S + slot];
    const int32_t last = p.tokens[size_t(p.layers - 1) * S + slot];
    n = have == last && (p.layer == 0 || p.tokens[size_t(p.layer - 1) * S + slot] > have) ? 1 : 0;
  }
  // The token closes a block when the tail then holds T + max_rollback tokens: without rollback the
  // block is the T - 1 tail rows and the token; with it, T tail rows (the token stays in the tail).
  const int32_t held = have - closed * T;
  const bool closes = n > 0 && blocks_to_close(held + 1, T, p.max_rollback) > 0;
  const int from_tail = held < T ? held : T;
  if (h == 0) p.entries[b] = {slot, n, have, closed, closes ? 1 : 0, uint32_t(b * H), uint32_t(b * H + H)};
  const size_t esz = p.tails.elem_bytes;
  const size_t in = size_t(int64_t(b) * p.token_stride + int64_t(h) * p.head_stride) * esz;
  StoreJob j{};
  j.tail_tokens = -1;
  j.entry = uint32_t(b);
  if (closes) {
    const int row0 = p.tails.ring_row(int64_t(closed) * T);
    j.k_in = p.k + in;
    j.v_in = p.v + in;
    j.k_tail = p.tails.row_ptr(p.layer, slot, h, Kind::Key, row0);
    j.v_tail = p.tails.row_ptr(p.layer, slot, h, Kind::Value, row0);
    j.in_token_stride = p.token_stride;
    j.eb_k = p.bounds[2 * h];
    j.eb_v = p.bounds[2 * h + 1];
    j.tail_tokens = from_tail;
    j.codebook = uint32_t((p.layer * H + h) * 2);
    // A block past max_blocks is never encoded: place_kernel fails the entry (max_tokens_per_seq).
    const int64_t block = min(int64_t(closed), int64_t(p.max_blocks - 1));
    j.table_index = table_slot(p.layer, slot, block, h, S, p.max_blocks, H);
  }
  p.jobs[i] = j;
  TailCopy c{};
  c.entry = uint32_t(b);
  c.rows = n > 0 && !(closes && from_tail < T) ? 1 : 0;  // unless the token is the block's last row
  c.in_token_stride = p.token_stride;
  if (c.rows) {
    c.k_in = p.k + in;
    c.v_in = p.v + in;
    c.k_dst = p.tails.row_ptr(p.layer, slot, h, Kind::Key, p.tails.ring_row(have));
    c.v_dst = p.tails.row_ptr(p.layer, slot, h, Kind::Value, p.tails.ring_row(have));
  }
  p.copies[i] = c;
}

}  // namespace detail
}  // namespace kvcomp
