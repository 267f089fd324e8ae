// What the fused attention kernel is told (plain data, host and device).
#pragma once

#include <cstdint>

#include "kvcomp/codebook.hpp"
#include "kvcomp/format.hpp"

namespace kvcomp {
namespace detail {

constexpr int kAttnWarps = 4;
constexpr int kMaxBatch = 256;
constexpr int kMaxTokensPerBlock = 128;

/// Bytes a decoder may read past the end of its block (lookahead, and corrupt
/// lane tables clamped to the block end): the pool is followed by at least
/// this much readable memory.
/// Bound: a lane consumes at most max_lane_bits (every pair escaped with two
/// raw values) from a start that is at most the block end, and its window
/// holds 4 words beyond its position (T = 128, D = 256: 5844 bytes).
constexpr uint32_t kDecodeOverread = 8192;
constexpr uint32_t max_overread(int tokens, int head_dim) {
  return (format::max_lane_bits(tokens, head_dim) + 7) / 8 + 20;
}

struct AttendSeq {
  int32_t slot;    // sequence slot in the cache's tables (-1: idle, no tokens)
  int32_t tokens;  // tokens stored (compressed blocks * T + tail)
};

struct AttendParams {
  const uint8_t* pool;
  uint64_t pool_units16;          // pool bytes / 16: block refs pointing past it are skipped
  const format::BlockRef* table;  // this layer: [slot][max_blocks][kv_heads]
  const CodebookTables* books;    // this layer: [kv_heads][K, V]
  const void* k_tail;             // this layer's K tails: [slot][kv_heads][T][D], of tail_dtype
  const void* v_tail;             // this layer's V tails, same layout
  const void* q;                  // [batch][q_heads][D]
  void* out;                      // [batch][q_heads][D]
  float* part;                    // [batch][q_heads][splits][D + 2]
  int32_t tokens_per_block;       // T
  int32_t kv_heads;
  int32_t max_blocks;
  int32_t units_per_split;        // at least; a sequence of u units takes max(this, ceil(u / splits)) per split
  int32_t splits;
  float scale_log2;               // softmax scale * log2(e)
  int32_t tail_dtype;
  int32_t group;                  // query heads per kv head, 1..16
  int32_t head_base;              // first of them this launch handles (0 or 8: the mma rows hold 8)
  int32_t transform;              // Config::transform: Hadamard = K/V stored as x R, so q is
                                  // rotated in the kernel and the output rotated back in the merge
  int32_t batch;
  const int32_t* lengths;         // this layer's token counts (device), by slot
  const int32_t* slots;           // device [batch] (plan-based), or null: slots[b] = seq_slot[b]
  int32_t seq_slot[kMaxBatch];
};

/// Sequence b of the batch: its slot and its tokens, read on the device (so a
/// replayed CUDA graph sees the current lengths).
__host__ __device__ inline AttendSeq attend_seq(const AttendParams& p, int b) {
  const int32_t slot = p.slots ? p.slots[b] : p.seq_slot[b];
  return {slot, slot >= 0 ? p.lengths[slot] : 0};
}

struct SplitPlan {
  int units_per_split;
  int splits;
};

/// Flash-decoding split: enough CTAs for about two waves on `sms`
/// multiprocessors holding `ctas_per_sm` CTAs each, each CTA at least one
/// unit per warp.
inline SplitPlan plan_splits(int max_units, int batch, int kv_heads, int sms, int ctas_per_sm = 2) {
  if (max_units <= 0) return {1, 1};
  const long long target_ctas = 2LL * (ctas_per_sm > 0 ? ctas_per_sm : 1) * sms;
  const long long total_units = 1LL * max_units * batch * kv_heads;
  long long per = (total_units + target_ctas - 1) / target_ctas;
  if (per < kAttnWarps) per = kAttnWarps;
  const int splits = int((max_units + per - 1) / per);
  return {int(per), splits};
}

}  // namespace detail
}  // namespace kvcomp
