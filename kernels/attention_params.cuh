// What the fused attention kernel is told (plain data, host and device).
#pragma once

#include <cstdint>

#include "kvcomp/codebook.hpp"
#include "kvcomp/format.hpp"

namespace kvcomp {
namespace detail {

/// Warps a CTA of the KIVI baseline, and of the fused kernel's smallest CTAs (fused_cta_warps).
constexpr int kAttnWarps = 4;
constexpr int kMaxBatch = 256;
constexpr int kMaxTokensPerBlock = 128;
constexpr int kMmaRows = 8;  // (query, head) rows of a KV head one CTA of the fused kernel holds
/// Most query heads per KV head (multi-query models reach 71): rows beyond a
/// CTA's 8 or 16 take more row tiles, each decoding the blocks again.
constexpr int kMaxGroup = 128;

/// Bytes a decoder may read past the end of its block (lookahead, and corrupt
/// lane tables clamped to the block end): the pool is followed by at least
/// this much readable memory.
/// Bound: a lane consumes at most max_lane_bits (every pair escaped with two
/// raw values) from a start that is at most the block end, and its window
/// and queue hold 7 words beyond its position, plus 2 words it loads at a merge
/// (T = 128, D = 256: 5864 bytes).
constexpr uint32_t kDecodeOverread = 8192;
constexpr uint32_t max_overread(int tokens, int head_dim) {
  return (format::max_lane_bits(tokens, head_dim) + 7) / 8 + 40;
}

struct AttendSeq {
  int32_t slot;    // sequence slot in the cache's tables (-1: idle, no tokens)
  int32_t tokens;  // tokens stored (compressed blocks * T + tail)
  int32_t blocks;  // compressed blocks (the tail holds tokens - blocks * T: up to T - 1, or T + max_rollback - 1)
};

struct AttendParams {
  const uint8_t* pool;
  uint64_t pool_units16;          // pool bytes / 16: block refs pointing past it are skipped
  const format::BlockRef* table;  // this layer: [slot][max_blocks][kv_heads]
  const CodebookTables* books;    // this layer: [kv_heads][K, V]
  const void* k_tail;             // this layer's K tails: [slot][kv_heads][tail_rows] rows of tail_row_bytes,
                                  // token t in row t % tail_rows (TailLayout): D of tail_dtype, or Codes8 rows
  const void* v_tail;             // this layer's V tails, same layout
  int32_t tail_rows;
  int32_t tail_row_bytes;
  int32_t tail_codes;             // 8 or 6: Codes8 / Codes6 rows (kvcomp/tail_codes.hpp), params of tail_dtype
  const void* q;                  // [batch][q_heads][D]
  void* out;                      // [batch][q_heads][D]
  float* part;                    // [batch][q_heads][splits][D + 2]
  int32_t tokens_per_block;       // T
  int32_t kv_heads;
  int32_t max_blocks;
  int32_t units_per_split;        // at least; a sequence of u units takes max(this, ceil(u / spread)) per split
  int32_t splits;
  int32_t spread;                 // the most splits one sequence is cut into (1..splits): splits for an eager
                                  // call; for a plan's replays, the CTA places a wave has for each of its items
  int32_t warps;                  // warps per CTA: one of fused_cta_warps() (else 4 are launched)
  float scale_log2;               // softmax scale * log2(e)
  int32_t tail_dtype;
  int32_t group;                  // query heads per kv head, 1..16
  // Rows of a KV head: entry b's (query j, head g) pairs, j * group + g, cut into tiles of 8 (the mma
  // rows); grid y = kv_heads * row_tiles, a tile per CTA (one decode of the blocks per tile).
  int32_t row_tiles;
  // A query sees tokens [lo, hi): hi = its position + 1 (causal), lo = hi - window (0: no window), and
  // tokens below `sinks` (attention sinks; with a window only).
  int32_t window;
  int32_t sinks;
  int32_t transform;              // Config::transform: Hadamard = K/V stored as x R, so q is
                                  // rotated in the kernel and the output rotated back in the merge
  int32_t batch;
  const int32_t* lengths;         // this layer's token counts (device), by slot
  const int32_t* closed;          // this layer's block counts (device), by slot
  const int32_t* slots;           // device [batch] (plan-based), or null: slots[b] = seq_slot[b]
  int32_t seq_slot[kMaxBatch];
  // Queries: 0 (plan-based): entry b has one query, row b of q/out. 1: entry b has q_count[b] query tokens,
  // rows q_first[b] .. + q_count[b] - 1; query j sits at position tokens - q_count[b] + j (the last
  // q_count[b] tokens were appended with them) and sees the tokens up to it.
  int32_t multi_query;
  int32_t q_first[kMaxBatch];
  int32_t q_count[kMaxBatch];
};

/// Entry b's query tokens and the first of their rows in q/out.
__host__ __device__ inline int2 attend_queries(const AttendParams& p, int b) {
  return p.multi_query ? int2{p.q_first[b], p.q_count[b]} : int2{b, 1};
}

/// The units (blocks, then the tail as one more) that queries seeing [lo, hi)
/// plus the sinks need, as a list of `count` virtual units: the sink units
/// [0, sink_units), then [first, first + count - sink_units).
struct UnitRange {
  int sink_units;
  int first;
  int count;
  __host__ __device__ int unit(int v) const { return v < sink_units ? v : first + (v - sink_units); }
};
/// lo_min, hi_max: the loosest bounds of the rows of a tile; blocks: the
/// sequence's compressed blocks (token t is in unit min(t / T, blocks): the
/// tail, unit `blocks`, may hold more than T tokens).
__host__ __device__ inline UnitRange unit_range(int lo_min, int hi_max, int sinks, int T, int blocks) {
  auto unit_of = [&](int t) { return t / T < blocks ? t / T : blocks; };
  const int end = hi_max <= 0 ? 0 : unit_of(hi_max - 1) + 1;
  int first = lo_min > 0 ? unit_of(lo_min) : 0;
  int sink_units = sinks > 0 ? unit_of(sinks - 1) + 1 : 0;
  if (sink_units >= first) sink_units = first = 0;  // the sinks touch the window: one range
  if (first > end) first = end;
  if (sink_units > end) sink_units = end;
  return {sink_units, first, sink_units + (end - first)};
}

/// Sequence b of the batch: its slot and its tokens, read on the device (so a
/// replayed CUDA graph sees the current lengths).
__host__ __device__ inline AttendSeq attend_seq(const AttendParams& p, int b) {
  const int32_t slot = p.slots ? p.slots[b] : p.seq_slot[b];
  return {slot, slot >= 0 ? p.lengths[slot] : 0, slot >= 0 ? p.closed[slot] : 0};
}

struct SplitPlan {
  int units_per_split;
  int splits;
  int warps = kAttnWarps;  // per CTA
  bool tail_rides = false;  // the longest's tail rides with its last block's split (tail_rides())
  int load_quarters = 0;    // the busiest warp's work, in quarters of a block
  int ctas_per_sm = 1;      // of this CTA size, as planned (the places a wave has: x SMs)
};

/// How a sequence of `blocks` blocks (and a tail, if `tail`) is cut into
/// splits of `per` units and what the busiest of a CTA's `warps` warps does,
/// in quarters of a block (the tail costs tail_quarters): the fused kernel's
/// rule. rides: the tail goes after the last split's blocks instead of being
/// cut with them.
struct SplitLoad {
  int splits;
  long long quarters;
};
__host__ __device__ inline SplitLoad split_load(int blocks, bool tail, bool rides, int per, int warps,
                                                int tail_quarters) {
  const int units = blocks + (tail && !rides ? 1 : 0);
  const int splits = units > 0 ? (units + per - 1) / per : 1;
  long long q = splits > 1 ? 4LL * ((per + warps - 1) / warps) : 0;  // a full split
  const int last = units - (splits - 1) * per;          // units of the last split
  const int i = tail && !rides ? last - 1 : last;       // its blocks; the tail's warp has i / warps of them
  q = q > 4LL * ((i + warps - 1) / warps) ? q : 4LL * ((i + warps - 1) / warps);
  if (tail && 4LL * (i / warps) + tail_quarters > q) q = 4LL * (i / warps) + tail_quarters;
  return {splits, q};
}

/// Warps an SM runs of the fused kernel: 16 at 128 registers a thread; 8 with
/// two row tiles (255 registers) and 12 at head_dim 256 (168).
constexpr int fused_warps_per_sm(int D, int tile_rows) { return D > 128 ? 12 : tile_rows > kMmaRows ? 8 : 16; }

/// The fused kernel's CTA sizes: 4 warps, and the SM's warps in two CTAs or
/// in one (16 warps an SM at one row tile and D <= 128: 4, 8 or 16; D = 256:
/// 4, 6, 12; two row tiles: 4 and 8). Fewer, larger CTAs hold fewer copies of
/// the 16 KB decode tables, which leaves the SM more L1 cache for the lanes'
/// stream words (4 CTAs an SM at D = 128: 200 KB of shared memory, ~55 KB of
/// L1 for ~118 KB of blocks in decode, 64% hits); small CTAs spread a short
/// call over more SMs. Size i of a shape (0 where it repeats a smaller one).
constexpr int fused_cta_warps(int D, int tile_rows, int i) {
  const int w = i == 0 ? 4 : fused_warps_per_sm(D, tile_rows) / (i == 1 ? 2 : 1);
  return i > 0 && w <= 4 ? 0 : w;
}

/// Time of a CTA's fixed work (tables, q, the partial, its share of the
/// merge) in units of one block decoded by each of its warps; measured on the
/// H100 at D = 128, full load: ~20 us against ~16 us a block.
constexpr int kCtaCostQuarters = 5;

/// What a tail costs the warp that attends it, in quarters of a block
/// (plan_splits): fp16/bf16 rows and code rows (Codes8 / Codes6) with fp16/bf16
/// params go on tensor cores (kernels/tail_attention.cuh; 4159 x 8 riding:
/// 58.8 us, 4096 x 8: ~55.5), fp32 rows and code rows with fp32 params on
/// CUDA cores, a little more than a block (measured with Codes8 rows on CUDA
/// cores, before 974037b: 32831 x 8 380.0 us riding, 374.2 as a unit of its
/// own; H100, bench/RESULTS.md).
/// The tail's type (its elements', or its code rows' params') decides the path.
__host__ __device__ inline int tail_cost_quarters(int dtype) {
  return dtype == 0 || dtype == 1 ? 1 : 5;
}

/// Whether the fused kernel sends a sequence's tail with its last block's
/// split (after that split's blocks) instead of cutting it with the blocks as
/// a unit of its own: where that makes the busiest warp's work smaller
/// (split_load), given what the launch fixes (at least `ups` units a split,
/// `splits` splits, `warps` a CTA). Decided per sequence on the device, so
/// CUDA-graph replays (whose lengths the plan does not know) ride too.
__host__ __device__ inline bool tail_rides(int blocks, int ups, int splits, int warps, int tail_quarters) {
  auto per_for = [&](int units) { return ups > (units + splits - 1) / splits ? ups : (units + splits - 1) / splits; };
  return split_load(blocks, true, true, per_for(blocks), warps, tail_quarters).quarters <
         split_load(blocks, true, false, per_for(blocks + 1), warps, tail_quarters).quarters;
}

/// Flash-decoding split of `max_units` units (blocks and the tail) of each of
/// `batch` x `kv_heads` work items (a row tile of a sequence's KV head) into
/// CTAs of kAttnWarps warps, `ctas_per_sm` CTAs resident on each of `sms`
/// multiprocessors. CTAs of equal work run in waves, so the split minimizes
/// waves x (blocks per warp + a CTA's fixed cost): one more wave of CTAs
/// that are each half as long costs one more fixed cost, and CTAs that
/// spill just past a wave cost a whole wave (32k x 8: 17 splits, 1088 CTAs
/// for 528 places, were 2.06 waves). At least one unit per warp.
/// tail_quarters > 0: the longest sequence's last unit is its tail, which
/// costs that many quarters of a block; the plan then also weighs the tail
/// riding with the last block's split (split_load, tail_rides): at 32k x 8
/// (512 blocks and a tail in 2 splits of 16-warp CTAs) the tail as a unit of
/// its own gives every warp of split 0 a 17th block, riding it gives 16.
inline SplitPlan plan_splits(int max_units, int batch, int kv_heads, int sms, int ctas_per_sm = 2,
                             int warps = kAttnWarps, int tail_quarters = 0) {
  ctas_per_sm = ctas_per_sm > 0 ? ctas_per_sm : 1;
  if (max_units <= 0) return {1, 1, warps, false, 0, ctas_per_sm};
  const long long places = 1LL * ctas_per_sm * (sms > 0 ? sms : 1);
  const long long items = 1LL * (batch > 0 ? batch : 1) * (kv_heads > 0 ? kv_heads : 1);
  const bool tail = tail_quarters > 0;
  const int blocks = tail ? max_units - 1 : max_units;
  SplitPlan best{max_units, 1, warps, false, 0, ctas_per_sm};
  long long best_cost = -1;
  const int max_per_warp = (max_units + warps - 1) / warps;
  for (int per_warp = 1; per_warp <= max_per_warp; ++per_warp) {
    if (best_cost >= 0 && 4LL * per_warp + kCtaCostQuarters >= best_cost) break;  // one wave costs more
    const int per = per_warp * warps;
    for (int rides = 0; rides <= (tail ? 1 : 0); ++rides) {
      const SplitLoad s = split_load(blocks, tail, rides != 0, per, warps, tail ? tail_quarters : 4);
      const long long waves = (s.splits * items + places - 1) / places;
      const long long cost = waves * (s.quarters + kCtaCostQuarters);
      if (best_cost < 0 || cost < best_cost) {
        best_cost = cost;
        best = {per, s.splits, warps, rides != 0, int(s.quarters), ctas_per_sm};
      }
    }
  }
  return best;
}

/// The fused kernel's plan: the split (plan_splits) for each CTA size of the
/// shape (`warps[i]` warps a CTA, `ctas_per_sm[i]` of them resident on an
/// SM; 0: no such size), the cheapest by waves x (blocks a warp x their
/// cost + a CTA's fixed cost). Larger CTAs decode a block ~4% (8 warps) and
/// ~6% (16 warps) faster at full load (H100, 32k x 8), but are considered
/// only where their first wave fills 90% of the chip's CTA places: a call
/// too small for that (1k x 1: 16 CTAs of 16 warps on 16 SMs, +27%) is
/// spread over more SMs in smaller CTAs.
inline SplitPlan plan_attention(int max_units, int batch, int kv_heads, int sms, const int warps[3],
                                const int ctas_per_sm[3], int tail_quarters = 0) {
  constexpr int kBlockCost[3] = {100, 96, 94};      // a block's time a warp, per CTA size (%)
  constexpr int kCtaCost = 25 * kCtaCostQuarters;  // in the same unit
  SplitPlan best{};
  long long best_cost = -1;
  for (int i = 0; i < 3; ++i) {
    // 4-warp CTAs are always planned (plan_splits takes an unknown occupancy as 1 an SM).
    if (i > 0 && (warps[i] <= 0 || ctas_per_sm[i] <= 0)) continue;
    const SplitPlan s = plan_splits(max_units, batch, kv_heads, sms, ctas_per_sm[i], warps[i], tail_quarters);
    const long long places = 1LL * s.ctas_per_sm * (sms > 0 ? sms : 1);
    const long long ctas = 1LL * s.splits * (batch > 0 ? batch : 1) * (kv_heads > 0 ? kv_heads : 1);
    if (i > 0 && 10 * ctas < 9 * places) continue;  // the first wave would leave SMs idle
    const long long waves = (ctas + places - 1) / places;
    const long long cost = waves * (1LL * s.load_quarters * kBlockCost[i] + 4 * kCtaCost);  // in quarters
    if (best_cost < 0 || cost < best_cost) {
      best_cost = cost;
      best = s;
    }
  }
  return best;
}

/// AttendParams::spread for a plan made before the lengths are known
/// (Cache::make_plan): the CTA places one wave has for each of the launch's
/// `items` (sequence, row tile, kv head) pairs, at most the plan's splits and
/// at least 1. The kernel cuts a sequence of u units into splits of
/// ceil(u / spread) (its minimum, one unit), so a short sequence takes a few
/// busy warps in each of many CTAs in one wave instead of a unit a warp in a
/// few CTAs (a 128k plan replayed at 1k x 1: 32.8 -> 25.4 us, H100).
inline int plan_spread(int splits, int ctas_per_sm, int sms, long long items) {
  const long long places = 1LL * (ctas_per_sm > 0 ? ctas_per_sm : 1) * (sms > 0 ? sms : 1);
  long long spread = places / (items > 0 ? items : 1);
  if (spread > splits) spread = splits;
  return spread > 1 ? int(spread) : 1;
}

}  // namespace detail
}  // namespace kvcomp
