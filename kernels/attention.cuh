// Fused decode attention straight from compressed blocks (format v4).
//
// grid (splits, kv_heads x row tiles, batch); each CTA takes a range of
// `units` (token blocks, plus the uncompressed tail as the last unit, or
// after the last split's blocks where tail_rides() says so) of one
// sequence and one KV head, for a tile of 8 mma rows: (query token, query
// head) pairs of that KV head (GQA and multi-token queries share one decode
// of a block among 8 rows; more rows take more tiles, each decoding again).
// Rows see the tokens up to their query's position (causal), within the
// sliding window plus sinks if any; the units no row sees are skipped. A CTA
// has 4 warps, or the SM's warps in two CTAs or one where the split plan finds
// that the call fills the chip (fused_cta_warps): fewer copies of the decode
// tables leave more L1 for the stream words. Each warp
// streams whole blocks, 32 tokens (a chunk) at a time, on tensor cores
// (mma.m16n8k16, fp16 operands, fp32 accumulation):
//   K: S^T[h][t] = sum_c (q_hc step_c) code_tc + sum_c q_hc min_c. A = q x
//      step for the 8 heads in rows 0..7 and its fp16 rounding rest in rows
//      8..15 (so the fp16 products keep fp32-like precision; the two halves
//      of the accumulator are summed), B = the codes, which each lane decodes
//      straight into its B fragment (format.hpp orders the lane streams that
//      way): one table lookup gives a pair of codes as fp16x2 (subnormals,
//      code x 2^-22: the sums are scaled back once), one AND makes it an
//      operand;
//   online softmax of the chunk per head (a quad of lanes holds one head);
//   V: O^T[c][h] += sum_t code_tc (p_ht step_t): A = the decoded codes (16
//      channels x 16 tokens), B = p x step (hi and lo, two mmas), built from
//      the score accumulators in registers (their layout is the B layout);
//      sum_t p_ht min_t is one scalar per head, added at the end. Where V's
//      groups are channels (T > D: format::groups_are_channels), B = p and
//      the block's step_c and min_c sum_t p_ht are applied per channel at its
//      end (o runs in units of step_c while the block is decoded).
// A chunk is decoded without a per-group slow-path test (one warp vote on
// the OR of the table flags); a chunk with slow groups (PAIR_ESC, long
// codewords; rare) is decoded again with the test, its slow groups out of
// line; escaped raw values add their exact fp32 contribution through
// shared-memory corrections (lane_decoder.cuh). Decoded K/V live only in registers. Partial
// (max, sum, acc) per CTA go to a workspace; merge_kernel combines the
// splits (flash-decoding). Kernels of 2 CTAs (8 warps) per SM (two row tiles)
// pull each warp's next block into L2 while it decodes the current one.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "kvcomp/codebook.hpp"
#include "kvcomp/format.hpp"
#include "attention_params.cuh"
#include "decode_common.cuh"
#include "hadamard.cuh"
#include "lane_decoder.cuh"
#include "mma_ops.cuh"
#include "tail_attention.cuh"

namespace kvcomp {
namespace detail {

/// Starts pulling a block pair into L2 (one 128-byte line per lane and step),
/// so the decoders' scattered word loads hit L2 instead of waiting on DRAM.
__device__ __forceinline__ void prefetch_l2(const uint8_t* p, uint32_t bytes, int lane) {
  for (uint32_t off = uint32_t(lane) * 128; off < bytes; off += 32 * 128)
    asm volatile("prefetch.global.L2 [%0];" ::"l"(p + off));
}

__device__ __forceinline__ float half_lo(uint32_t w) { return __half2float(__ushort_as_half(uint16_t(w))); }
__device__ __forceinline__ float half_hi(uint32_t w) { return __half2float(__ushort_as_half(uint16_t(w >> 16))); }

/// Shared memory of the fused kernel: the two decode tables (and, per warp,
/// its block's V params and slow-path flags) are static arrays; the dynamic
/// part holds q and, per warp, K's A operands, escape
/// corrections and p of a chunk. R = 8 kTiles rows. The A operands' area
/// also holds V's escape corrections of a chunk (then the A operands are
/// built again: escapes are rare) and, at the end, the warp's partial result
/// (spilling into the K corrections' area), so that 4 CTAs fit an SM at
/// D = 128 (~48 KB each).
template <int D, int kTiles = 1, int kWarps = 4>
struct AttnSmem {
  static constexpr int kR = kMmaRows * kTiles;
  static constexpr size_t kLuts = 2 * format::kLutSize * sizeof(uint32_t);  // static
  static constexpr size_t kQ = size_t(kR) * D * sizeof(float);              // q [R][D], log2 units
  static constexpr size_t kChunk = size_t(kR) * format::kChunkTokens * sizeof(float);  // [R][32]
  static constexpr size_t kQa = size_t(kTiles) * (D / 16) * 32 * sizeof(uint4);  // K's A operands [tile][k16][lane]
  static constexpr size_t kWarp = kQa + 2 * kChunk;  // A (or V corrections, or the partial), K corrections, p
  static_assert(size_t(kR) * D * sizeof(float) <= kQa, "V corrections [R][D] fit the A operands' area");
  static_assert(size_t(kR) * (D + 2) * sizeof(float) <= kQa + kChunk, "the partial [R][D + 2] fits");
  /// Dynamic shared memory (over 48 KiB at D = 128: launches opt in).
  static constexpr size_t kBytes = kQ + kWarps * kWarp;
};

/// 16 warps per SM at D <= 128 (4 CTAs of 4 warps, 2 of 8 or one of 16,
/// see fused_cta_warps): 128 registers a thread (a few
/// values of the block loop spill, once per block or chunk, never in the
/// decode loop; 16 warps hide more of the stream reads' latency than 3 CTAs
/// with 168 registers did: 590 vs 652 us at 32k x 8; one CTA of 12 warps at
/// 168 registers, or 20 warps at 96, are slower too: bench/RESULTS.md) and
/// ~48 KB of shared memory a CTA of 4 warps. D = 256 (Gemma) doubles the output accumulators and shared
/// memory (~65 KB): 3 CTAs, 168 registers (440 B of spills; 1.41 vs 1.77 ms
/// at 32k x 8 with 2 CTAs and 255 registers; at 3 CTAs only the blocks'
/// headers are prefetched into L2, see kPrefetch). Two row tiles (16 rows: G > 8,
/// or several query tokens) double the scores and accumulators: 2 CTAs, D <=
/// 128 (3 CTAs at 168 registers spill 0.9 KB: 0.84 vs 0.70 ms at G = 16).
template <int D, int kTiles = 1>
constexpr int attn_warps_per_sm() { return fused_warps_per_sm(D, kMmaRows * kTiles); }
template <int D, int kTiles = 1, int kWarps = 4>
constexpr int attn_min_ctas() { return attn_warps_per_sm<D, kTiles>() / kWarps; }

constexpr int32_t kTransformHadamard = 1;        // AttendParams::transform, as Transform

/// kTiles: mma row tiles of 8 (query, head) rows a CTA holds; each decoded
/// block feeds kTiles x the mmas (2: 16 rows share one decode). kWarps: warps
/// a CTA (attention_params.cuh, fused_cta_warps).
template <typename QT, int D, int kTiles, int kWarps>
__global__ void __launch_bounds__(32 * kWarps, attn_min_ctas<D, kTiles, kWarps>())
    fused_attention_kernel(const __grid_constant__ AttendParams p) {
  using Smem = AttnSmem<D, kTiles, kWarps>;
  static_assert(attn_min_ctas<D, kTiles, kWarps>() >= 1, "no more warps a CTA than an SM runs");
  constexpr int kK16 = D / 16, kM16 = D / 16, kChunk = format::kChunkTokens, kR = Smem::kR;
  static_assert(kTiles == 1 || (kTiles == 2 && D <= 128), "registers: 16 rows only up to D = 128");
  static_assert(max_overread(kMaxTokensPerBlock, D) <= kDecodeOverread, "decoders may read past the pool");
  extern __shared__ __align__(16) uint8_t smem[];
  __shared__ __align__(16) uint32_t luts[2 * format::kLutSize];
  // The tables' shared-window addresses, computed once (in asm: from C++ the
  // compiler re-derived them from the CTA id at every lookup).
  uint32_t lut_k;
  asm volatile("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(lut_k) : "l"(luts));
  const uint32_t lut_v = lut_k + format::kLutSize * sizeof(uint32_t);
  // The tables' codes are fp16 subnormals, code x kLutCodeUnit: the mmas' sums are scaled back once (K: with
  // the scores, V: with the partial), and V's exact escape corrections are scaled into the mma units.
  constexpr float kCodeScale = 1.f / format::kLutCodeUnit;
  float* q_s = reinterpret_cast<float*>(smem);  // [R][D], scaled to log2 units; rows >= group are 0

  allow_dependent_launch();  // the merge's CTAs may be placed as ours finish (they wait for the whole grid)
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row = lane / 4, quad = lane % 4;  // mma fragment coordinates: this lane's head is `row`
  const int split = blockIdx.x, head = blockIdx.y % p.kv_heads, tile = blockIdx.y / p.kv_heads, b = blockIdx.z;
  const int T = p.tokens_per_block;
  const AttendSeq seq = attend_seq(p, b);
  const int2 queries = attend_queries(p, b);  // (first row in q/out, count)
  // This CTA's mma rows: (query j, head g) pairs tile * R + r = j * group + g of the KV head; mma
  // tile t holds rows 8 t .. 8 t + 7.
  const int group = min(kR, queries.y * p.group - tile * kR);  // real rows
  if (group <= 0) return;  // the entry has fewer row tiles than the launch
  const int q_heads = p.kv_heads * p.group;
  // Per row: its row of q/out and the tokens it sees, [lo, hi) (plus the sinks).
  auto row_of = [&](int r) {
    const int f = tile * kR + min(r, group - 1), j = f / p.group;  // padded rows copy the last real one
    const int hi = seq.tokens - queries.y + j + 1;
    return int4{(queries.x + j) * q_heads + head * p.group + f % p.group, p.window > 0 ? hi - p.window : 0, hi, 0};
  };
  const int nblocks = seq.blocks, tail = seq.tokens - seq.blocks * T;
  const UnitRange range = unit_range(row_of(0).y, row_of(group - 1).z, p.sinks, T, nblocks);
  const int v_tail = range.count - 1;  // the tail is the last unit, when the rows see it
  const bool has_tail = tail > 0 && v_tail >= 0 && range.unit(v_tail) == nblocks;
  // The units the splits cut: all, or the blocks, the tail then going with the last block's split (tail_rides).
  const bool rides = has_tail && tail_rides(v_tail, p.units_per_split, p.spread, kWarps,
                                            tail_cost_quarters(p.tail_dtype));
  const int cut = rides ? v_tail : range.count;
  const int per = max(p.units_per_split, (cut + p.spread - 1) / p.spread);
  const int v_begin = split * per;  // virtual units (range.unit maps them to blocks)
  const int v_end = min(cut, v_begin + per);
  const bool tail_here =
      has_tail && (rides ? split == max(0, v_tail - 1) / per : v_tail >= v_begin && v_tail < v_end);
  // The block loop reads the rows' bounds and its range from shared memory
  // (registers are full there; masks are rare).
  __shared__ int2 row_bounds[kR];  // (lo, hi)
  __shared__ int row_out[kR];      // its row of q/out (and of the split workspace)
  __shared__ UnitRange loop_range;
  __shared__ int tail_warp;              // the warp that attends the tail's first chunk, or -1
  if (threadIdx.x < kR) {
    const int4 r = row_of(threadIdx.x);
    row_bounds[threadIdx.x] = make_int2(r.y, r.z);
    row_out[threadIdx.x] = r.x;
  }
  const int v_blocks_end = min(v_end, has_tail ? v_tail : range.count);  // virtual units below it are blocks
  if (threadIdx.x == 0) {
    loop_range = range;
    tail_warp = tail_here ? (v_tail - v_begin) % kWarps : -1;
  }
  __syncthreads();
  const int k_low = int(p.books[2 * head].low_bits), v_low = int(p.books[2 * head + 1].low_bits);  // k

  // The decode tables and q: every load of a thread issued before the first
  // store (at short contexts, where a CTA decodes a block or two, one round
  // trip to L2 per loop iteration was a fifth of the kernel: 1k x 1, ncu).
  constexpr int kThreads = 32 * kWarps;
  // Whether element j of this thread's strided share of `count` exists (always, where the threads divide them).
  auto in_share = [&](int j, int count) { return count % kThreads == 0 || int(threadIdx.x) + j * kThreads < count; };
  if (v_begin < v_blocks_end) {  // blocks to decode (a CTA of the tail alone needs no tables)
    const uint4* src_k = reinterpret_cast<const uint4*>(p.books[2 * head].lut);
    const uint4* src_v = reinterpret_cast<const uint4*>(p.books[2 * head + 1].lut);
    constexpr int kLutVec = format::kLutSize * sizeof(uint32_t) / sizeof(uint4);
    constexpr int kPer = (kLutVec + kThreads - 1) / kThreads;
    uint4 k4[kPer], v4[kPer];
#pragma unroll
    for (int j = 0; j < kPer; ++j)
      if (in_share(j, kLutVec)) {
        k4[j] = src_k[threadIdx.x + j * kThreads];
        v4[j] = src_v[threadIdx.x + j * kThreads];
      }
#pragma unroll
    for (int j = 0; j < kPer; ++j)
      if (in_share(j, kLutVec)) {
        reinterpret_cast<uint4*>(luts)[threadIdx.x + j * kThreads] = k4[j];
        reinterpret_cast<uint4*>(luts + format::kLutSize)[threadIdx.x + j * kThreads] = v4[j];
      }
  }
  const QT* q = static_cast<const QT*>(p.q);
  const int q_real = group * D;
  auto load_q_row = [&](int i) { return i < q_real ? load_q(q + size_t(row_out[i / D]) * D + i % D) : 0.f; };
  constexpr int kQPer = (kR * D + kThreads - 1) / kThreads;  // load_q_row pads past kR x D with zeros
  float qv[kQPer];
#pragma unroll
  for (int j = 0; j < kQPer; ++j) qv[j] = load_q_row(threadIdx.x + j * kThreads);
  constexpr bool kPow2 = (D & (D - 1)) == 0;  // the Hadamard transform needs it (Config checks)
  if (kPow2 && p.transform == kTransformHadamard) {
    // K/V are stored rotated (x R): q.k = (q R).(k R), so rotate q (fp32, one warp per row), then scale.
#pragma unroll
    for (int j = 0; j < kQPer; ++j)
      if (in_share(j, kR * D)) q_s[threadIdx.x + j * kThreads] = qv[j];
    __syncthreads();
    if constexpr (kPow2)
      for (int g = warp; g < group; g += kWarps) hadamard_row_shared<D>(q_s + g * D);
    __syncthreads();
    for (int i = threadIdx.x; i < kR * D; i += kThreads) q_s[i] *= p.scale_log2;
  } else {
#pragma unroll
    for (int j = 0; j < kQPer; ++j)
      if (in_share(j, kR * D)) q_s[threadIdx.x + j * kThreads] = qv[j] * p.scale_log2;
  }
  uint8_t* my_area = smem + Smem::kQ + warp * Smem::kWarp;
  // [tile][k16][lane]: this lane's A fragment of K (q x step for row 8 tile + `row`, channels
  // 16 k16 + 2 quad + {0,1} and + 8, as fp16 hi in mma rows 0..7 and lo in mma rows 8..15). In
  // shared memory so that the K loop need not be unrolled over k16 (registers).
  uint4* qa = reinterpret_cast<uint4*>(my_area);
  float* vcorr = reinterpret_cast<float*>(my_area);  // [R][D]: V escape corrections of a chunk (over qa)
  float* rows = reinterpret_cast<float*>(my_area);   // [R][D + 2]: at the end, the warp's partial
  float* kcorr = reinterpret_cast<float*>(my_area + Smem::kQa);  // [R][32]: K escape corrections of a chunk
  float* pchunk = kcorr + kR * kChunk;                           // [R][32]: p of a chunk (for V escapes)
  for (int i = lane; i < kR * kChunk; i += 32) kcorr[i] = 0.f;
  __syncthreads();

  const uint32_t k_pay = uint32_t(format::payload_offset(Kind::Key, T, D));
  const uint32_t v_pay = uint32_t(format::payload_offset(Kind::Value, T, D));
  // A corrupt block table must not make us read outside the pool: a pair that
  // does not fit in it, or is too small for its headers, is read as an empty
  // pair at the pool's start (wrong numbers, but in bounds).
  auto checked_ref = [&](format::BlockRef r) {
    const bool fits = uint64_t(r.offset16) + r.k_size16 + r.v_size16 <= p.pool_units16 &&
                      r.k_size16 * 16u >= k_pay && r.v_size16 * 16u >= v_pay;
    return fits ? r : format::BlockRef{0, uint16_t((k_pay + 15) / 16), uint16_t((v_pay + 15) / 16)};
  };

  // Softmax state of row 8 t + `row` (quad-uniform running max in log2 units;
  // this lane's share of the sum of p and of sum_t p_t min_t), in shared memory
  // between chunks: in registers it was live across both decode passes and
  // spilled, and its reloads, L1 misses, stalled every chunk (SASS). The output O^T
  // accumulates on tensor cores: o[t][m16] = channels 16 m16 + row (+ 8) x
  // rows 8 t + 2 quad, 8 t + 2 quad + 1 (without the min term), in the decode
  // tables' code units (x format::kLutCodeUnit) until the partial is written.
  __shared__ float soft_s[kWarps][3][kTiles][32];  // (m, l, pmin) [t][lane]
  volatile float* soft_m = soft_s[warp][0][0] + lane;  // + 32 t
  volatile float* soft_l = soft_s[warp][1][0] + lane;
  volatile float* soft_p = soft_s[warp][2][0] + lane;
  float o[kTiles][kM16][4];
#pragma unroll
  for (int t = 0; t < kTiles; ++t) {
    soft_m[32 * t] = -INFINITY;
    soft_l[32 * t] = soft_p[32 * t] = 0.f;
#pragma unroll
    for (int i = 0; i < kM16; ++i) o[t][i][0] = o[t][i][1] = o[t][i][2] = o[t][i][3] = 0.f;
  }

  // Virtual units v_begin + warp, + 4 warps, ... below v_blocks_end (loop_range.unit maps them to blocks).
  // Each warp reads its next block's table entry while it decodes this one. With 8 warps per SM it
  // also pulls that block into L2 (G 16: 892 vs 1040 us); with 16 warps that cost 4-5% (596-609 vs
  // 568-575 us at G 4): their number hides the latency, and the prefetches only add L2 traffic.
  constexpr bool kPrefetch = attn_warps_per_sm<D, kTiles>() <= 8;
  // Otherwise it pulls only the block's headers (params and lane tables) into L2: a block starts with
  // three dependent reads (params and lane table, the scan, the stream window).
  const uint32_t k_head_lines = (k_pay + 127) / 128, v_head_lines = (v_pay + 127) / 128;
  // The table entry of virtual unit v (unchecked; none past the warp's units).
  auto load_ref = [&](int v) {
    return v < v_blocks_end ? p.table[(size_t(seq.slot) * p.max_blocks + loop_range.unit(v)) * p.kv_heads + head]
                            : format::BlockRef{};
  };
  // The entry of unit v, loaded by load_ref, checked and its block prefetched.
  auto fetch_ref = [&](int v, format::BlockRef raw) {
    if (v >= v_blocks_end) return format::BlockRef{};
    const format::BlockRef r = checked_ref(raw);
    const uint8_t* kb = p.pool + size_t(r.offset16) * 16;
    if (kPrefetch) {
      prefetch_l2(kb, (r.k_size16 + r.v_size16) * 16u, lane);
    } else if (uint32_t(lane) < k_head_lines + v_head_lines) {
      const uint8_t* at = uint32_t(lane) < k_head_lines ? kb + 128 * lane
                                                        : kb + r.k_size16 * 16u + 128 * (lane - k_head_lines);
      asm volatile("prefetch.global.L2 [%0];" ::"l"(at));
    }
    return r;
  };
  format::BlockRef next_ref = fetch_ref(v_begin + warp, load_ref(v_begin + warp));

  PairDecoder kd, vd;
  // Whether this warp decodes chunks unchecked first (warp-uniform). Only
  // with k = 0: with low bits, codewords too long to carry them are common
  // (eb 0.02 on the tiny Llama: 2.7% of pairs, every chunk); and a warp that
  // met a slow chunk tests every group from then on, so data rich in slow
  // pairs (absolute bounds with large codes, ...) pay one chunk's redo, not one each.
  // Bit 0 (K) and bit 1 (V) of warp_checked[warp]: the warp decodes that
  // stream's chunks with the test at every group. In shared memory: held in a
  // register across the block loop it was spilled, and its reload, issued just
  // before the chunk's test, stalled every chunk (ncu, 32k x 8: 2% of samples).
  __shared__ uint32_t warp_checked[kWarps];
  // Per warp: the V params of the block it decodes (2 tokens an element).
  constexpr int kVParamsPerLane = kMaxTokensPerBlock / 64;
  __shared__ uint2 vparams_s[kWarps][kMaxTokensPerBlock / 2];
  if (lane == 0) warp_checked[warp] = (k_low != 0 ? 1u : 0u) | (v_low != 0 ? 2u : 0u);
  // Where V's groups are channels (T > D, so only D < 128 compiles it): the
  // token params read as min 1, step 1 (fp16 0x3C00), so p x step is p and
  // pmin sums p over the block; at the block's start o is divided by each
  // channel's step (o then accumulates codes x p in those units), at its end
  // multiplied back, plus min_c x that sum (a multiply a channel a block).
  const bool v_channels = D < kMaxTokensPerBlock && format::groups_are_channels(Kind::Value, T, D);
  if (v_channels)
    for (int i = lane; i < kMaxTokensPerBlock / 2; i += 32) vparams_s[warp][i] = make_uint2(0x3C003C00u, 0x3C003C00u);
  __syncwarp();
  // Channel c's step in o's units for the block (a zero step, a constant channel whose codes are 0, as 1).
  auto channel_step = [](uint32_t w) {
    const float s = half_hi(w);
    return s != 0.f ? s : 1.f;
  };
  // From now on the warp decodes stream `bit` (1: K, 2: V) with the test at every group.
  auto set_checked = [&](uint32_t bit) {
    __syncwarp();  // every lane has read the flags
    if (lane == 0) warp_checked[warp] |= bit;
    __syncwarp();
  };
  for (int v = v_begin + warp; v < v_blocks_end; v += kWarps) {
    const format::BlockRef r = next_ref;
    // The next block's entry is loaded now and used after this block's start, whose own waits hide its
    // latency (checked and prefetched at once, it stalled every block: ncu at 32k x 8, 1.6% of samples).
    const format::BlockRef next_raw = load_ref(v + kWarps);
    // Whether a causal or window mask may cut into this block (the first row
    // sees the fewest tokens, the last row the most): never in plain decode.
    const int b0 = loop_range.unit(v) * T;
    const bool mask_block = b0 + T > row_bounds[0].y || (b0 < row_bounds[group - 1].x && b0 + T > p.sinks);
    const uint8_t* kb = p.pool + size_t(r.offset16) * 16;
    const uint8_t* vb = kb + r.k_size16 * 16u;
    const uint32_t* kparams = reinterpret_cast<const uint32_t*>(kb + format::params_offset());
    // The block's V params (a word per token) are copied into this warp's
    // share of vparams_s; the chunks read them there (read from global memory,
    // each chunk waited on them and on the reload of the spilled block address:
    // ncu at 32k x 8, ~1.7% of stall samples). By cp.async: a copy through
    // registers was spilled across build_qa and waited on (~2%).
    const uint2* vparams_g = reinterpret_cast<const uint2*>(vb + format::params_offset());
    const uint32_t* vparams = reinterpret_cast<const uint32_t*>(vparams_s[warp]);
    const uint32_t* vchannels = reinterpret_cast<const uint32_t*>(vparams_g);  // the same params, per channel

    // A operands of K (qa), pre-divided by a power of two when they would overflow fp16; kscale
    // multiplies that back and the codes' unit (1 / kLutCodeUnit) into the scores.
    float qmin[kTiles], kscale[kTiles];
    auto build_qa = [&] {
#pragma unroll
      for (int t = 0; t < kTiles; ++t) {
        float x[kK16][4];
        float amax = 0.f;
        qmin[t] = 0.f;
        kscale[t] = kCodeScale;
#pragma unroll
        for (int k16 = 0; k16 < kK16; ++k16)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int c = 16 * k16 + 2 * quad + 8 * h;
            const uint2 w = *reinterpret_cast<const uint2*>(kparams + c);
            const float2 qv = *reinterpret_cast<const float2*>(q_s + (8 * t + row) * D + c);
            x[k16][2 * h] = qv.x * half_hi(w.x);
            x[k16][2 * h + 1] = qv.y * half_hi(w.y);
            qmin[t] = fmaf(qv.x, half_lo(w.x), fmaf(qv.y, half_lo(w.y), qmin[t]));
            amax = fmaxf(amax, fmaxf(fabsf(x[k16][2 * h]), fabsf(x[k16][2 * h + 1])));
          }
        amax = warp_max(amax);
        float inv = 1.f;
        if (amax > 16384.f) {  // uniform
          const float e = ceilf(log2f(amax / 16384.f));
          kscale[t] = exp2f(e) * kCodeScale;
          inv = exp2f(-e);
        }
#pragma unroll
        for (int k16 = 0; k16 < kK16; ++k16) {
          uint32_t hi[2], lo[2];
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const float x0 = x[k16][2 * h] * inv, x1 = x[k16][2 * h + 1] * inv;
            hi[h] = pack_half2(x0, x1);
            lo[h] = pack_half2(x0 - half_lo(hi[h]), x1 - half_hi(hi[h]));
          }
          // mma rows 0..7 of A: q x step (hi) for the tile's rows; 8..15: the rounding rest (lo).
          qa[(t * kK16 + k16) * 32 + lane] = make_uint4(hi[0], lo[0], hi[1], lo[1]);
        }
        qmin[t] += __shfl_xor_sync(0xFFFFFFFFu, qmin[t], 1);
        qmin[t] += __shfl_xor_sync(0xFFFFFFFFu, qmin[t], 2);
      }
    };
    // The lane tables and V params are read before build_qa waits for the K params: their loads overlap.
#pragma unroll
    for (int j = 0; j < kVParamsPerLane; ++j)
      if (!v_channels && 2 * (lane + 32 * j) < T)
        cp_async8(uint32_t(__cvta_generic_to_shared(&vparams_s[warp][lane + 32 * j])), vparams_g + lane + 32 * j);
    cp_async_commit();
    const uint32_t k_bits = reinterpret_cast<const uint16_t*>(kb + format::lane_bits_offset(Kind::Key, T, D))[lane];
    const uint32_t v_bits = reinterpret_cast<const uint16_t*>(vb + format::lane_bits_offset(Kind::Value, T, D))[lane];
    build_qa();
    PairDecoder::init_pair(kd, reinterpret_cast<const uint32_t*>(kb + k_pay), (r.k_size16 * 16u - k_pay) / 4,
                           lane_stream_start(k_bits, lane), vd, reinterpret_cast<const uint32_t*>(vb + v_pay),
                           (r.v_size16 * 16u - v_pay) / 4, lane_stream_start(v_bits, lane));
    next_ref = fetch_ref(v + kWarps, next_raw);
    cp_async_wait<0>();
    __syncwarp();  // qa, vparams_s
    if (v_channels)
#pragma unroll
      for (int i = 0; i < kM16; ++i)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const float inv = 1.f / channel_step(vchannels[16 * i + row + 8 * h]);
#pragma unroll
          for (int t = 0; t < kTiles; ++t) {
            o[t][i][2 * h] *= inv;
            o[t][i][2 * h + 1] *= inv;
          }
        }

    for (int chunk = 0; chunk < T / kChunk; ++chunk) {
      // K: scores of the chunk's 32 tokens (4 n-tiles of 8); per row tile t and
      // n-tile, d0 d1 = hi part, d2 d3 = lo part of row 8 t + `row`, tokens
      // 8 n8 + 2 quad + {0, 1}. Each decoded B fragment feeds every row tile.
      // The chunk's K is decoded without a slow-path test per group: the
      // groups' table flags are OR-ed and voted on once; if any lane met a
      // slow entry (PAIR_ESC, a long codeword), the chunk is decoded again
      // from its start with the test at every group. With k = 0 and the
      // library's codebooks slow pairs are PAIR_ESC only for escaped values,
      // codes over 14 and pairs beyond the range the codebook saw (the tiny
      // Llama: none in 1.57 M pairs, bench/slow_path_count.py).
      float sc[kTiles][4][4];
      bool k_slow = false;  // warp-uniform: a group took the slow path (its raw values went to kcorr)
      auto k_pass = [&](auto checked_tag) {
        constexpr bool kChecked = decltype(checked_tag)::value;
#pragma unroll
        for (int t = 0; t < kTiles; ++t)
#pragma unroll
          for (int n = 0; n < 4; ++n) sc[t][n][0] = sc[t][n][1] = sc[t][n][2] = sc[t][n][3] = 0.f;
        uint32_t flags = 0;
        const uint4* qa_k16 = qa + lane;  // this lane's A fragments of channels 16 k16 .. (a pointer: one add a k16)
#pragma unroll 1
        for (int k16 = 0; k16 < kK16; ++k16) {
          uint4 a[kTiles];
#pragma unroll
          for (int t = 0; t < kTiles; ++t) a[t] = qa_k16[t * kK16 * 32];
          qa_k16 += 32;
#pragma unroll
          for (int n8 = 0; n8 < 4; ++n8) {
            uint32_t b0, b1;
            if constexpr (kChecked) {
              kd.group(lut_k, k_low, b0, b1, [&] { k_slow = true; }, [&] {
                // Token 8 n8 + row of the chunk; channels 16 k16 + 2 quad (+ 1, + 8).
                return EscapeSink{kcorr + opaque(8 * n8 + row), 0, kChunk, q_s, D, kparams, 16 * k16 + 2 * quad, 8, group, -1};
              });
            } else {
              kd.group_unchecked(lut_k, b0, b1, flags);
            }
#pragma unroll
            for (int t = 0; t < kTiles; ++t) mma_16816(sc[t][n8], a[t], b0, b1);
            if (n8 % 2 == 1) kd.merge();
          }
        }
        return flags;
      };
      {
        // One call site per pass kind (a third copy of the loop spilled more).
        const PairDecoder::Mark k_start = kd.mark();
        const bool k_unchecked = (warp_checked[warp] & 1u) == 0;
        if (!k_unchecked || __any_sync(0xFFFFFFFFu, k_pass(std::false_type{}) & format::kLutEscapeBit)) {
          if (k_unchecked) {
            kd.restart(k_start);
            set_checked(1u);
          }
          k_pass(std::true_type{});
        }
      }
      float s[kTiles][4][2];
#pragma unroll
      for (int t = 0; t < kTiles; ++t)
#pragma unroll
        for (int n = 0; n < 4; ++n)
#pragma unroll
          for (int i = 0; i < 2; ++i) s[t][n][i] = fmaf(sc[t][n][i] + sc[t][n][i + 2], kscale[t], qmin[t]);
      if (k_slow) {
        __syncwarp();  // the slow path's corrections
#pragma unroll
        for (int t = 0; t < kTiles; ++t)
#pragma unroll
          for (int n = 0; n < 4; ++n)
#pragma unroll
            for (int i = 0; i < 2; ++i) {
              float* at = kcorr + (8 * t + row) * kChunk + 8 * n + 2 * quad + i;
              s[t][n][i] += *at;
              *at = 0.f;
            }
        __syncwarp();
      }
      if (mask_block) {  // causal and window masks, token by token
        const int t0 = b0 + chunk * kChunk;
#pragma unroll
        for (int t = 0; t < kTiles; ++t) {
          const int2 mine = row_bounds[8 * t + row];
#pragma unroll
          for (int n = 0; n < 4; ++n)
#pragma unroll
            for (int i = 0; i < 2; ++i) {
              const int tok = t0 + 8 * n + 2 * quad + i;
              if (tok >= mine.y || (tok < mine.x && tok >= p.sinks)) s[t][n][i] = -INFINITY;
            }
        }
      }

      // Online softmax of each tile's row `row` over the chunk (the quad holds its 32 tokens), then the
      // B operands of V: p x step of that row, tokens 16 k16 + 2 quad + {0,1} (+ 8), as fp16 hi + lo
      // (two mmas: one fp16 rounding of p x step alone cost 1e-3 of the output).
      uint32_t pb[kTiles][2][2], pl[kTiles][2][2];
      float m[kTiles], l[kTiles], pmin[kTiles];
#pragma unroll
      for (int t = 0; t < kTiles; ++t) {
        m[t] = soft_m[32 * t];
        l[t] = soft_l[32 * t];
        pmin[t] = soft_p[32 * t];
        float cmax = -INFINITY;
#pragma unroll
        for (int n = 0; n < 4; ++n) cmax = fmaxf(cmax, fmaxf(s[t][n][0], s[t][n][1]));
        const QuadSoftmaxStep step = quad_softmax_step(m[t], cmax);
        const float m_sub = step.sub, corr = step.scale;
        m[t] = step.max;
        l[t] *= corr;
        pmin[t] *= corr;
        // o[t] holds rows 8 t + 2 quad and + 1, whose quads are lanes 8 quad and 8 quad + 4.
        const float corr_a = __shfl_sync(0xFFFFFFFFu, corr, 8 * quad);
        const float corr_b = __shfl_sync(0xFFFFFFFFu, corr, 8 * quad + 4);
#pragma unroll
        for (int i = 0; i < kM16; ++i) {
          o[t][i][0] *= corr_a;
          o[t][i][1] *= corr_b;
          o[t][i][2] *= corr_a;
          o[t][i][3] *= corr_b;
        }
#pragma unroll
        for (int n = 0; n < 4; ++n) {
          const int tok = 8 * n + 2 * quad;  // in the chunk
          const uint2 w = *reinterpret_cast<const uint2*>(vparams + chunk * kChunk + tok);
          const float p0 = exp2f(s[t][n][0] - m_sub), p1 = exp2f(s[t][n][1] - m_sub);
          l[t] += p0 + p1;
          pmin[t] = fmaf(p0, half_lo(w.x), fmaf(p1, half_lo(w.y), pmin[t]));
          const float x0 = p0 * half_hi(w.x), x1 = p1 * half_hi(w.y);
          const uint32_t hi = pack_half2(x0, x1);
          pb[t][n / 2][n % 2] = hi;
          pl[t][n / 2][n % 2] = pack_half2(x0 - half_lo(hi), x1 - half_hi(hi));
          *reinterpret_cast<float2*>(pchunk + (8 * t + row) * kChunk + tok) = make_float2(p0, p1);
        }
        soft_m[32 * t] = m[t];
        soft_l[32 * t] = l[t];
        soft_p[32 * t] = pmin[t];
      }
      __syncwarp();

      // V: O^T[channels][heads] += codes (A, decoded) x (p x step) (B). At the chunk's first slow
      // group the warp clears vcorr (qa's area: K is done with it until the next chunk).
      bool v_slow = false;  // warp-uniform
      auto on_v_slow = [&] {
        if (!v_slow) {
          __syncwarp();
          for (int i = lane; i < kR * D; i += 32) vcorr[i] = 0.f;
          __syncwarp();
          v_slow = true;
        }
      };
      // As K's, the chunk's V is decoded without a per-group slow-path test;
      // but its products went into o, so if a lane met a slow entry the
      // unchecked pass is replayed with p negated (the same codes: o gets
      // back its value before the chunk, up to fp32 rounding) and the chunk
      // is decoded again with the test at every group (rare: see K's);
      // `sign` flips p's fp16 signs.
      auto v_pass = [&](auto checked_tag, uint32_t sign) {
        constexpr bool kChecked = decltype(checked_tag)::value;
        uint32_t flags = 0;
#pragma unroll 1
        for (int k16 = 0; k16 < 2; ++k16) {
          uint32_t b0[kTiles], b1[kTiles], l0[kTiles], l1[kTiles];
#pragma unroll
          for (int t = 0; t < kTiles; ++t) {
            b0[t] = (k16 ? pb[t][1][0] : pb[t][0][0]) ^ sign;
            b1[t] = (k16 ? pb[t][1][1] : pb[t][0][1]) ^ sign;
            l0[t] = (k16 ? pl[t][1][0] : pl[t][0][0]) ^ sign;
            l1[t] = (k16 ? pl[t][1][1] : pl[t][0][1]) ^ sign;
          }
#pragma unroll
          for (int m16 = 0; m16 < kM16; ++m16) {
            uint4 a;
            // Channels 16 m16 + row (+ 8), tokens 16 k16 + 2 quad (+ 1), then tokens + 8.
            if constexpr (kChecked) {
              // The values' mins: their tokens', or their channels' (v_channels).
              auto v_sink = [&](int tok) {
                const int c = opaque(16 * m16 + row);
                return v_channels ? EscapeSink{vcorr + c, 8, D, pchunk, kChunk, vchannels, tok, 0, group, c}
                                  : EscapeSink{vcorr + c, 8, D, pchunk, kChunk, vparams + chunk * kChunk, tok, 0, group, -1};
              };
              vd.group(lut_v, v_low, a.x, a.y, on_v_slow, [&] { return v_sink(16 * k16 + 2 * quad); });
              vd.group(lut_v, v_low, a.z, a.w, on_v_slow, [&] { return v_sink(16 * k16 + 2 * quad + 8); });
            } else {
              vd.group_unchecked(lut_v, a.x, a.y, flags);
              vd.group_unchecked(lut_v, a.z, a.w, flags);
            }
#pragma unroll
            for (int t = 0; t < kTiles; ++t) {
              mma_16816(o[t][m16], a, b0[t], b1[t]);
              mma_16816(o[t][m16], a, l0[t], l1[t]);
            }
            vd.merge();
          }
        }
        return flags;
      };
      {
        const PairDecoder::Mark v_start = vd.mark();
        const bool v_unchecked = (warp_checked[warp] & 2u) == 0;
        if (!v_unchecked || __any_sync(0xFFFFFFFFu, v_pass(std::false_type{}, 0u) & format::kLutEscapeBit)) {
          if (v_unchecked) {
            vd.restart(v_start);
            v_pass(std::false_type{}, 0x80008000u);
            vd.restart(v_start);
            set_checked(2u);
          }
          v_pass(std::true_type{}, 0u);
        }
      }
      if (v_slow) {
        __syncwarp();
#pragma unroll
        for (int t = 0; t < kTiles; ++t)
#pragma unroll
          for (int i = 0; i < kM16; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) {
              const int c = 16 * i + row + 8 * (j >> 1);  // exact contributions, in o's units
              const float unit = v_channels ? format::kLutCodeUnit / channel_step(vchannels[c]) : format::kLutCodeUnit;
              o[t][i][j] += vcorr[(8 * t + 2 * quad + (j & 1)) * D + c] * unit;
            }
        __syncwarp();
        build_qa();  // over vcorr
      }
      __syncwarp();  // pchunk, kcorr and qa are reused by the next chunk
    }
    if (v_channels)  // o back to the partial's units: x step_c, + min_c x the block's sum of p (row pairs as o)
#pragma unroll
      for (int t = 0; t < kTiles; ++t) {
        float psum = soft_p[32 * t];
        psum += __shfl_xor_sync(0xFFFFFFFFu, psum, 1);
        psum += __shfl_xor_sync(0xFFFFFFFFu, psum, 2);
        const float psum_a = __shfl_sync(0xFFFFFFFFu, psum, 8 * quad) * format::kLutCodeUnit;
        const float psum_b = __shfl_sync(0xFFFFFFFFu, psum, 8 * quad + 4) * format::kLutCodeUnit;
        soft_p[32 * t] = 0.f;
#pragma unroll
        for (int i = 0; i < kM16; ++i)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const uint32_t w = vchannels[16 * i + row + 8 * h];
            const float step = channel_step(w), vmin = half_lo(w);
            o[t][i][2 * h] = fmaf(o[t][i][2 * h], step, vmin * psum_a);
            o[t][i][2 * h + 1] = fmaf(o[t][i][2 * h + 1], step, vmin * psum_b);
          }
      }
  }

  // This warp's partial for its R rows into `rows`: the min term on every channel, the sum.
  float m[kTiles], l[kTiles], pmin[kTiles];
#pragma unroll
  for (int t = 0; t < kTiles; ++t) {
    m[t] = soft_m[32 * t];
    l[t] = soft_l[32 * t];
    pmin[t] = soft_p[32 * t];
    l[t] += __shfl_xor_sync(0xFFFFFFFFu, l[t], 1);
    l[t] += __shfl_xor_sync(0xFFFFFFFFu, l[t], 2);
    pmin[t] += __shfl_xor_sync(0xFFFFFFFFu, pmin[t], 1);
    pmin[t] += __shfl_xor_sync(0xFFFFFFFFu, pmin[t], 2);
    const float pmin_a = __shfl_sync(0xFFFFFFFFu, pmin[t], 8 * quad);
    const float pmin_b = __shfl_sync(0xFFFFFFFFu, pmin[t], 8 * quad + 4);
#pragma unroll
    for (int i = 0; i < kM16; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j)
        rows[(8 * t + 2 * quad + (j & 1)) * (D + 2) + 16 * i + row + 8 * (j >> 1)] =
            o[t][i][j] * kCodeScale + ((j & 1) ? pmin_b : pmin_a);
    if (quad == 0) {
      rows[(8 * t + row) * (D + 2) + D] = m[t];
      rows[(8 * t + row) * (D + 2) + D + 1] = l[t];
    }
  }
  __syncwarp();

  // The uncompressed tail, if this CTA has it: its 32-token chunks are spread
  // over the warps from tail_warp on, each folded into that warp's partial (a
  // warp takes every kWarps-th chunk: with T = 128 and max_rollback a tail has
  // up to 255 tokens, 8 chunks; kernels/tail_attention.cuh).
  if (tail_warp >= 0 && 32 * ((warp - tail_warp + kWarps) % kWarps) < tail)
    attend_tail<D, kR>(TailArgs{p.k_tail, p.v_tail, p.tail_rows, p.tail_row_bytes, p.tail_codes, p.tail_dtype,
                                p.sinks, seq.slot * p.kv_heads + head, nblocks * T, tail,
                                32 * ((warp - tail_warp + kWarps) % kWarps), 32 * kWarps},
                       group, q_s, rows, row_bounds);
  __syncthreads();

  // Merge the warps' partials: this split's (acc, max, sum) per real row.
  for (int i = threadIdx.x; i < group * D; i += blockDim.x) {
    const int g = i / D, d = i % D;
    auto warp_row = [&](int w) {
      return reinterpret_cast<const float*>(smem + Smem::kQ + w * Smem::kWarp) + g * (D + 2);
    };
    write_partial(p.part + (size_t(row_out[g]) * p.splits + split) * (D + 2), D, d, merge_warps<kWarps>(warp_row, D, d));
  }
}

}  // namespace detail
}  // namespace kvcomp
