// Store path: blockwise quantize + Huffman-encode on the GPU.
//
// One warp compresses one block (K or V of one StoreJob); its 32 lanes produce
// the 32 sub-streams of the format (format.hpp). Three kernels share the
// per-lane symbol walk:
//   histogram_kernel: quantization codes -> per-codebook histograms (used once
//                     per (layer, head, K|V) to build the codebook);
//   measure_kernel:   compressed size of every block (for the offset scan);
//   encode_kernel:    writes blocks at their final pool offsets.
// Every lane writes whole 32-bit words; the one word two lanes share at a
// stream boundary is merged with a shuffle, so no atomics and no zeroing.
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

__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(float x) { return x; }

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
  __device__ __forceinline__ float get(int t, int c) const {
    return to_float(t < tail_tokens ? tail[size_t(t) * head_dim + c] : in[int64_t(t - tail_tokens) * stride + c]);
  }
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

/// Calls f(symbol, value) for each of this lane's symbols in stream order.
/// `enc` = encoder table, or nullptr for raw codes (histogram).
template <typename Elem, typename F>
__device__ __forceinline__ void for_each_lane_symbol(const StoreJob& job, Kind kind, int T, int D,
                                                     const format::GroupQuant* params, const uint32_t* enc, F&& f) {
  const int lane = threadIdx.x % 32;
  const BlockRows<Elem> rows(job, kind, D);
  if (kind == Kind::Key) {
    for (int t = lane; t < T; t += 32) {
#pragma unroll 8
      for (int c = 0; c < D; ++c) {
        const float v = rows.get(t, c);
        int sym = format::quantize(v, params[c]);
        if (enc && (__ldg(&enc[sym]) >> 16) == 0) sym = format::kEscape;
        f(sym, v);
      }
    }
  } else {
    for (int t = 0; t < T; ++t) {
      const format::GroupQuant g = params[t];
      for (int c = lane; c < D; c += 32) {
        const float v = rows.get(t, c);
        int sym = format::quantize(v, g);
        if (enc && (__ldg(&enc[sym]) >> 16) == 0) sym = format::kEscape;
        f(sym, v);
      }
    }
  }
}

__device__ __forceinline__ uint32_t symbol_bits(const uint32_t* enc, int sym) {
  return (__ldg(&enc[sym]) >> 16) + (sym == format::kEscape ? format::kRawBits : 0);
}

/// grid: ceil(2 * n_jobs / kStoreWarps) CTAs of 32 * kStoreWarps threads.
/// hist: [codebooks][256] counts, accumulated with atomics.
template <typename Elem>
__global__ void __launch_bounds__(32 * kStoreWarps) histogram_kernel(const StoreJob* jobs, int n_jobs, int T, int D,
                                                                     unsigned long long* hist) {
  __shared__ format::GroupQuant params[kStoreWarps][kMaxGroups];
  __shared__ uint32_t local[kStoreWarps][format::kNumSymbols];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int item = blockIdx.x * kStoreWarps + warp;
  if (item >= 2 * n_jobs) return;
  const StoreJob job = jobs[item / 2];
  const Kind kind = Kind(item % 2);
  for (int s = lane; s < format::kNumSymbols; s += 32) local[warp][s] = 0;
  block_params_warp<Elem>(job, kind, T, D, params[warp]);
  for_each_lane_symbol<Elem>(job, kind, T, D, params[warp], nullptr,
                             [&](int sym, float) { atomicAdd(&local[warp][sym], 1u); });
  __syncwarp();
  unsigned long long* out = hist + size_t(job.codebook + int(kind)) * format::kNumSymbols;
  for (int s = lane; s < format::kNumSymbols; s += 32)
    if (local[warp][s]) atomicAdd(&out[s], (unsigned long long)local[warp][s]);
}

/// sizes16[2 * job + kind] = block bytes / 16. An exclusive scan of sizes16
/// gives every block's offset; a job's V block directly follows its K block.
template <typename Elem>
__global__ void __launch_bounds__(32 * kStoreWarps) measure_kernel(const StoreJob* jobs, int n_jobs, int T, int D,
                                                                   const CodebookTables* books, uint32_t* sizes16) {
  __shared__ format::GroupQuant params[kStoreWarps][kMaxGroups];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int item = blockIdx.x * kStoreWarps + warp;
  if (item >= 2 * n_jobs) return;
  const StoreJob job = jobs[item / 2];
  const Kind kind = Kind(item % 2);
  const uint32_t* enc = books[job.codebook + int(kind)].enc;
  block_params_warp<Elem>(job, kind, T, D, params[warp]);
  uint32_t bits = 0;
  for_each_lane_symbol<Elem>(job, kind, T, D, params[warp], enc, [&](int sym, float) { bits += symbol_bits(enc, sym); });
  for (int o = 16; o > 0; o >>= 1) bits += __shfl_xor_sync(0xFFFFFFFFu, bits, o);
  if (lane == 0) sizes16[item] = uint32_t(format::block_bytes(kind, T, D, bits) / format::kBlockAlign);
}

/// Appends bits LSB first; stores each completed 32-bit word except a first
/// word shared with the previous lane, which is handed back at the end.
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

/// Writes every block at pool + 16 * (extent_base16[job.extent] + offsets16[block]),
/// offsets16 being the exclusive scan of sizes16.
/// extent_base16 is pre-adjusted by the host so that this sum is the block's place.
template <typename Elem>
__global__ void __launch_bounds__(32 * kStoreWarps) encode_kernel(const StoreJob* jobs, int n_jobs, int T, int D,
                                                                  const CodebookTables* books,
                                                                  const uint32_t* sizes16, const uint32_t* offsets16,
                                                                  const int64_t* extent_base16, uint8_t* pool,
                                                                  format::BlockRef* table) {
  __shared__ format::GroupQuant params[kStoreWarps][kMaxGroups];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int item = blockIdx.x * kStoreWarps + warp;
  if (item >= 2 * n_jobs) return;
  const int j = item / 2;
  const StoreJob job = jobs[j];
  const Kind kind = Kind(item % 2);
  const uint32_t* enc = books[job.codebook + int(kind)].enc;
  const uint32_t k16 = sizes16[2 * j], v16 = sizes16[2 * j + 1];
  const int64_t pair16 = extent_base16[job.extent] + offsets16[2 * j];
  const int64_t at16 = pair16 + (kind == Kind::Key ? 0 : k16);
  uint32_t* block = reinterpret_cast<uint32_t*>(pool + at16 * format::kBlockAlign);
  const uint32_t block_words = (kind == Kind::Key ? k16 : v16) * (format::kBlockAlign / 4);
  if (kind == Kind::Key && lane == 0) table[job.table_index] = {uint32_t(pair16), uint16_t(k16), uint16_t(v16)};

  block_params_warp<Elem>(job, kind, T, D, params[warp]);
  // Pass 1: lane lengths -> starts.
  uint32_t bits = 0;
  for_each_lane_symbol<Elem>(job, kind, T, D, params[warp], enc, [&](int sym, float) { bits += symbol_bits(enc, sym); });
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
  for_each_lane_symbol<Elem>(job, kind, T, D, params[warp], enc, [&](int sym, float v) {
    const uint32_t e = __ldg(&enc[sym]);
    wr.put(e & 0xFFFFu, int(e >> 16));
    if (sym == format::kEscape) wr.put(format::float_bits(v), format::kRawBits);
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

/// Copies input rows into a tail (in the input's type): grid = number of copies.
template <typename Elem>
__global__ void tail_copy_kernel(const TailCopy* copies, int D) {
  const TailCopy c = copies[blockIdx.x];
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
