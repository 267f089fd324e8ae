// Store path: blockwise quantize + Huffman-encode on the GPU.
//
// One warp compresses one block (K or V of one StoreJob); its 32 lanes produce
// the 32 sub-streams of the format (format.hpp). Three kernels share the
// per-lane pair walk (for_each_lane_pair, pair_position() order):
//   histogram_kernel: stream symbols (pair_symbol under every low-bit count
//                     k = 0..kMaxLowBits) -> kLowBitChoices histograms per
//                     codebook (used once per (layer, head, K|V) to build the
//                     codebook, which picks its k from them);
//   measure_kernel:   compressed size of every block (for place_kernel);
//   encode_kernel:    writes blocks at their final pool offsets.
// Bit counts and bits come from format::pair_bits / format::put_pair under
// the codebook's k (CodebookTables::low_bits), the functions the CPU
// reference encodes with. Every lane writes whole 32-bit
// words; the one word two lanes share at a stream boundary is merged with a
// shuffle, so no atomics and no zeroing.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "kvcomp/codebook.hpp"
#include "kvcomp/format.hpp"
#include "store_job.cuh"

namespace kvcomp {
namespace detail {

constexpr int kStoreWarps = 4;  // blocks compressed per CTA
constexpr int kMaxGroups = 256;

// Input elements as fp32, exactly as kvcomp::load_as_float (dtype.hpp) on the
// host, NaN payloads included: an escaped value's raw bits must match the
// reference bit for bit, and the hardware conversions may canonicalize NaNs.
__device__ __forceinline__ float load_exact(__half x) {
  const uint16_t h = __half_as_ushort(x);
  return (h & 0x7FFFu) > 0x7C00u ? format::half_to_float(h) : __half2float(x);  // exact for non-NaN
}
__device__ __forceinline__ float load_exact(__nv_bfloat16 x) {
  return format::bits_float(uint32_t(__bfloat16_as_ushort(x)) << 16);
}
__device__ __forceinline__ float load_exact(float x) { return x; }

/// Row t of a block: tail row (held back by the cache, the input's type) or input row.
template <typename Elem>
struct BlockRows {
  const Elem* tail;
  const Elem* in;
  int64_t stride;
  int tail_tokens;
  int head_dim;
  __device__ BlockRows(const StoreJob& job, Kind kind, int D)
      : tail(static_cast<const Elem*>(kind == Kind::Key ? job.k_tail : job.v_tail)),
        in(static_cast<const Elem*>(kind == Kind::Key ? job.k_in : job.v_in)),
        stride(job.in_token_stride), tail_tokens(job.tail_tokens), head_dim(D) {}
  __device__ __forceinline__ const Elem* row(int t) const {
    return t < tail_tokens ? tail + size_t(t) * head_dim : in + int64_t(t - tail_tokens) * stride;
  }
  __device__ __forceinline__ float load(const Elem* r, int c) const { return load_exact(r[c]); }
  __device__ __forceinline__ float get(int t, int c) const { return load(row(t), c); }
};

/// Fills params[G] (shared memory) with the quantizer of every group.
template <typename Elem>
__device__ void block_params_warp(const StoreJob& job, Kind kind, int T, int D, format::GroupQuant* params) {
  const int lane = threadIdx.x % 32;
  const ErrorBound eb = kind == Kind::Key ? job.eb_k : job.eb_v;
  const BlockRows<Elem> rows(job, kind, D);
  if (kind == Kind::Key) {  // per channel: lane owns channels lane, lane+32, ...
    for (int c = lane; c < D; c += 32) {
      float lo = format::kEmptyLo, hi = format::kEmptyHi;
      for (int t = 0; t < T; ++t) format::range_add(rows.get(t, c), lo, hi);
      params[c] = format::make_group_quant(lo, hi, eb);
    }
  } else {  // per token: a warp reduction per row
    for (int t = 0; t < T; ++t) {
      float lo = format::kEmptyLo, hi = format::kEmptyHi;
      for (int c = lane; c < D; c += 32) format::range_add(rows.get(t, c), lo, hi);
      for (int o = 16; o > 0; o >>= 1) {
        lo = fminf(lo, __shfl_xor_sync(0xFFFFFFFFu, lo, o));
        hi = fmaxf(hi, __shfl_xor_sync(0xFFFFFFFFu, hi, o));
      }
      if (lane == 0) params[t] = format::make_group_quant(lo, hi, eb);
    }
  }
  __syncwarp();
}

/// Calls f(a, b, va, vb) for each pair of lane `lane`'s stream, in stream
/// order: pair i holds the values at format::pair_position(kind, D, lane, i)
/// (va at (t0, c0), vb at (t1, c1)) and a, b are their quantization codes
/// (0..254 or kEscape) under their groups' params (shared memory).
/// `rows.row(t)` gives a handle on token t's row, `rows.load(handle, c)` its
/// channel c as fp32. Host-callable (with host rows) so the order can be
/// checked against pair_position() without a device.
///   K: per 32-token chunk, for k16, for n8: token 8 n8 + row, channels
///      16 k16 + 2 quad + {0, 1}, then + 8 (params of 4 channels per k16);
///   V: per chunk, for k16 in 0..2, for m16: channel 16 m16 + row and + 8 at
///      tokens 16 k16 + 2 quad + {0, 1}, then both at tokens + 8 (params and
///      rows of 4 tokens per k16).
#pragma nv_exec_check_disable
template <typename Rows, typename F>
__host__ __device__ __forceinline__ void for_each_lane_pair(Kind kind, int T, int D, int lane, const Rows& rows,
                                                            const format::GroupQuant* params, F&& f) {
  const int row = lane / 4, quad = lane % 4;
  for (int t_base = 0; t_base < T; t_base += format::kChunkTokens) {
    if (kind == Kind::Key) {
      for (int k16 = 0; k16 < D / 16; ++k16) {
        const int c = 16 * k16 + 2 * quad;
        const format::GroupQuant g0 = params[c], g1 = params[c + 1], g8 = params[c + 8], g9 = params[c + 9];
#pragma unroll
        for (int n8 = 0; n8 < 4; ++n8) {
          const auto r = rows.row(t_base + 8 * n8 + row);
          const float v0 = rows.load(r, c), v1 = rows.load(r, c + 1);
          const float v8 = rows.load(r, c + 8), v9 = rows.load(r, c + 9);
          f(format::quantize(v0, g0), format::quantize(v1, g1), v0, v1);
          f(format::quantize(v8, g8), format::quantize(v9, g9), v8, v9);
        }
      }
    } else {
      for (int k16 = 0; k16 < 2; ++k16) {
        const int t = t_base + 16 * k16 + 2 * quad;
        const format::GroupQuant g0 = params[t], g1 = params[t + 1], g8 = params[t + 8], g9 = params[t + 9];
        const auto r0 = rows.row(t), r1 = rows.row(t + 1), r8 = rows.row(t + 8), r9 = rows.row(t + 9);
#pragma unroll 4
        for (int m16 = 0; m16 < D / 16; ++m16) {
          const int c = 16 * m16 + row;
          const float a0 = rows.load(r0, c), a1 = rows.load(r1, c);          // channel c, tokens t, t + 1
          const float b0 = rows.load(r0, c + 8), b1 = rows.load(r1, c + 8);  // channel c + 8
          const float a8 = rows.load(r8, c), a9 = rows.load(r9, c);          // channel c, tokens t + 8, t + 9
          const float b8 = rows.load(r8, c + 8), b9 = rows.load(r9, c + 8);
          f(format::quantize(a0, g0), format::quantize(a1, g1), a0, a1);
          f(format::quantize(b0, g0), format::quantize(b1, g1), b0, b1);
          f(format::quantize(a8, g8), format::quantize(a9, g9), a8, a9);
          f(format::quantize(b8, g8), format::quantize(b9, g9), b8, b9);
        }
      }
    }
  }
}

/// Copies a codebook's encoder table into this warp's shared `dst` (read with
/// data-dependent indices by every lane, so shared beats __ldg per pair) and
/// returns its low-bit count k (format.hpp: 0..kMaxLowBits; the tables come
/// from Codebook, which checks it).
__device__ __forceinline__ int load_enc_warp(const CodebookTables* book, uint32_t* dst) {
  const int lane = threadIdx.x % 32;
  for (int s = lane; s < format::kNumSymbols; s += 32) dst[s] = __ldg(&book->enc[s]);
  __syncwarp();
  return int(__ldg(&book->low_bits));
}

/// This lane's stream length in bits (format::pair_bits over its pairs, k low bits).
template <typename Elem>
__device__ __forceinline__ uint32_t lane_stream_bits(const StoreJob& job, Kind kind, int T, int D,
                                                     const format::GroupQuant* params, const uint32_t* enc, int k) {
  uint32_t bits = 0;
  for_each_lane_pair(kind, T, D, int(threadIdx.x % 32), BlockRows<Elem>(job, kind, D), params,
                     [&](int a, int b, float, float) { bits += format::pair_bits(enc, k, a, b); });
  return bits;
}

/// grid: ceil(2 * n_jobs / kStoreWarps) CTAs of 32 * kStoreWarps threads.
/// hist: [codebooks][kLowBitChoices][kNumSymbols] counts of stream symbols,
/// hist[book][k][s] = pairs with format::pair_symbol(a, b, k) == s (what
/// ref::add_histogram adds; codebook-independent), accumulated with atomics.
/// Shared memory: params 16 KiB + local counts 16 KiB (32-bit: a warp counts
/// at most T * D / 2 = 16384 pairs per histogram).
template <typename Elem>
__global__ void __launch_bounds__(32 * kStoreWarps) histogram_kernel(const StoreJob* jobs, int n_jobs, int T, int D,
                                                                     unsigned long long* hist, const int32_t* ready) {
  constexpr int kCounts = format::kLowBitChoices * format::kNumSymbols;
  __shared__ format::GroupQuant params[kStoreWarps][kMaxGroups];
  __shared__ uint32_t local[kStoreWarps][kCounts];  // [k][symbol] per warp
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int item = blockIdx.x * kStoreWarps + warp;
  if (item >= 2 * n_jobs || (ready && *ready != 0)) return;
  const StoreJob job = jobs[item / 2];
  if (job.tail_tokens < 0) return;
  const Kind kind = Kind(item % 2);
  uint32_t* counts = local[warp];
  for (int s = lane; s < kCounts; s += 32) counts[s] = 0;
  block_params_warp<Elem>(job, kind, T, D, params[warp]);  // ends with __syncwarp: counts are zero
  for_each_lane_pair(kind, T, D, lane, BlockRows<Elem>(job, kind, D), params[warp],
                     [&](int a, int b, float, float) {
#pragma unroll
                       for (int k = 0; k < format::kLowBitChoices; ++k)
                         atomicAdd(&counts[k * format::kNumSymbols + format::pair_symbol(a, b, k)], 1u);
                     });
  __syncwarp();
  unsigned long long* out = hist + size_t(job.codebook + int(kind)) * kCounts;
  for (int s = lane; s < kCounts; s += 32)
    if (counts[s]) atomicAdd(&out[s], (unsigned long long)counts[s]);
}

/// sizes16[2 * job + kind] = block bytes / 16 (0 for an idle job); a job's V
/// block directly follows its K block in the pool (place_kernel).
template <typename Elem>
__global__ void __launch_bounds__(32 * kStoreWarps) measure_kernel(const StoreJob* jobs, int n_jobs, int T, int D,
                                                                   const CodebookTables* books, uint32_t* sizes16) {
  __shared__ format::GroupQuant params[kStoreWarps][kMaxGroups];
  __shared__ uint32_t enc[kStoreWarps][format::kNumSymbols];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int item = blockIdx.x * kStoreWarps + warp;
  if (item >= 2 * n_jobs) return;
  const StoreJob job = jobs[item / 2];
  if (job.tail_tokens < 0) {
    if (lane == 0) sizes16[item] = 0;
    return;
  }
  const Kind kind = Kind(item % 2);
  const int k = load_enc_warp(&books[job.codebook + int(kind)], enc[warp]);
  block_params_warp<Elem>(job, kind, T, D, params[warp]);
  uint32_t bits = lane_stream_bits<Elem>(job, kind, T, D, params[warp], enc[warp], k);
  for (int o = 16; o > 0; o >>= 1) bits += __shfl_xor_sync(0xFFFFFFFFu, bits, o);
  if (lane == 0) sizes16[item] = uint32_t(format::block_bytes(kind, T, D, bits) / format::kBlockAlign);
}

/// Appends bits LSB first; stores each completed 32-bit word except a first
/// word shared with the previous lane, which is handed back at the end.
/// put(bits, n): 0 <= n <= 32, bits above n zero (put_pair's codewords, 2k
/// low bits, 8-bit fields and raw words are). fill < 32 between calls, so acc
/// holds fill + n <= 63 bits and at most one word completes per call; n = 0
/// changes nothing.
/// The boundary merge assumes every lane stream completes its first word,
/// i.e. is at least 32 bits long: it holds pairs_per_lane >= 32 pairs of at
/// least one bit each.
struct LaneWriter {
  uint32_t* payload;
  uint64_t acc;
  int fill;
  uint32_t word;
  bool hold_head;
  uint32_t head;
  uint64_t sum;  // checksum of stored words

  __device__ LaneWriter(uint32_t* p, uint32_t start_bit)
      : payload(p), acc(0), fill(int(start_bit & 31)), word(start_bit >> 5), hold_head((start_bit & 31) != 0),
        head(0), sum(0) {}

  __device__ __forceinline__ void put(uint32_t bits, int n) {
    acc |= uint64_t(bits) << fill;
    fill += n;
    if (fill >= 32) {
      const uint32_t w = uint32_t(acc);
      if (hold_head) { head = w; hold_head = false; }
      else { payload[word] = w; format::checksum_add(sum, w); }
      ++word;
      acc >>= 32;
      fill -= 32;
    }
  }
};

/// Writes job j's K block at pool + 16 * pair_at16[j] and its V block right
/// after (place_kernel's offsets), unless the job is idle or its entry failed.
template <typename Elem>
__global__ void __launch_bounds__(32 * kStoreWarps) encode_kernel(const StoreJob* jobs, int n_jobs, int T, int D,
                                                                  const CodebookTables* books,
                                                                  const uint32_t* sizes16, const uint32_t* pair_at16,
                                                                  const int32_t* entry_ok, uint8_t* pool,
                                                                  format::BlockRef* table) {
  __shared__ format::GroupQuant params[kStoreWarps][kMaxGroups];
  __shared__ uint32_t enc_s[kStoreWarps][format::kNumSymbols];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int item = blockIdx.x * kStoreWarps + warp;
  if (item >= 2 * n_jobs) return;
  const int j = item / 2;
  const StoreJob job = jobs[j];
  if (job.tail_tokens < 0 || entry_ok[job.entry] == 0) return;
  const Kind kind = Kind(item % 2);
  const uint32_t* enc = enc_s[warp];
  const int k = load_enc_warp(&books[job.codebook + int(kind)], enc_s[warp]);
  const uint32_t k16 = sizes16[2 * j], v16 = sizes16[2 * j + 1];
  const int64_t pair16 = pair_at16[j];
  const int64_t at16 = pair16 + (kind == Kind::Key ? 0 : k16);
  uint32_t* block = reinterpret_cast<uint32_t*>(pool + at16 * format::kBlockAlign);
  const uint32_t block_words = (kind == Kind::Key ? k16 : v16) * (format::kBlockAlign / 4);
  if (kind == Kind::Key && lane == 0) table[job.table_index] = {uint32_t(pair16), uint16_t(k16), uint16_t(v16)};

  block_params_warp<Elem>(job, kind, T, D, params[warp]);
  // Pass 1: lane lengths -> starts.
  const uint32_t bits = lane_stream_bits<Elem>(job, kind, T, D, params[warp], enc, k);
  uint32_t incl = bits;
  for (int o = 1; o < 32; o <<= 1) {
    const uint32_t v = __shfl_up_sync(0xFFFFFFFFu, incl, o);
    if (lane >= o) incl += v;
  }
  const uint32_t start = incl - bits, total = __shfl_sync(0xFFFFFFFFu, incl, 31);

  uint64_t sum = 0;
  // Params and lane table.
  const int groups = format::num_groups(kind, T, D);
  for (int g = lane; g < groups; g += 32) {
    const uint32_t w = params[warp][g].stored.min_bits | (uint32_t(params[warp][g].stored.step_bits) << 16);
    block[format::params_offset() / 4 + g] = w;
    format::checksum_add(sum, w);
  }
  const uint32_t next_bits = __shfl_down_sync(0xFFFFFFFFu, bits, 1);
  if (lane % 2 == 0) {
    const uint32_t w = bits | (next_bits << 16);
    block[format::lane_bits_offset(kind, T, D) / 4 + lane / 2] = w;
    format::checksum_add(sum, w);
  }

  // Pass 2: the bits.
  uint32_t* payload = block + format::payload_offset(kind, T, D) / 4;
  LaneWriter wr(payload, start);
  for_each_lane_pair(kind, T, D, lane, BlockRows<Elem>(job, kind, D), params[warp],
                     [&](int a, int b, float va, float vb) {
                       format::put_pair(enc, k, a, b, va, vb, [&](uint32_t v, int n) { wr.put(v, n); });
                     });
  sum += wr.sum;
  // Boundary words: lane l's partial last word + lane l+1's held first word.
  const uint32_t tail = uint32_t(wr.acc);
  const bool has_tail = wr.fill > 0;
  const uint32_t prev_tail = __shfl_up_sync(0xFFFFFFFFu, tail, 1);
  if ((start & 31) != 0) {
    const uint32_t w = wr.head | prev_tail;
    payload[start >> 5] = w;
    format::checksum_add(sum, w);
  }
  if (lane == 31 && has_tail) {
    payload[wr.word] = tail;
    format::checksum_add(sum, tail);
  }
  // Zero padding up to the block size.
  const uint32_t used = uint32_t(format::payload_offset(kind, T, D) / 4) + (total + 31) / 32;
  for (uint32_t w = used + lane; w < block_words; w += 32) block[w] = 0;
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xFFFFFFFFu, sum, o);
  if (lane == 0) {
    sum += job.codebook + uint32_t(kind);
    block[0] = format::kMagic | (uint32_t(kind) << 16) | (uint32_t(format::kVersion) << 24);
    block[1] = (job.codebook + uint32_t(kind)) | (uint32_t(format::checksum_fold(sum)) << 16);
  }
}

}  // namespace detail
}  // namespace kvcomp

namespace kvcomp {
namespace detail {

/// Copies input rows into a tail (in the input's type) unless the copy's
/// entry failed: grid = number of copies.
template <typename Elem>
__global__ void tail_copy_kernel(const TailCopy* copies, int D, const int32_t* entry_ok) {
  const TailCopy c = copies[blockIdx.x];
  if (c.rows <= 0 || entry_ok[c.entry] == 0) return;
  const Elem* k = static_cast<const Elem*>(c.k_in);
  const Elem* v = static_cast<const Elem*>(c.v_in);
  for (int i = threadIdx.x; i < c.rows * D; i += blockDim.x) {
    const int t = i / D, d = i % D;
    static_cast<Elem*>(c.k_dst)[i] = k[int64_t(t) * c.in_token_stride + d];
    static_cast<Elem*>(c.v_dst)[i] = v[int64_t(t) * c.in_token_stride + d];
  }
}

}  // namespace detail
}  // namespace kvcomp
